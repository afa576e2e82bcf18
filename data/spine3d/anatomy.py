"""A procedural thoracolumbar spine and trunk in 3D, as analytic solids (``raycast.Solid``).

World coordinates are millimetres in the patient's RAS frame (+x right, +y anterior, +z
superior), as in :mod:`data.projector`. Each vertebra has a local frame (u right, v anterior, w
superior) with its origin at the centre of its inferior endplate.

What is built:

* **vertebral bodies** T1-L5: a hyperboloid of one sheet (the concave waist) cut by the two
  endplate planes and a flat posterior wall; a cortical shell (outer solid minus an inner one)
  around trabecular bone whose projection a texture modulates; endplate concavities (ellipsoids
  taken out of the endplates, lined with cortex). Sizes by level follow published morphometry
  (:data:`BODY_MM`);
* **posterior elements**: pedicles (with a cortical shell), laminae, spinous and transverse
  processes, superior and inferior articular processes (facets);
* **discs**, **ribs** (twelve pairs, chains of elliptic-cylinder segments with a cortical shell
  that meet on bisecting planes; the 11th and 12th float, so T12 is the last rib-bearing level),
  the **sternum**, the **sacrum** (five fused segments and the alae), the **iliac wings** and
  **femoral heads**, the **lungs** above the **diaphragm**'s domes, the **heart**, **bowel gas**
  and the **soft-tissue envelope** (muscle inside a layer of fat);
* **variation**: size, thoracic kyphosis, lumbar lordosis, scoliosis (coronal curve with axial
  rotation), osteoporosis (thin cortex, sparse low-density trabeculae), physiological wedging,
  endplate concavity, Schmorl's nodes, osteophytes, disc degeneration and transitional anatomy
  (a hypoplastic 12th rib, a lumbar rib on L1, a sacralised L5 with large transverse processes);
* **fractures**: wedge, biconcave and crush, Genant grade 1-3, with the 2D phantom's grade
  loss ranges (clear of the grade boundaries). The superior endplate plane tilts (wedge), the
  endplates cave in (biconcave) or both (crush). Acute: an endplate step with a cortical break,
  a condensation band beneath the endplate, prevertebral swelling; chronic: sclerotic (thick,
  dense) margins, osteophytes, narrowed neighbouring discs.

The deformation of a fracture lies along the film's height-measuring axis: anterior-posterior
on a lateral film, left-right on an AP film (a wedge of an AP film is a lateral wedge), so that
the grade a film's own six points measure is the grade written (``tests/test_phantom.py``). An
anterior wedge does not show its grade on an AP film, and the AP phantom draws none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.fracture_priors import (ACUTE_GRADE_P, ACUTE_SHAPE_P, CHRONIC_GRADE_P, CHRONIC_SHAPE_P,
                                  LEVEL_FRACTURE_WEIGHT, LOSS_RANGE)
from data.morphometry import LEVELS, grade_vertebrae
from data.spine3d.materials import mu
from data.spine3d.raycast import Solid, box_bounds, plane, quadric, rotation

SPINE_LEVELS: tuple[str, ...] = LEVELS  # T1 ... L5
SACRAL: tuple[str, ...] = ("S1", "S2", "S3", "S4", "S5")
THORACOLUMBAR = ("T11", "T12", "L1")
# Vertebral body endplate width (coronal), depth (sagittal) and posterior height, mm, and the
# height of the disc below. Approximate means read from Panjabi et al., "Thoracic human vertebrae:
# quantitative three-dimensional anatomy", Spine 1991;16:888-901, and "Human lumbar vertebrae:
# quantitative three-dimensional anatomy", Spine 1992;17:299-306; disc heights after Koeller et
# al. (Spine 1984) and Pfirrmann et al. (Spine 2006). The sacral segments shrink caudally.
BODY_MM: dict[str, tuple[float, float, float, float]] = {
    "T1": (27, 16, 14.5, 4.0), "T2": (27, 17, 15.5, 4.0), "T3": (27, 18, 16.0, 4.2),
    "T4": (28, 19, 16.8, 4.3), "T5": (29, 21, 17.5, 4.5), "T6": (30, 23, 18.2, 4.8),
    "T7": (31, 25, 19.0, 5.0), "T8": (33, 26, 19.6, 5.2), "T9": (35, 27, 20.3, 5.5),
    "T10": (37, 29, 21.0, 6.0), "T11": (39, 30, 22.0, 6.5), "T12": (42, 31, 23.2, 7.5),
    "L1": (43, 33, 24.4, 8.5), "L2": (45, 34, 25.0, 9.5), "L3": (47, 35, 25.2, 10.5),
    "L4": (49, 35, 25.0, 11.0), "L5": (50, 35, 24.0, 10.0),
    "S1": (48, 32, 26.0, 1.5), "S2": (40, 25, 22.0, 1.0), "S3": (32, 20, 18.0, 1.0),
    "S4": (24, 15, 15.0, 1.0), "S5": (17, 11, 12.0, 0.0),
}
# canal half-width, pedicle half-width, half-height and length, transverse process length (mm)
POSTERIOR_MM: dict[str, tuple[float, float, float, float, float]] = {
    "T1": (9.0, 4.0, 4.5, 9, 32), "T2": (8.5, 3.6, 5.0, 10, 30), "T3": (8.0, 3.0, 5.5, 10, 29),
    "T4": (8.0, 2.8, 5.8, 10, 28), "T5": (8.0, 2.8, 6.0, 11, 27), "T6": (8.0, 2.9, 6.0, 11, 26),
    "T7": (8.0, 3.0, 6.3, 11, 25), "T8": (8.0, 3.3, 6.5, 12, 24), "T9": (8.0, 3.5, 7.0, 12, 22),
    "T10": (8.5, 3.8, 7.5, 12, 19), "T11": (9.0, 4.3, 8.0, 12, 14), "T12": (10.0, 4.2, 8.0, 12, 12),
    "L1": (11.0, 4.2, 7.5, 13, 20), "L2": (11.5, 4.5, 7.5, 13, 25), "L3": (12.0, 5.2, 7.5, 13, 29),
    "L4": (12.5, 6.0, 7.3, 13, 26), "L5": (13.0, 7.5, 7.0, 12, 22),
}
# Thoracic cage half-width and half-depth at each rib, and each rib's anterior end (radians
# around the cage from the back); ribs 11 and 12 float.
RIB_CAGE_MM: dict[int, tuple[float, float, float]] = {
    1: (50, 38, 2.6), 2: (72, 52, 2.6), 3: (90, 64, 2.7), 4: (104, 74, 2.7), 5: (114, 82, 2.7),
    6: (122, 88, 2.7), 7: (128, 92, 2.6), 8: (132, 95, 2.4), 9: (134, 97, 2.2), 10: (134, 98, 2.0),
    11: (130, 98, 1.5), 12: (120, 96, 1.05),
}
BODY_INSET = 0.03  # six points: this fraction of the half-depth inside the body's outline
POSTERIOR_WALL = 0.8  # the flat posterior wall, as a fraction of the half-depth behind the centre
# bone density (x the table's trabecular HU; materials.py): normal and osteoporotic ranges
BONE_DENSITY = {"normal": (1.1, 1.6), "osteoporotic": (0.6, 0.95)}


@dataclass
class Vertebra:
    level: str
    width: float  # endplate width, mm
    depth: float  # endplate depth (anterior to posterior wall), mm
    height: float  # intact height, mm
    disc: float  # height of the disc below, mm
    heights: tuple[float, float] = (0.0, 0.0)  # front and back heights (Ha, Hp) along the axis
    dips: tuple[float, float] = (0.0, 0.0)  # superior and inferior endplate concavity, mm
    grade: int = 0
    shape: str = "normal"
    acute: bool | None = None
    osteophytes: tuple[bool, bool] = (False, False)
    sclerotic: bool = False
    schmorl: bool = False
    step: tuple[float, float] | None = None  # (axis position of the step's edge, depth), mm
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def fractured(self) -> bool:
        return self.grade > 0

    @property
    def a(self) -> float:  # coronal half-width at the endplates
        return self.width / 2

    @property
    def b(self) -> float:  # sagittal half-depth: the body spans v = -POSTERIOR_WALL b ... b
        return self.depth / (1 + POSTERIOR_WALL)

    @property
    def middle_height(self) -> float:
        return (self.heights[0] + self.heights[1]) / 2 - sum(self.dips)

    def to_world(self, p) -> np.ndarray:
        return self.origin + self.rotation @ np.asarray(p, dtype=np.float64)


@dataclass
class Patient:
    """Everything sampled for one film: the column, the trunk and the view's deformation axis."""

    view: str  # "lateral" or "ap"
    vertebrae: list[Vertebra]  # T1 ... L5, then S1 ... S5
    axis: np.ndarray  # local unit vector of the height-measuring axis (towards "front")
    scale: float
    density: float
    osteoporotic: bool
    cortex_mm: float
    texture_contrast: float
    trunk: dict
    variants: dict

    def by_level(self, level: str) -> Vertebra:
        return next(v for v in self.vertebrae if v.level == level)


