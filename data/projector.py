"""Digitally reconstructed radiographs: Beer-Lambert attenuation in cone-beam geometry.

A volume of linear attenuation coefficients (1/mm) on a voxel grid is projected from a point
source onto a flat detector. Each detector pixel's value is the line integral of attenuation
along the ray from the source to the pixel's centre, ``L = sum(mu * ds)``; the transmitted
intensity is ``I = I0 exp(-L)``, and a radiograph shows ``-ln(I / I0) = L`` through a film
response (:func:`film_response`), so bone is bright. The projection is a true perspective one:
points far from the central ray are displaced outwards by the beam's divergence, and an
endplate seen obliquely shows its front and back rims as two contours, as on a real film.

World coordinates are millimetres in the patient's RAS frame (+x to the patient's **R**ight,
+y **A**nterior, +z **S**uperior), as nibabel's affines give them.

Views (the image is shown as seen from the source, y of the image pointing to the feet):

=================  ======================  ==========================================
view               source                  image
=================  ======================  ==========================================
``ap``             in front (anterior)     patient's right on the image left
``lateral_right``  patient's right side    facing right: anterior on the image right
``lateral_left``   patient's left side     facing left: anterior on the image left
=================  ======================  ==========================================

The source sits ``sod_mm`` from the isocentre (usually the spine), the detector
``sdd_mm`` from the source, so an object at the isocentre is magnified ``sdd_mm / sod_mm``.
:func:`project_points` maps world points to detector pixels with the same geometry, so truth
projected from 3D landmarks lands where the rendered anatomy does.

Hounsfield units convert to attenuation at an effective energy of about 60 keV
(:func:`hu_to_mu`): soft tissue and air scale with water, ``mu = mu_water (1 + HU / 1000)``,
and bone, whose photoelectric attenuation grows faster than water's below a CT's ~70 keV, by
``mu = mu_water (1 + BONE_SCALE * HU / 1000)`` above 0 HU. ``mu_water = 0.0206 /mm`` and
``BONE_SCALE = 1.25`` come from NIST XCOM: cortical bone (1.92 g/cm3) attenuates 2.93 times
as much as water at 60 keV and about 2.55 times at 70 keV, where a CT reads it near 1550 HU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

VIEWS: tuple[str, ...] = ("lateral_left", "lateral_right", "ap")
MU_WATER_PER_MM = 0.0206  # water at 60 keV (NIST XCOM, 0.206 /cm)
BONE_SCALE = 1.25  # (HU at 60 keV) / (HU at a CT's ~70 keV) for bone

# beam direction, image-right axis, image-down axis of each view, in RAS world coordinates
_VIEW_AXES = {
    "ap": ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "lateral_right": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "lateral_left": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
}


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM, bone_scale: float = BONE_SCALE) -> np.ndarray:
    """Linear attenuation (1/mm) at ~60 keV from Hounsfield units (module docstring); air is 0."""
    hu = np.asarray(hu, dtype=np.float32)
    scale = np.where(hu > 0, np.float32(bone_scale), np.float32(1.0))
    return np.maximum(np.float32(mu_water) * (1.0 + scale * hu / 1000.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class Volume:
    """A 3D array on a voxel grid: ``affine`` maps voxel indices (i, j, k) to world mm (RAS)."""

    data: np.ndarray
    affine: np.ndarray

    @classmethod
    def from_spacing(cls, data: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> "Volume":
        """An axis-aligned volume: index i runs along +x (right), j along +y, k along +z."""
        affine = np.diag([*map(float, spacing), 1.0])
        affine[:3, 3] = origin
        return cls(np.asarray(data), affine)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def corners(self) -> np.ndarray:
        """World coordinates of the 8 corners of the voxel grid's outer faces, (8, 3)."""
        n = np.array(self.data.shape[:3], dtype=np.float64)
        idx = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
        idx = idx * n - 0.5
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def crop(self, lo, hi) -> "Volume":
        """The sub-volume of voxel indices lo <= index < hi (per axis), with its own affine."""
        lo = np.maximum(np.asarray(lo, dtype=int), 0)
        hi = np.minimum(np.asarray(hi, dtype=int), self.data.shape[:3])
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ lo + self.affine[:3, 3]
        return Volume(self.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], affine)

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        p = np.asarray(points, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True)
class Geometry:
    """A cone-beam set-up: source, isocentre and a flat detector of ``rows x cols`` pixels.

    ``offset_mm`` shifts the detector's centre (image right, image down) from the point where
    the central ray (source -> isocentre) meets it.
    """

    view: str
    isocentre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sdd_mm: float = 1000.0
    sod_mm: float = 800.0
    rows: int = 512
    cols: int = 512
    pixel_mm: float = 0.5
    offset_mm: tuple[float, float] = (0.0, 0.0)
    axes: tuple = field(default=None, repr=False)

    def __post_init__(self):
        if self.view not in _VIEW_AXES:
            raise ValueError(f"unknown view {self.view!r}; expected one of {', '.join(VIEWS)}")
        if not 0 < self.sod_mm < self.sdd_mm:
            raise ValueError(f"need 0 < sod_mm < sdd_mm (got sod {self.sod_mm}, sdd {self.sdd_mm})")
        if self.axes is None:
            object.__setattr__(self, "axes", tuple(np.array(a, dtype=np.float64) for a in _VIEW_AXES[self.view]))

    @property
    def magnification(self) -> float:
        """Magnification of an object at the isocentre."""
        return self.sdd_mm / self.sod_mm

    @property
    def pixel_mm_isocentre(self) -> float:
        """Pixel pitch projected back to the isocentre plane (the object's scale)."""
        return self.pixel_mm / self.magnification

    @property
    def source(self) -> np.ndarray:
        return np.asarray(self.isocentre, dtype=np.float64) - self.axes[0] * self.sod_mm

    def principal_point(self) -> np.ndarray:
        """Pixel (x, y) where the central ray meets the detector."""
        return np.array([(self.cols - 1) / 2 - self.offset_mm[0] / self.pixel_mm,
                         (self.rows - 1) / 2 - self.offset_mm[1] / self.pixel_mm])

    def pixel_positions(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """World positions of detector pixel centres (x = column, y = row), shape (..., 3)."""
        beam, right, down = self.axes
        cx, cy = self.principal_point()
        centre = self.source + beam * self.sdd_mm
        u = (np.asarray(xs, dtype=np.float64) - cx) * self.pixel_mm
        v = (np.asarray(ys, dtype=np.float64) - cy) * self.pixel_mm
        return centre + u[..., None] * right + v[..., None] * down

    def to_json(self) -> dict:
        return {"view": self.view, "isocentre_mm": [float(v) for v in self.isocentre],
                "sdd_mm": float(self.sdd_mm), "sod_mm": float(self.sod_mm),
                "magnification": float(self.magnification), "rows": int(self.rows), "cols": int(self.cols),
                "pixel_spacing_mm": [float(self.pixel_mm)] * 2,
                "pixel_spacing_isocentre_mm": [float(self.pixel_mm_isocentre)] * 2,
                "offset_mm": [float(v) for v in self.offset_mm],
                "source_mm": [float(v) for v in self.source],
                "beam_direction": [float(v) for v in self.axes[0]],
                "image_right": [float(v) for v in self.axes[1]],
                "image_down": [float(v) for v in self.axes[2]]}


def project_points(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World points (..., 3) in mm -> detector pixel coordinates (..., 2), x = column, y = row."""
    beam, right, down = geometry.axes
    r = np.asarray(points, dtype=np.float64) - geometry.source
    depth = r @ beam
    if np.any(depth <= 0):
        raise ValueError("a point lies behind the source")
    scale = geometry.sdd_mm / depth / geometry.pixel_mm
    cx, cy = geometry.principal_point()
    return np.stack([(r @ right) * scale + cx, (r @ down) * scale + cy], axis=-1)


def fit_detector(volume_corners: np.ndarray, view: str, isocentre, rows: int, sdd_mm: float = 1000.0,
                 sod_mm: float = 800.0, margin: float = 0.02) -> Geometry:
    """A geometry whose detector just covers the projection of ``volume_corners`` (world mm,
    (n, 3)), ``rows`` pixels tall, square pixels, with a ``margin`` (fraction) around it."""
    probe = Geometry(view, tuple(map(float, isocentre)), sdd_mm, sod_mm, rows=1, cols=1, pixel_mm=1.0)
    uv = project_points(volume_corners, probe) - probe.principal_point()  # detector mm from the pierce point
    lo, hi = uv.min(0), uv.max(0)
    size = (hi - lo) * (1 + 2 * margin)
    pixel_mm = float(size[1] / rows)
    cols = max(1, int(math.ceil(size[0] / pixel_mm)))
    return replace(probe, rows=int(rows), cols=cols, pixel_mm=pixel_mm,
                   offset_mm=(float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2)))


def _beam_aligned(volume: Volume, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volume's array reordered to (beam, down, right) axes, indices growing along each,
    with the world position of voxel (0, 0, 0) and the voxel sides (beam, down, right).

    A grid whose axes are not parallel to the view's axes (an oblique affine) is first
    resampled trilinearly onto one that is, at its smallest voxel side.
    """
    data = np.asarray(volume.data, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    cols = volume.affine[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    unit = cols / spacing
    view_axes = np.stack(geometry.axes)  # beam, right, down
    cosines = view_axes @ unit  # (view axis, volume axis)
    match = np.abs(cosines) > 1 - 1e-6
    if (match.sum(0) == 1).all() and (match.sum(1) == 1).all():
        order = [int(np.flatnonzero(match[a])[0]) for a in (0, 2, 1)]  # volume axis of beam, down, right
        signs = [float(np.sign(cosines[a, order[n]])) for n, a in enumerate((0, 2, 1))]
        arr = np.transpose(data, order + [3])
        flips = [n for n in range(3) if signs[n] < 0]
        if flips:
            arr = np.flip(arr, axis=flips)
        first = np.array([0 if s > 0 else data.shape[order[n]] - 1 for n, s in enumerate(signs)], dtype=np.float64)
        index0 = np.zeros(3)
        index0[order] = first
        origin = volume.affine[:3, :3] @ index0 + volume.affine[:3, 3]
        return np.ascontiguousarray(arr), origin, spacing[order]
    # oblique grid: resample onto an aligned one covering the same corners
    step = float(spacing.min())
    corners = volume.corners()
    frame = np.stack([geometry.axes[0], geometry.axes[2], geometry.axes[1]])  # beam, down, right
    coords = corners @ frame.T
    lo, hi = coords.min(0), coords.max(0)
    n = np.maximum(np.ceil((hi - lo) / step).astype(int), 1)
    axes = [lo[d] + step * (np.arange(n[d]) + 0.5) for d in range(3)]
    grid_world = (axes[0][:, None, None, None] * frame[0] + axes[1][None, :, None, None] * frame[1]
                  + axes[2][None, None, :, None] * frame[2])
    index = volume.world_to_index(grid_world.reshape(-1, 3))
    shape = np.array(data.shape[:3], dtype=np.float64)
    grid = torch.from_numpy((index[:, ::-1] * (2.0 / np.maximum(shape - 1, 1))[::-1] - 1.0).copy()).float()
    vol = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, 3, 0)))[None]
    with torch.no_grad():
        out = F.grid_sample(vol, grid.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros", align_corners=True)
    arr = out[0, :, 0, 0].numpy().T.reshape(*n, data.shape[3])
    origin = frame.T @ np.array([axes[0][0], axes[1][0], axes[2][0]])
    return np.ascontiguousarray(arr), origin, np.full(3, step)


RESAMPLE_BLOCK = 128  # detector rows (columns) resampled by one matrix product


def _interpolation_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """Dense (len(coords), n) linear-interpolation weights; samples outside the grid fade to 0."""
    i0 = np.floor(coords).astype(np.int64)
    f = (coords - i0).astype(np.float32)
    w = np.zeros((len(coords), n + 2), np.float32)  # a spare column each side, dropped below
    rows = np.arange(len(coords))
    w[rows, np.clip(i0 + 1, 0, n + 1)] += 1 - f
    w[rows, np.clip(i0 + 2, 0, n + 1)] += f
    return w[:, 1:n + 1]


def _resample(values: torch.Tensor, coords: np.ndarray, dim: int) -> torch.Tensor:
    """Linear resampling of ``values`` (C, rows, cols) along ``dim`` (1 or 2) at monotonic
    ``coords`` (indices along that dimension). Block by block: each block of targets reads
    only the band of source samples under it, so the cost grows with the output alone."""
    n = values.shape[dim]
    weights = torch.from_numpy(_interpolation_weights(coords, n))
    shape = list(values.shape)
    shape[dim] = len(coords)
    out = values.new_zeros(shape)
    for b0 in range(0, len(coords), RESAMPLE_BLOCK):
        b1 = min(b0 + RESAMPLE_BLOCK, len(coords))
        lo = max(int(np.floor(min(coords[b0], coords[b1 - 1]))), 0)
        hi = min(int(np.floor(max(coords[b0], coords[b1 - 1]))) + 2, n)
        if hi <= lo:
            continue
        if dim == 1:
            out[:, b0:b1, :] = weights[b0:b1, lo:hi] @ values[:, lo:hi, :]
        else:
            out[:, :, b0:b1] = values[:, :, lo:hi] @ weights[b0:b1, lo:hi].T
    return out


def line_integrals(volume: Volume, geometry: Geometry, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Line integrals of ``volume`` (attenuation in 1/mm, or any quantity per mm) along the
    rays to each detector pixel: float32 (rows, cols), or (C, rows, cols) for a 4D volume
    (channels last). Outside the grid the volume is 0. ``box`` = (x0, y0, x1, y1) renders only
    the pixels x0 <= x < x1, y0 <= y < y1 (the rest stay 0).

    The volume is taken slice by slice across the beam: the rays cross a slice on a grid that
    is the detector's, shrunk by the slice's depth over the source-detector distance, so each
    slice is resampled bilinearly (two small matrix products) and added, each ray weighted by
    the path length the slice thickness gives it (1 / cos of its angle to the central ray).
    """
    data = np.asarray(volume.data)
    channels = data.shape[3] if data.ndim == 4 else 1
    out = np.zeros((channels, geometry.rows, geometry.cols), np.float32)
    x0, y0, x1, y1 = box if box is not None else (0, 0, geometry.cols, geometry.rows)
    x0, y0 = max(int(x0), 0), max(int(y0), 0)
    x1, y1 = min(int(x1), geometry.cols), min(int(y1), geometry.rows)
    if x1 <= x0 or y1 <= y0 or min(data.shape[:3]) == 0:
        return out if data.ndim == 4 else out[0]
    arr, origin, (s_beam, s_down, s_right) = _beam_aligned(volume, geometry)
    beam, right, down = geometry.axes
    rel = geometry.source - origin
    cx, cy = geometry.principal_point()
    u = (np.arange(x0, x1) - cx) * geometry.pixel_mm  # detector mm, image right
    v = (np.arange(y0, y1) - cy) * geometry.pixel_mm  # detector mm, image down
    vol = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, 3, 1)))  # (beam, C, down, right)
    acc = torch.zeros((channels, len(v), len(u)))
    n_down, n_right = arr.shape[1], arr.shape[2]
    threads = torch.get_num_threads()
    # many small products: one thread is faster than several that wait on each other
    torch.set_num_threads(1)
    try:
        for a in range(arr.shape[0]):
            depth = a * s_beam - rel @ beam  # distance of the slice from the source, along the beam
            if depth <= 0:
                continue
            shrink = depth / geometry.sdd_mm
            cols = (rel @ right + u * shrink) / s_right
            rows = (rel @ down + v * shrink) / s_down
            if cols.max() < -1 or cols.min() > n_right or rows.max() < -1 or rows.min() > n_down:
                continue
            acc += _resample(_resample(vol[a], cols, 2), rows, 1)
    finally:
        torch.set_num_threads(threads)
    # path length of a slice of thickness s_beam along each ray
    ds = s_beam * np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + geometry.sdd_mm ** 2) / geometry.sdd_mm
    out[:, y0:y1, x0:x1] = acc.numpy() * ds.astype(np.float32)
    return out if data.ndim == 4 else out[0]


def projected_box(volume: Volume, geometry: Geometry, pad: int = 2) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) covering the projection of a volume's grid."""
    xy = project_points(volume.corners(), geometry)
    x0, y0 = np.floor(xy.min(0)).astype(int) - pad
    x1, y1 = np.ceil(xy.max(0)).astype(int) + pad + 1
    return int(x0), int(y0), int(x1), int(y1)


# Film response, calibrated on DRRs of the VerSe CT (docs/formats.md): the window spans the
# line integrals of the pixels the body covers from the 25th percentile (soft tissue starts
# dark grey; thinner parts go black as on an exposed film) to the 99.7th (cortical bone seen
# edge-on), and a gamma above 1 darkens soft tissue and discs against bone.
FILM_LOW_PERCENTILE = 25.0
FILM_HIGH_PERCENTILE = 99.7
FILM_GAMMA = 1.3
FILM_BODY_THRESHOLD = 0.05  # line integrals below this (about 2.5 mm of water) are air


def film_response(integrals: np.ndarray, low: float | None = None, high: float | None = None,
                  gamma: float = FILM_GAMMA) -> tuple[np.ndarray, dict]:
    """Radiograph grey values in [0, 1] (bone bright) from line integrals ``-ln(I / I0)``.

    The values are windowed linearly from ``low`` to ``high`` (default: percentiles of the
    pixels the body covers) and raised to ``gamma`` (a film's characteristic curve:
    contrast grows with density). Air stays black. Returns the image and its window.
    """
    L = np.asarray(integrals, dtype=np.float32)
    body = L[L > FILM_BODY_THRESHOLD]
    if low is None or high is None:
        if body.size:
            lo, hi = np.percentile(body, [FILM_LOW_PERCENTILE, FILM_HIGH_PERCENTILE])
        else:
            lo, hi = 0.0, 1.0
        low = float(lo) if low is None else low
        high = float(hi) if high is None else high
    high = max(high, low + 1e-6)
    x = np.clip((L - low) / (high - low), 0.0, 1.0) ** gamma
    return x.astype(np.float32), {"low": float(low), "high": float(high), "gamma": float(gamma)}


def to_uint16(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16)