# ----------------------------------------------------------------------------- sampling


def axis_positions(v: Vertebra, view: str) -> tuple[float, float, float]:
    """Positions along the deformation axis of the front, middle and back points (local mm)."""
    if view == "lateral":
        front, back = (1 - BODY_INSET) * v.b, -(POSTERIOR_WALL - BODY_INSET) * v.b
    else:
        front, back = (1 - BODY_INSET) * v.a, -(1 - BODY_INSET) * v.a
    return front, (front + back) / 2, back


def designed_points(verts: list[Vertebra]) -> np.ndarray:
    """Six points per vertebra in a flat frame with the designed heights (to check grades)."""
    out = []
    for v in verts:
        ha, hp = v.heights
        out.append([[0, 0], [1, 0], [2, 0], [0, ha], [1, v.middle_height], [2, hp]])
    return np.asarray(out, dtype=np.float64)


def _deform(v: Vertebra, rng: np.random.Generator, view: str, osteoporotic: bool) -> None:
    """Heights and endplate concavities of one vertebra, normal or fractured."""
    h = v.height
    phys = rng.uniform(0.005, 0.035) * h  # physiological endplate concavity, both endplates
    if not v.fractured:
        ha = hp = h
        if view == "lateral":
            if v.level in THORACOLUMBAR and rng.random() < 0.6:
                ha = h * (1 - rng.uniform(0.03, 0.15))  # physiological wedging, < 20 %
            elif v.level.startswith("T") and rng.random() < 0.5:
                ha = h * (1 - rng.uniform(0.0, 0.08))
            elif v.level == "L5":
                ha = h * (1 + rng.uniform(0.04, 0.12))  # L5 is taller in front (lordotic)
        else:
            ha = h * (1 - rng.uniform(0.0, 0.05))  # slight asymmetry, e.g. scoliosis
        v.heights = (ha, hp)
        v.dips = (phys * rng.uniform(0.5, 1.0), phys * rng.uniform(0.3, 0.8))
        return
    lo, hi = LOSS_RANGE[v.grade]
    if v.shape == "crush":
        lo = max(lo, 0.30)
    loss = rng.uniform(lo, hi)
    if v.shape == "wedge":
        ha, hp = h * (1 - loss), h
        dip = min(phys, 0.3 * h * loss)
        v.heights, v.dips = (ha, hp), (dip * 0.6, dip * 0.4)
    elif v.shape == "biconcave":
        ha, hp = h * (1 - loss * rng.uniform(0.2, 0.5)), h
        total = (ha + hp) / 2 - h * (1 - loss)
        v.heights, v.dips = (ha, hp), (total * 0.55, total * 0.45)
    else:  # crush: every height lost, the front most
        post = rng.uniform(0.27, min(loss, 0.45))
        ha, hp = h * (1 - loss), h * (1 - post)
        mid = rng.uniform(max(post, (loss + post) / 2 + 0.01), max(loss, (loss + post) / 2 + 0.02))
        total = (ha + hp) / 2 - h * (1 - mid)
        v.heights, v.dips = (ha, hp), (total * 0.6, total * 0.4)


def sample_patient(rng: np.random.Generator, view: str) -> Patient:
    """The anatomy, variation and fractures of one film (before the layout)."""
    scale = rng.uniform(0.88, 1.12)
    osteoporotic = bool(rng.random() < 0.5)
    verts = []
    for level in SPINE_LEVELS + SACRAL:
        w, d, hgt, disc = BODY_MM[level]
        jitter = rng.uniform(0.97, 1.03, 3)
        verts.append(Vertebra(level=level, width=w * scale * jitter[0], depth=d * scale * jitter[1],
                              height=hgt * scale * jitter[2], disc=disc * scale * rng.uniform(0.85, 1.15)))
    spine = verts[: len(SPINE_LEVELS)]

    n_frac = 0
    if rng.random() < 0.5:  # about half the films carry one or more fractures
        n_frac = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    weights = np.array([LEVEL_FRACTURE_WEIGHT.get(v.level, 0.3) for v in spine])
    order = rng.choice(len(spine), size=len(spine), replace=False, p=weights / weights.sum())
    fractured: list[int] = []
    for i in order:
        if len(fractured) >= n_frac:
            break
        if any(abs(i - j) <= 1 for j in fractured):  # a crush needs intact neighbours
            continue
        fractured.append(int(i))
    acute_bias = rng.random()
    for i in fractured:
        v = spine[i]
        v.acute = bool(rng.random() < (0.35 + 0.3 * acute_bias))
        v.grade = int(rng.choice([1, 2, 3], p=ACUTE_GRADE_P if v.acute else CHRONIC_GRADE_P))
        shape_p = ACUTE_SHAPE_P if v.acute else CHRONIC_SHAPE_P
        v.shape = str(rng.choice(list(shape_p), p=list(shape_p.values())))
        if v.shape == "crush" and v.grade == 1:
            v.shape = "wedge"  # a crush with a posterior loss over 20 % is at least grade 2
        if not v.acute:
            v.osteophytes = (rng.random() < 0.8, rng.random() < 0.6)
            v.sclerotic = True
    for v in spine:
        _deform(v, rng, view, osteoporotic)
        if not v.fractured:
            p_osteo = 0.35 if osteoporotic else 0.12
            v.osteophytes = (rng.random() < p_osteo, rng.random() < p_osteo * 0.7)
            v.sclerotic = rng.random() < (0.2 if osteoporotic else 0.08)
            v.schmorl = rng.random() < 0.06
        elif v.acute:
            front, _, _ = axis_positions(v, view)
            # the depressed fragment's edge, 26-42 % of the depth in front of the centre
            v.step = (front * rng.uniform(0.3, 0.48), rng.uniform(0.07, 0.13) * v.height)
    for v in sacral_of(verts):
        v.heights = (v.height, v.height)
    # discs: narrowed next to a chronic fracture, or by degeneration
    for i, v in enumerate(spine):
        below = verts[i + 1]
        if (v.fractured and not v.acute) or (below.fractured and not below.acute):
            v.disc *= rng.uniform(0.35, 0.6)
        elif osteoporotic and rng.random() < 0.2:
            v.disc *= rng.uniform(0.55, 0.8)

    axis = np.array([0.0, 1.0, 0.0]) if view == "lateral" else np.array([1.0, 0.0, 0.0]) * rng.choice([-1.0, 1.0])
    density = rng.uniform(*BONE_DENSITY["osteoporotic" if osteoporotic else "normal"])
    trunk = {
        "half_width": rng.uniform(140, 185) * scale,  # left-right
        "back": rng.uniform(60, 95) * scale,  # skin behind the body centres
        "front": rng.uniform(120, 230) * scale,  # skin in front of them
        "fat": rng.uniform(6, 35),
        "kyphosis": np.radians(rng.uniform(20, 60)),
        "lordosis": np.radians(rng.uniform(30, 65)),
        "scoliosis": np.radians(rng.uniform(8, 30)) * rng.choice([-1, 1]) if rng.random() < 0.2 else 0.0,
        "scoliosis_phase": rng.uniform(0, np.pi),
        "diaphragm_level": rng.uniform(8.5, 10.5),  # dome apex at this level index (T10 = 9)
        "heart": rng.uniform(0.85, 1.2),
        "n_gas": int(rng.integers(3, 20)),
    }
    variants = {
        "short_rib12": bool(rng.random() < 0.06),
        "lumbar_rib": bool(rng.random() < 0.03),
        "sacralised_l5": bool(rng.random() < 0.05),
    }
    return Patient(view=view, vertebrae=verts, axis=axis, scale=scale, density=density,
                   osteoporotic=osteoporotic,
                   cortex_mm=rng.uniform(0.35, 0.6) if osteoporotic else rng.uniform(0.7, 1.2),
                   texture_contrast=rng.uniform(0.12, 0.2) if osteoporotic else rng.uniform(0.05, 0.12),
                   trunk=trunk, variants=variants)


def sacral_of(verts: list[Vertebra]) -> list[Vertebra]:
    return [v for v in verts if v.level.startswith("S")]


def grades_consistent(patient: Patient, written: list[int] | None = None) -> bool:
    """Whether the grades and shapes measured from the designed heights are the sampled ones."""
    spine = [v for v in patient.vertebrae if not v.level.startswith("S")]
    idx = written if written is not None else list(range(len(spine)))
    chosen = [spine[i] for i in idx]
    measured = grade_vertebrae(designed_points(chosen), symmetric=patient.view == "ap")
    return all(m["genant_grade"] == v.grade and (v.grade == 0 or m["morphology"] == v.shape)
               for m, v in zip(measured, chosen))


# ----------------------------------------------------------------------------- layout


def _slope(v: Vertebra, view: str) -> float:
    front, _, back = axis_positions(v, view)
    return (v.heights[0] - v.heights[1]) / (front - back)


def top_height(v: Vertebra, view: str, q: float) -> float:
    """Height of the superior endplate plane above the inferior one at axis position q."""
    front, _, back = axis_positions(v, view)
    return v.heights[1] + (v.heights[0] - v.heights[1]) * (q - back) / (front - back)


def layout(patient: Patient, rng: np.random.Generator) -> None:
    """Stack the vertebrae along kyphotic, lordotic and scoliotic curves; set each frame."""
    verts = patient.vertebrae
    t = patient.trunk
    n = len(verts)
    names = [v.level for v in verts]
    bend_s = np.zeros(n)  # sagittal angle change at the disc below each vertebra
    thoracic = [i for i, l in enumerate(names) if l.startswith("T") and l != "T12"]
    bend_s[thoracic] = t["kyphosis"] / len(thoracic) * (0.6 + 0.8 * np.sin(np.linspace(0.2, np.pi - 0.2, len(thoracic))))
    lumbar = [names.index(l) for l in ("L1", "L2", "L3", "L4", "L5")]
    lw = np.array([0.5, 0.7, 0.9, 1.3, 1.6])
    bend_s[lumbar] = -t["lordosis"] * lw / lw.sum()
    for l in ("S1", "S2", "S3", "S4"):
        bend_s[names.index(l)] = np.radians(rng.uniform(10, 16))
    bend_c = np.zeros(n)
    if t["scoliosis"]:
        k = np.arange(n)
        bend_c[: names.index("L5")] = t["scoliosis"] / 8 * np.cos(k[: names.index("L5")] / 16 * 2 * np.pi + t["scoliosis_phase"])
    phi, psi = 0.0, 0.0
    angles = []
    for i, v in enumerate(verts):
        s = _slope(v, patient.view)
        wedge = np.arctan(s)
        if patient.view == "lateral":
            cur_phi, cur_psi = phi - wedge, psi
        else:
            cur_phi, cur_psi = phi, psi + wedge * np.sign(patient.axis[0])
        angles.append((cur_phi, cur_psi))
        phi += bend_s[i]
        psi += bend_c[i]
    gammas = np.cumsum(bend_c) * 0.8  # axial rotation follows the scoliotic curve
    cursor = np.zeros(3)  # superior endplate centre of the current vertebra
    for i, v in enumerate(verts):
        R = rotation(angles[i][0], angles[i][1], gammas[i])
        v.rotation = R
        top_c = top_height(v, patient.view, 0.0)
        v.origin = cursor - R @ np.array([0.0, 0.0, top_c])
        if i + 1 < n:
            nxt = rotation(angles[i + 1][0], angles[i + 1][1], gammas[i + 1])
            d = R[:, 2] + nxt[:, 2]
            cursor = v.origin - d / np.linalg.norm(d) * v.disc
    # balance: the line from T1 to S1 stands vertical (give or take), T12/L1 near the origin
    t1, s1 = verts[0].origin, patient.by_level("S1").origin
    down = (s1 - t1) / np.linalg.norm(s1 - t1)
    lean = np.radians(rng.uniform(-4, 4, 2))
    target = np.array([np.sin(lean[1]), np.sin(lean[0]), -1.0])
    target /= np.linalg.norm(target)
    G = _rotation_between(down, target)
    centre = patient.by_level("L1").origin
    for v in verts:
        v.origin = G @ (v.origin - centre)
        v.rotation = G @ v.rotation


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation taking unit vector a onto unit vector b."""
    v = _cross(a, b)
    c = float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


# ----------------------------------------------------------------------------- solids


@dataclass
class Mats:
    cortical: float
    trabecular: float
    soft: float
    fat: float
    disc: float
    lung: float
    air: float

    @classmethod
    def of(cls, density: float) -> "Mats":
        return cls(cortical=mu("cortical"), trabecular=mu("soft") + (mu("trabecular") - mu("soft")) * density,
                   soft=mu("soft"), fat=mu("fat"), disc=mu("disc"), lung=mu("lung"), air=mu("air"))


def _local_solid(v: Vertebra, centre, axes_local, semi, kind="ellipsoid", waist=0.0, planes=(), weight=0.0,
                 texture=0.0, extra_quadric=None) -> Solid:
    axes = v.rotation @ np.asarray(axes_local, dtype=np.float64)
    c = v.to_world(centre)
    quads = [quadric(c, axes, semi, kind, waist)]
    if extra_quadric is not None:
        quads.append(extra_quadric)
    half = np.asarray(semi, dtype=np.float64) * (1.0 if kind == "ellipsoid" else 1.5)
    return Solid(np.stack(quads), np.stack(list(planes)) if planes else np.zeros((0, 4)), weight,
                 box_bounds(c, axes, half), texture=texture)


def _local_plane(v: Vertebra, point, normal) -> np.ndarray:
    return plane(v.to_world(point), v.rotation @ np.asarray(normal, dtype=np.float64))


def _top_plane(v: Vertebra, view: str, axis: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """The superior endplate half-space (inside below), moved down by ``offset`` mm."""
    s = _slope(v, view)
    normal = np.array([0.0, 0.0, 1.0]) - s * axis
    normal /= np.linalg.norm(normal)
    return _local_plane(v, [0.0, 0.0, top_height(v, view, 0.0)] - normal * offset, normal)


def vertebra_solids(v: Vertebra, patient: Patient, m: Mats, rng: np.random.Generator) -> list[Solid]:
    view, axis = patient.view, patient.axis
    out: list[Solid] = []
    h = v.height
    sacral = v.level.startswith("S")
    waist = rng.uniform(0.86, 0.94) if not sacral else 0.97
    k = 1 / waist ** 2 - 1
    a_w, b_w = v.a * waist, v.b * waist
    centre = [0.0, 0.0, h / 2]
    eye = np.eye(3)
    tc = patient.cortex_mm * (1.8 if v.sclerotic else 1.0)
    te = tc * (1.2 if v.sclerotic else 0.6)  # endplates: thinner than the walls, thick when sclerotic
    cort = m.cortical * (1.15 if v.sclerotic else 1.0)
    top = _top_plane(v, view, axis)
    bottom = _local_plane(v, [0, 0, 0], [0, 0, -1])
    back = _local_plane(v, [0, -POSTERIOR_WALL * v.b, 0], [0, -1, 0])
    outer_planes = (top, bottom, back)
    inner_planes = (_top_plane(v, view, axis, te), _local_plane(v, [0, 0, te], [0, 0, -1]),
                    _local_plane(v, [0, -POSTERIOR_WALL * v.b + tc, 0], [0, -1, 0]))
    semi_o = (a_w, b_w, h / 2)
    semi_i = (a_w - tc, b_w - tc, h / 2)
    w_outer, w_inner, t_inner = cort - m.soft, -cort, m.trabecular
    out.append(_local_solid(v, centre, eye, semi_o, "hyperboloid", k, outer_planes, w_outer))
    out.append(_local_solid(v, centre, eye, semi_i, "hyperboloid", k, inner_planes, w_inner, t_inner))
    _, q_mid, _ = axis_positions(v, view)
    mid = q_mid * axis
    other = np.array([1.0, 0.0, 0.0]) if view == "lateral" else np.array([0.0, 1.0, 0.0])
    half_axis = (v.b if view == "lateral" else v.a) * 0.55
    half_other = (v.a if view == "lateral" else v.b) * 0.6

    def dip_semi(depth, grow=0.0):
        return np.abs(axis) * (half_axis + grow) + np.abs(other) * (half_other + grow) + np.array([0, 0, depth + grow])

    for depth, z in ((v.dips[0], top_height(v, view, q_mid)), (v.dips[1], 0.0)):
        if depth < 0.2:
            continue
        c = v.to_world(mid + np.array([0, 0, z]))
        dip = quadric(c, v.rotation, dip_semi(depth))
        lined = quadric(c, v.rotation, dip_semi(depth, te))
        out.append(_local_solid(v, centre, eye, semi_o, "hyperboloid", k, outer_planes, -w_outer, extra_quadric=dip))
        out.append(_local_solid(v, centre, eye, semi_i, "hyperboloid", k, inner_planes, -w_inner, -t_inner,
                                extra_quadric=lined))
    if v.step is not None:
        edge, depth = v.step
        width = 0.16 * (v.depth if view == "lateral" else v.width)
        # the removed fragment: in front of the edge, below the endplate, above a line falling
        # from the endplate behind the edge to `depth` below it at the edge (a depressed step)
        q0 = edge - width
        p0 = np.array([0, 0, top_height(v, view, q0)]) + q0 * axis
        p1 = np.array([0, 0, top_height(v, view, edge) - depth]) + edge * axis
        along = (p1 - p0) / np.linalg.norm(p1 - p0)
        normal = _cross(along, other)
        normal = normal if normal[2] < 0 else -normal  # inside: above the floor
        floor = _local_plane(v, p0, normal)
        front_lim = _local_plane(v, edge * axis, axis)  # inside: behind the edge
        out.append(_local_solid(v, centre, eye, semi_o, "hyperboloid", k, (top, floor, front_lim), -w_outer))
        out.append(_local_solid(v, centre, eye, semi_i, "hyperboloid", k, (top, floor, front_lim), -w_inner, -t_inner))
        # condensation band of impacted trabeculae beneath the collapsed endplate
        off = rng.uniform(0.12, 0.20) * h
        thick = rng.uniform(0.08, 0.13) * h
        band = (_top_plane(v, view, axis, off), _plane_flip(_top_plane(v, view, axis, off + thick)), inner_planes[2])
        out.append(_local_solid(v, centre, eye, semi_i, "hyperboloid", k, band, 0.0,
                                m.trabecular * rng.uniform(0.6, 1.1)))
        # prevertebral swelling: soft tissue where fat was
        out.append(_local_solid(v, [0, v.b + rng.uniform(6, 12), h / 2], eye,
                                (v.a * 0.8, rng.uniform(5, 9), h * rng.uniform(0.9, 1.4)), weight=m.soft - m.fat))
    for k_ep, present in enumerate(v.osteophytes):
        if not present:
            continue
        size = rng.uniform(2.5, 6.0) * patient.scale
        # anterior spurs on a lateral film; on an AP film the lateral ones show
        for side in ([0.0] if view == "lateral" else [-1.0, 1.0]):
            pos = np.array([side * (v.a + size * 0.3), 0.4 * v.b if side else v.b + size * 0.3, 0.0])
            edge_q = float(np.array([side * v.a, 0.0 if side else v.b, 0.0]) @ axis)
            pos[2] = top_height(v, view, edge_q) + size * 0.3 if k_ep == 0 else -size * 0.3
            out.append(_local_solid(v, pos, eye, (v.a * 0.35 if not side else size * 0.7, size * 0.7 if not side else v.b * 0.35,
                                                  size * 0.55), weight=cort * 0.75 - m.soft))
    if v.schmorl:
        r = rng.uniform(2.5, 5.0)
        pos = np.array([rng.uniform(-0.3, 0.3) * v.a, rng.uniform(-0.3, 0.3) * v.b, top_height(v, view, 0.0) - r * 0.6])
        out.append(_local_solid(v, pos, eye, (r + 1.2,) * 3, planes=inner_planes, weight=(cort - m.trabecular) * 0.4))
        out.append(_local_solid(v, pos, eye, (r,) * 3, planes=inner_planes, weight=m.soft - (cort - m.trabecular) * 0.4,
                                texture=-m.trabecular))
    return out


def _cross(a, b) -> np.ndarray:
    """Cross product of two 3-vectors (numpy's general one costs more than the solids it builds)."""
    a1, a2, a3 = a
    b1, b2, b3 = b
    return np.array([a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1], dtype=np.float64)


def _plane_flip(p: np.ndarray) -> np.ndarray:
    return -p


def posterior_solids(v: Vertebra, patient: Patient, m: Mats) -> list[Solid]:
    """Pedicles, laminae, spinous and transverse processes and facets of a T1-L5 vertebra."""
    if v.level not in POSTERIOR_MM:
        return []
    s = patient.scale
    cw, pw, ph, pl, tl = POSTERIOR_MM[v.level]
    cw, pw, ph, pl, tl = cw * s, pw * s, ph * s, pl * s, tl * s
    h, b = v.height, v.b
    lumbar = v.level.startswith("L")
    bone = m.trabecular + 0.5 * (m.cortical - m.trabecular) - m.soft
    out = []
    eye = np.eye(3)
    wall = -POSTERIOR_WALL * b
    mid_line = np.array([0.0, wall - pl - (7.0 if lumbar else 6.0) * s, 0.5 * h])
    for side in (-1.0, 1.0):
        # pedicle: a capped elliptic tube with a cortical wall. Seen end-on (AP) the wall is
        # crossed along its whole length, which draws the bright pedicle rings of real AP films.
        ped = np.array([side * (cw + pw), wall - pl / 2, 0.62 * h])
        tube_axes = np.stack([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]], 1)  # the tube runs along y
        caps = (_local_plane(v, [0, wall + 1.0, 0], [0, 1, 0]), _local_plane(v, [0, wall - pl - 1.5, 0], [0, -1, 0]))
        out.append(_local_solid(v, ped, tube_axes, (pw, ph, pl / 2 + 1.5), "cylinder", planes=caps,
                                weight=m.cortical - m.soft))
        wall_mm = min(1.2 * s, 0.45 * pw)
        out.append(_local_solid(v, ped, tube_axes, (pw - wall_mm, ph - wall_mm, pl / 2 + 1.5), "cylinder", planes=caps,
                                weight=m.trabecular - m.cortical))
        junction = np.array([side * (cw + pw), wall - pl - 1.5, 0.5 * h])
        e1 = mid_line - junction
        length = np.linalg.norm(e1)
        e1 /= length
        e3 = np.array([0.0, 0.0, 1.0])
        e2 = _cross(e3, e1)
        out.append(_local_solid(v, (junction + mid_line) / 2, np.stack([e1, e2, e3], 1),
                                (length / 2 + 2, 3.2 * s, (0.42 * h + 2.5)), weight=bone))
        # articular processes: the superior one rises above the body, the inferior one drops
        # below it to meet the next vertebra's superior one across the facet joint
        out.append(_local_solid(v, junction + np.array([0, -1.5, 0.5 * h + 5 * s]), eye, (4.5 * s, 5 * s, 7 * s), weight=bone))
        out.append(_local_solid(v, junction + np.array([-side * 1.5, -4.5, -0.5 * h - 3 * s]), eye,
                                (4.5 * s, 5 * s, 7.5 * s), weight=bone))
        # transverse process
        if lumbar:
            tdir = np.array([side, -0.12, 0.0])
            tsemi = (tl / 2, 4.0 * s, 4.5 * s)
            if v.level == "L5" and patient.variants["sacralised_l5"]:
                tsemi = (tl / 2 + 6 * s, 9 * s, 10 * s)
            base = junction + np.array([side * 2, 3.0, 0.1 * h])
        else:
            tdir = np.array([side, -0.65, 0.15])
            tsemi = (tl / 2, 5.0 * s, 5.5 * s)
            base = junction + np.array([0, -1.0, 0.25 * h])
        tdir /= np.linalg.norm(tdir)
        e2 = _cross(np.array([0.0, 0.0, 1.0]), tdir)
        e2 /= np.linalg.norm(e2)
        e3 = _cross(tdir, e2)
        out.append(_local_solid(v, base + tdir * tl / 2, np.stack([tdir, e2, e3], 1), tsemi, weight=bone))
    # spinous process: thoracic ones slope steeply down, lumbar ones run straight back
    idx = LEVELS.index(v.level)
    if lumbar:
        angle, length, height = np.radians(8), 30 * s, 9.5 * s
    else:
        angle = np.radians(35 + 25 * np.sin(np.pi * min(idx, 11) / 11))
        length, height = (34 + 0.6 * idx) * s, 5.0 * s
    sdir = np.array([0.0, -np.cos(angle), -np.sin(angle)])
    e2 = np.array([0.0, np.sin(angle), -np.cos(angle)])
    out.append(_local_solid(v, mid_line + sdir * length / 2, np.stack([sdir, e2, [1.0, 0, 0]], 1),
                            (length / 2 + 3, height, 3.5 * s), weight=bone))
    return out


def tubercle(v: Vertebra, patient: Patient, side: float) -> np.ndarray:
    """World position of the transverse process tip (where a rib's tubercle articulates)."""
    s = patient.scale
    cw, pw, _, pl, tl = POSTERIOR_MM[v.level]
    junction = np.array([side * (cw + pw) * s, -POSTERIOR_WALL * v.b - pl * s - 1.5, 0.5 * v.height])
    tdir = np.array([side, -0.65, 0.15])
    tdir /= np.linalg.norm(tdir)
    return v.to_world(junction + np.array([0, -1.0, 0.25 * v.height]) + tdir * tl * s)


def _chain(points: np.ndarray, semi_radial: float, semi_height: float, cortex: float, m: Mats,
           weight_scale: float = 1.0) -> list[Solid]:
    """A curved bone as elliptic-cylinder segments meeting on bisecting planes, with a cortex."""
    out = []
    dirs = np.diff(points, axis=0)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for j in range(len(dirs)):
        d = dirs[j]
        start_n = d if j == 0 else (dirs[j - 1] + d) / np.linalg.norm(dirs[j - 1] + d)
        end_n = d if j == len(dirs) - 1 else (d + dirs[j + 1]) / np.linalg.norm(d + dirs[j + 1])
        radial = _cross(d, [0.0, 0.0, 1.0])
        if np.linalg.norm(radial) < 1e-6:
            radial = np.array([1.0, 0.0, 0.0])
        radial /= np.linalg.norm(radial)
        third = _cross(radial, d)
        axes = np.stack([radial, third, d], 1)
        c = (points[j] + points[j + 1]) / 2
        planes = np.stack([plane(points[j], -start_n), plane(points[j + 1], end_n)])
        half_len = np.linalg.norm(points[j + 1] - points[j]) / 2
        bounds = box_bounds(c, axes, (semi_radial + 1, semi_height + 1, half_len + semi_height + 1))
        out.append(Solid(np.stack([quadric(c, axes, (semi_radial, semi_height, 1.0), "cylinder")]), planes,
                         (m.cortical - m.soft) * weight_scale, bounds))
        inner = (max(semi_radial - cortex, 0.5), max(semi_height - cortex, 0.5), 1.0)
        out.append(Solid(np.stack([quadric(c, axes, inner, "cylinder")]), planes,
                         (m.trabecular - m.cortical) * weight_scale, bounds))
    return out


def rib_solids(patient: Patient, m: Mats) -> list[Solid]:
    out = []
    s = patient.scale
    for k in range(1, 13):
        v = patient.by_level(f"T{k}")
        rx, ry, end = RIB_CAGE_MM[k]
        rx, ry = rx * s * patient.trunk["half_width"] / 160, ry * s
        if k == 12 and patient.variants["short_rib12"]:
            end = 0.55
        for side in (-1.0, 1.0):
            head = v.to_world([side * v.a * 0.8, -0.45 * v.b, v.height * 0.95 + v.disc * 0.3])
            tub = tubercle(v, patient, side)
            angle_pt = tub + np.array([side * 12 * s, -10 * s, -4 * s])
            xa = min(abs(angle_pt[0]), 0.85 * rx)
            th_a = np.arcsin(xa / rx)
            yc = angle_pt[1] + ry * np.cos(th_a)
            end_k = max(end, th_a + 0.3)
            th = np.linspace(th_a, end_k, 7 if k < 11 else 4)
            drop = (18 + 55 * np.sin(np.pi * min(k, 10) / 11)) * s
            frac = (th - th_a) / (end_k - th_a)
            arc = np.stack([side * rx * np.sin(th), yc - ry * np.cos(th), angle_pt[2] - drop * frac ** 1.2], 1)
            pts = np.vstack([head, tub, arc])
            semi_h = (7.0 if k == 1 else 5.5) * s
            out += _chain(pts, 2.8 * s, semi_h, 1.0, m)
    if patient.variants["lumbar_rib"]:
        v = patient.by_level("L1")
        for side in (-1.0, 1.0):
            base = v.to_world([side * 25 * s, -POSTERIOR_WALL * v.b - 12 * s, 0.5 * v.height])
            pts = np.stack([base, base + np.array([side * 25, -12, -10]) * s, base + np.array([side * 45, -8, -25]) * s])
            out += _chain(pts, 2.5 * s, 4.0 * s, 0.9, m)
    return out


def sacrum_pelvis_solids(patient: Patient, m: Mats) -> list[Solid]:
    out = []
    s = patient.scale
    bone = m.trabecular + 0.4 * (m.cortical - m.trabecular) - m.soft
    s1 = patient.by_level("S1")
    s2 = patient.by_level("S2")
    eye = np.eye(3)
    for side in (-1.0, 1.0):
        # alae: the lateral masses of S1-S2, up to the sacroiliac joints
        out.append(_local_solid(s1, [side * (s1.a + 16 * s), -8 * s, 0.35 * s1.height], eye, (22 * s, 15 * s, 18 * s),
                                weight=(m.trabecular - m.soft) * 1.2))
        # iliac wing: a thin curved plate beside the sacrum, its crest near L4-L5
        centre = s1.origin + np.array([side * 75, 10, 15]) * s
        axes = rotation(0.0, 0.0, side * np.radians(35))
        semi = (6 * s, 62 * s, 68 * s)
        out.append(Solid(np.stack([quadric(centre, axes, semi)]), np.zeros((0, 4)), m.cortical - m.soft,
                         box_bounds(centre, axes, semi)))
        inner = (4.3 * s, 60 * s, 66 * s)
        out.append(Solid(np.stack([quadric(centre, axes, inner)]), np.zeros((0, 4)), m.trabecular - m.cortical,
                         box_bounds(centre, axes, inner)))
        # femoral heads
        head = s1.origin + np.array([side * 85, 45, -115]) * s
        out.append(Solid(np.stack([quadric(head, eye, (23 * s,) * 3)]), np.zeros((0, 4)), m.cortical - m.soft,
                         box_bounds(head, eye, (23 * s,) * 3)))
        out.append(Solid(np.stack([quadric(head, eye, (21.5 * s,) * 3)]), np.zeros((0, 4)), m.trabecular - m.cortical,
                         box_bounds(head, eye, (21.5 * s,) * 3)))
    # median sacral crest behind S1-S3
    out.append(_local_solid(s2, [0, -s2.b - 12 * s, 0.5 * s2.height], eye, (8 * s, 6 * s, 35 * s), weight=bone))
    return out


def disc_solids(patient: Patient, m: Mats) -> list[Solid]:
    out = []
    verts = patient.vertebrae
    for upper, lower in zip(verts[:-1], verts[1:]):
        if upper.disc < 0.5:
            continue
        d = upper.rotation[:, 2] + lower.rotation[:, 2]
        d /= np.linalg.norm(d)
        centre = upper.origin - d * upper.disc / 2
        axes = upper.rotation.copy()
        axes[:, 2] = d
        semi = ((upper.a + lower.a) / 2 * 0.97, (upper.b + lower.b) / 2 * 0.97, 1.0)
        sup = _top_plane(lower, patient.view, patient.axis)
        planes = [plane(upper.origin, upper.rotation[:, 2]), -sup,
                  _local_plane(upper, [0, -POSTERIOR_WALL * upper.b, 0], [0, -1, 0])]
        bounds = box_bounds(centre, axes, (semi[0], semi[1], upper.disc + 5))
        out.append(Solid(np.stack([quadric(centre, axes, semi, "cylinder")]), np.stack(planes), m.disc - m.soft, bounds))
    return out


def trunk_solids(patient: Patient, m: Mats, rng: np.random.Generator) -> tuple[list[Solid], list[Solid]]:
    """Large smooth solids (envelope, lungs, diaphragm, heart: rendered coarse) and bowel gas."""
    t = patient.trunk
    s = patient.scale
    coarse, fine = [], []
    verts = patient.vertebrae
    z_top = verts[0].origin[2] + 80
    z_bottom = patient.by_level("S5").origin[2] - 150
    ys = [v.origin[1] for v in verts]
    y_front, y_back = max(ys) + t["front"], min(ys) - t["back"]
    yc, half_y = (y_front + y_back) / 2, (y_front - y_back) / 2
    eye = np.eye(3)
    caps = np.stack([plane([0, 0, z_top + 200], [0, 0, 1]), plane([0, 0, z_bottom - 200], [0, 0, -1])])
    for semi, weight in (((t["half_width"], half_y, 1.0), m.fat),
                         ((t["half_width"] - t["fat"], half_y - t["fat"] * 0.8, 1.0), m.soft - m.fat)):
        bounds = np.array([[-semi[0], yc - semi[1], z_bottom - 200], [semi[0], yc + semi[1], z_top + 200]])
        coarse.append(Solid(np.stack([quadric([0, yc, 0], eye, semi, "cylinder")]), caps, weight, bounds))
    # lungs and diaphragm: the dome's apex at the chosen level, its posterior recess lower
    level_idx = t["diaphragm_level"]
    lo_v, hi_v = verts[int(np.floor(level_idx))], verts[int(np.floor(level_idx)) + 1]
    frac = level_idx - np.floor(level_idx)
    apex_z = (1 - frac) * lo_v.origin[2] + frac * hi_v.origin[2]
    cage_x, cage_y = RIB_CAGE_MM[8][0] * s * t["half_width"] / 160, RIB_CAGE_MM[8][1] * s
    cage_yc = -50 * s + cage_y
    dome_semi = np.array([cage_x * 1.15, cage_y * 1.1, 95 * s])
    dome_c = np.array([8.0, cage_yc + 15 * s, apex_z - dome_semi[2]])
    dome = quadric(dome_c, eye, dome_semi)
    lung_top = verts[0].origin[2] + 35 * s
    lung_semi_z = (lung_top - (apex_z - 80 * s)) / 2
    t_spine = [v for v in verts if v.level.startswith("T")]
    for side in (-1.0, 1.0):
        medial = max(v.a for v in t_spine) + 6 * s
        lc = np.array([side * (medial * 0.5 + cage_x * 0.47), cage_yc - 5 * s, lung_top - lung_semi_z])
        lsemi = np.array([cage_x * 0.5, cage_y * 0.92, lung_semi_z])
        lq = quadric(lc, eye, lsemi)
        side_plane = plane([side * medial, 0, 0], [-side, 0, 0])
        bounds = box_bounds(lc, eye, lsemi)
        coarse.append(Solid(np.stack([lq]), np.stack([side_plane]), m.lung - m.soft, bounds))
        coarse.append(Solid(np.stack([lq, dome]), np.stack([side_plane]), -(m.lung - m.soft), bounds))
        # heart: soft tissue where the left lung would be, in front and above the dome
        hc = np.array([-25 * s, cage_yc + cage_y * 0.35, apex_z + 55 * s])
        hsemi = np.array([62, 50, 60]) * s * t["heart"]
        coarse.append(Solid(np.stack([lq, quadric(hc, eye, hsemi)]), np.stack([side_plane]), -(m.lung - m.soft),
                            box_bounds(hc, eye, hsemi)))
    # bowel gas: pockets of air in the abdomen, in front of the spine
    l_top = apex_z - 40 * s
    l_bottom = patient.by_level("S3").origin[2]
    for _ in range(t["n_gas"]):
        c = np.array([rng.uniform(-0.7, 0.7) * t["half_width"], rng.uniform(35, max(40.0, y_front - 30)),
                      rng.uniform(l_bottom, l_top)])
        # mostly small, partly filled pockets: large pure-air ellipsoids made black holes far
        # darker than the bowel gas of real films
        semi = np.array([rng.uniform(6, 28), rng.uniform(4, 14), rng.uniform(4, 16)]) * s
        R = rotation(*rng.uniform(-0.6, 0.6, 3))
        fine.append(Solid(np.stack([quadric(c, R, semi)]), np.zeros((0, 4)), -(m.soft - m.air) * rng.uniform(0.3, 0.8),
                          box_bounds(c, R, semi)))
    # sternum in front of the chest
    st_top, st_bottom = patient.by_level("T2").origin[2], patient.by_level("T9").origin[2]
    sc = np.array([0.0, cage_yc + cage_y * 0.98, (st_top + st_bottom) / 2 - 10])
    ssemi = np.array([14 * s, 6 * s, (st_top - st_bottom) / 2])
    tilt = rotation(np.radians(-18), 0, 0)
    fine.append(Solid(np.stack([quadric(sc, tilt, ssemi)]), np.zeros((0, 4)), m.cortical * 0.55 - m.soft,
                      box_bounds(sc, tilt, ssemi)))
    return coarse, fine


def all_solids(patient: Patient, rng: np.random.Generator) -> tuple[list[Solid], list[Solid]]:
    """(fine solids, coarse solids) of the whole patient."""
    m = Mats.of(patient.density)
    fine: list[Solid] = []
    for v in patient.vertebrae:
        fine += vertebra_solids(v, patient, m, rng)
        fine += posterior_solids(v, patient, m)
    fine += disc_solids(patient, m)
    fine += rib_solids(patient, m)
    fine += sacrum_pelvis_solids(patient, m)
    coarse, extra = trunk_solids(patient, m, rng)
    return fine + extra, coarse


def six_points_3d(v: Vertebra, view: str, axis: np.ndarray) -> np.ndarray:
    """World (6, 3) points: superior front, middle, back, then inferior (see data/geometry.py)."""
    front, q_mid, back = axis_positions(v, view)
    pts = []
    for q, dip in ((front, 0.0), (q_mid, v.dips[0]), (back, 0.0)):
        pts.append(q * axis + np.array([0, 0, top_height(v, view, q) - dip]))
    for q, dip in ((front, 0.0), (q_mid, v.dips[1]), (back, 0.0)):
        pts.append(q * axis + np.array([0, 0, dip]))
    return np.stack([v.to_world(p) for p in pts])


def body_outline_3d(v: Vertebra, view: str, axis: np.ndarray, n: int = 24) -> np.ndarray:
    """World points on the rims of the body's two endplates."""
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([v.a * np.cos(ang), np.maximum(v.b * np.sin(ang), -POSTERIOR_WALL * v.b), np.zeros(n)], 1)
    pts = []
    for p in ring:
        pts.append(p)
        pts.append(p + np.array([0, 0, top_height(v, view, float(p @ axis))]))
    return np.stack([v.to_world(p) for p in pts])
