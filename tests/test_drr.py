"""Radiographs from labelled CT: the cone-beam projector, body separation, the six points and
their grade, the command line's outputs and errors, and the real VerSe CT."""
import json
import os
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from data.drr import (body_points, label_centroids, main, render_ct, separate_body,
                      vertebra_frames)
from data.landmarks import read_vertebrae_csv
from data.manifest import load_manifest
from data.morphometry import grade_vertebrae
from data.projector import Geometry, Volume, film_response, fit_detector, hu_to_mu, line_integrals, project_points

REPO = Path(__file__).resolve().parents[1]


def verse_dir() -> Path:
    """The real VerSe CT: $VCF_VERSE_DIR, else ../shared/data/verse beside the repo."""
    return (REPO / os.environ.get("VCF_VERSE_DIR", "../shared/data/verse")).resolve()


# ----------------------------------------------------------------------------- projector


def box_volume(lo_mm, hi_mm, mu=0.05, spacing=1.0, extent=40.0) -> Volume:
    """A cube of side 2 * extent mm centred on the origin, attenuation ``mu`` inside a box."""
    n = int(2 * extent / spacing)
    centres = -extent + spacing * (np.arange(n) + 0.5)
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    inside = ((x >= lo_mm[0]) & (x <= hi_mm[0]) & (y >= lo_mm[1]) & (y <= hi_mm[1])
              & (z >= lo_mm[2]) & (z <= hi_mm[2]))
    return Volume.from_spacing(np.where(inside, mu, 0.0).astype(np.float32), (spacing,) * 3,
                               (centres[0],) * 3)


@pytest.mark.parametrize("view", ["lateral_left", "lateral_right", "ap"])
def test_projected_box_corners_land_on_the_rendered_box_edges(view):
    lo, hi = np.array([-12.0, -4.0, 6.0]), np.array([8.0, 20.0, 30.0])
    volume = box_volume(lo, hi)
    geometry = fit_detector(volume.corners(), view, (0.0, 0.0, 0.0), rows=200, sdd_mm=600.0, sod_mm=400.0)
    image = line_integrals(volume, geometry)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    xy = project_points(corners, geometry)
    ys, xs = np.nonzero(image > 0.01 * image.max())
    # the box's silhouette is the hull of its projected corners (near face magnified more than
    # the far one: the double contour of an edge seen off the central ray)
    assert abs(xs.min() - xy[:, 0].min()) < 1.5 and abs(xs.max() - xy[:, 0].max()) < 1.5
    assert abs(ys.min() - xy[:, 1].min()) < 1.5 and abs(ys.max() - xy[:, 1].max()) < 1.5


def test_magnification_and_line_integral_on_the_central_ray():
    geometry = Geometry("lateral_right", (0.0, 0.0, 0.0), sdd_mm=1000.0, sod_mm=800.0, rows=101, cols=101,
                        pixel_mm=0.5)
    beam, right, down = geometry.axes
    centre = geometry.principal_point()
    assert np.allclose(project_points(np.zeros(3), geometry), centre)
    # 10 mm off the central ray at the isocentre: magnified SDD / SOD
    assert np.allclose(project_points(10 * right, geometry) - centre, [10 * 1.25 / 0.5, 0], atol=1e-9)
    # 30 mm nearer the source, 40 mm down: magnified SDD / (SOD - 30)
    shifted = project_points(-30 * beam + 40 * down, geometry) - centre
    assert np.allclose(shifted, [0, 40 * 1000 / 770 / 0.5], atol=1e-9)
    assert np.isclose(geometry.pixel_mm_isocentre, 0.4)
    # the near and far rims of an endplate 40 mm below the central ray, 60 mm apart along the
    # beam, land 40 x (1000/770 - 1000/830) mm apart: the double contour of divergence
    far = project_points(30 * beam + 40 * down, geometry) - centre
    assert (shifted[1] - far[1]) * 0.5 == pytest.approx(40 * (1000 / 770 - 1000 / 830))
    # 20 mm of mu = 0.05 /mm along the central ray: line integral 1.0
    volume = box_volume([-10, -10, -10], [10, 10, 10], mu=0.05, spacing=0.5, extent=20)
    image = line_integrals(volume, geometry)
    assert image[50, 50] == pytest.approx(1.0, rel=0.03)


def test_oblique_volume_projects_like_an_aligned_one():
    volume = box_volume([-10, -6, -8], [10, 14, 12], spacing=1.0, extent=24)
    geometry = fit_detector(volume.corners(), "ap", (0.0, 0.0, 0.0), rows=96)
    aligned = line_integrals(volume, geometry)
    # the same volume stored with its axes permuted and flipped
    permuted = np.flip(np.transpose(volume.data, (2, 0, 1)), axis=0)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    affine[0, 1] = affine[1, 2] = 1.0
    affine[2, 0] = -1.0
    affine[:3, 3] = volume.affine[:3, 3] + np.array([0, 0, (volume.data.shape[2] - 1) * 1.0])
    again = line_integrals(Volume(np.ascontiguousarray(permuted), affine), geometry)
    assert np.abs(again - aligned).max() < 1e-4
    # and turned by 30 degrees about the beam: the same total attenuation
    turn = np.eye(4)
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    turn[0, 0], turn[0, 2], turn[2, 0], turn[2, 2] = c, -s, s, c
    turned = line_integrals(Volume(volume.data, turn @ volume.affine), geometry)
    assert turned.sum() == pytest.approx(aligned.sum(), rel=0.02)


def test_hu_map_and_film_make_bone_bright():
    mu = hu_to_mu(np.array([-1000.0, 0.0, 1000.0]))
    assert mu[0] == 0 and mu[1] == pytest.approx(0.0206) and mu[2] > 2 * mu[1]
    film, window = film_response(np.array([[0.0, 2.0, 2.5, 3.0]]), low=2.0, high=3.0)
    assert film[0, 0] == 0 and film[0, 1] == 0 and film[0, 3] == 1 and 0 < film[0, 2] < 0.5


# ----------------------------------------------------------------------------- synthetic spine

LEVEL_LABELS = {"T12": 19, "L1": 20, "L2": 21}
SPACING = 1.0


def synthetic_spine(wedge_anterior: float = 0.65, open_ring: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU and label arrays (1 mm voxels, i = right, j = anterior, k = superior) of three
    vertebrae: a body (40 wide, 28 deep, 24 tall), a ring round the canal behind it and a
    spinous process (``open_ring``: no lamina over the canal). L1's body is a wedge: its front
    is ``wedge_anterior`` of its back's height."""
    shape = (64, 110, 110)
    i, j, k = np.meshgrid(*(np.arange(n) * SPACING for n in shape), indexing="ij")
    x, y = i - 32.0, j - 60.0  # right, anterior from the canal's axis line
    hu = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int16)
    for n, (level, label) in enumerate(LEVEL_LABELS.items()):
        z0 = 90.0 - 32.0 * n  # body centre height, head first
        height = np.full(shape, 24.0)
        if level == "L1":  # 24 mm at the back (y = 5) down to wedge_anterior * 24 at the front (y = 33)
            height = 24.0 * (1 - (1 - wedge_anterior) * np.clip((y - 5.0) / 28.0, 0, 1))
        dz = k - z0
        body = (np.abs(x) <= 20) & (y >= 5) & (y <= 33) & (dz <= 12) & (dz >= 12 - height)
        radius = np.hypot(x, y + 5.0)  # the canal, 8 mm across, centred 5 mm behind the body
        ring = (radius > 8) & (radius <= 13) & (np.abs(dz - 2) <= 7) & (y < 6)
        if open_ring:  # no lamina over the canal: the canal is not enclosed on any slice
            ring &= np.abs(x) > 6
        spinous = (np.abs(x) <= 3) & (y < -17) & (y >= -40) & (np.abs(dz - 2) <= 6)
        vertebra = body | ring | spinous
        labels[vertebra] = label
        hu[body] = 250.0
        hu[ring | spinous] = 700.0
    return hu, labels, np.diag([SPACING, SPACING, SPACING, 1.0])


@pytest.mark.parametrize("open_ring", [False, True])
def test_body_separation_keeps_only_the_body(open_ring):
    hu, labels, affine = synthetic_spine(wedge_anterior=1.0, open_ring=open_ring)
    centroids = label_centroids(labels, affine)
    frames = vertebra_frames(centroids)
    assert list(centroids) == [19, 20, 21]
    assert np.allclose(frames[20], np.eye(3), atol=1e-6)
    body = separate_body(labels, affine, 20, frames[20])
    i, j, k = np.nonzero(body)
    y = j - 60.0
    truth = (labels == 20) & (np.arange(110)[None, :, None] - 60.0 >= 5)
    assert y.min() >= 3  # nothing of the ring or the spinous process behind the canal's front
    assert body.sum() >= 0.93 * truth.sum()
    assert (np.abs(i - 32.0) <= 20).all()


def test_wedge_body_points_give_its_genant_grade():
    hu, labels, affine = synthetic_spine(wedge_anterior=0.65)
    centroids = label_centroids(labels, affine)
    frames = vertebra_frames(centroids)
    points = [body_points(separate_body(labels, affine, k, frames[k]), affine, frames[k]) for k in centroids]
    lateral = np.array([p["lateral"] for p in points])
    # 3D points: superior endplate at the top (z = body top), anterior point in front
    assert np.allclose(lateral[0, :3, 2], 90 + 12, atol=0.8) and lateral[0, 0, 1] > lateral[0, 2, 1]
    for view in ("lateral_left", "lateral_right"):
        volume = Volume(labels.astype(np.float32), affine)
        geometry = fit_detector(volume.corners(), view, np.mean(list(centroids.values()), axis=0), rows=256)
        xy = np.array([project_points(p, geometry) for p in lateral])
        grades = [g["genant_grade"] for g in grade_vertebrae(xy)]
        assert grades == [0, 2, 0], grades  # front 0.65 x back, 6 % inside the wall: about 33 % loss


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("drr")
    hu, labels, affine = synthetic_spine()
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(root / "case_ct.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "case_msk.nii.gz"))
    (root / "grades.csv").write_text("level,genant_grade,morphology,acute\nT12,0,,\nL1,2,wedge,1\nL2,0,,\n")
    out = root / "out"
    main(["--ct", str(root / "case_ct.nii.gz"), "--mask", str(root / "case_msk.nii.gz"),
          "--grades", str(root / "grades.csv"), "--out", str(out), "--size", "160",
          "--preview", str(root / "preview.png")])
    return root, out


def test_cli_writes_a_dataset_the_project_reads(synthetic_case):
    root, out = synthetic_case
    manifest = load_manifest(out / "manifest.csv")
    assert list(manifest.images["view"]) == ["lateral", "lateral", "ap"]
    assert (manifest.images["patient_id"] == "case").all()
    assert (manifest.images["fracture"] == 1).all() and (manifest.images["acute"] == 1).all()
    records = read_vertebrae_csv(out / "vertebrae.csv")
    assert len(records) == 3
    drr = json.loads((out / "drr.json").read_text())["images"]
    for rec in records:
        rel = str(Path(rec["image"]).relative_to(out.resolve()))
        geometry = drr[rel]
        assert geometry["pixel_spacing_mm"][0] == pytest.approx(
            geometry["pixel_spacing_isocentre_mm"][0] * geometry["magnification"])
        assert [v["level"] for v in rec["vertebrae"]] == ["T12", "L1", "L2"]
        assert [v["genant_grade"] for v in rec["vertebrae"]] == [0, 2, 0]
        assert rec["vertebrae"][1]["morphology"] == "wedge" and rec["vertebrae"][1]["acute"] == 1
        film = cv2.imread(rec["image"], cv2.IMREAD_UNCHANGED)
        assert film.dtype == np.uint16 and film.shape == (160, geometry["cols"])
        # the truth re-measures as the grades file says
        symmetric = geometry["view"] == "ap"
        measured = [g["genant_grade"] for g in grade_vertebrae(np.array([v["points"] for v in rec["vertebrae"]]),
                                                               symmetric=symmetric)]
        if not symmetric:
            assert measured == [0, 2, 0]
        # on the AP film p1 is left of p3 on the image
        for v in rec["vertebrae"]:
            assert v["points"][0, 0] < v["points"][2, 0] or not symmetric
    assert (root / "preview.png").is_file()


def test_a_second_ct_adds_its_films_and_a_rerun_replaces_them(synthetic_case, tmp_path):
    root, out = synthetic_case
    target = tmp_path / "out"
    for patient in ("a", "b", "a"):
        render_ct(root / "case_ct.nii.gz", root / "case_msk.nii.gz", target, views=("ap",), size=64,
                  patient_id=patient, progress=False)
    manifest = load_manifest(target / "manifest.csv")
    assert sorted(manifest.images["patient_id"]) == ["a", "b"]
    assert len(manifest.vertebrae) == 6
    assert (manifest.images["fracture"].isna()).all()  # no grades file: unknown


def test_bad_inputs_give_one_line_errors(synthetic_case, tmp_path, capsys):
    root, _ = synthetic_case
    ct, mask = root / "case_ct.nii.gz", root / "case_msk.nii.gz"
    hu, labels, affine = synthetic_spine()
    nib.save(nib.Nifti1Image(labels[:, :, :50], affine), str(tmp_path / "small.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros_like(labels), affine), str(tmp_path / "empty.nii.gz"))
    (tmp_path / "bad_grades.csv").write_text("level,genant_grade\nL9,1\n")
    cases = [
        (["--ct", str(tmp_path / "nowhere.nii.gz"), "--mask", str(mask)], "nowhere.nii.gz: CT file not found"),
        (["--ct", str(ct), "--mask", str(tmp_path / "small.nii.gz")], "does not match the CT"),
        (["--ct", str(ct), "--mask", str(tmp_path / "empty.nii.gz")], "no vertebra labels"),
        (["--ct", str(ct), "--mask", str(mask), "--grades", str(tmp_path / "bad_grades.csv")], "unknown level 'L9'"),
        (["--ct", str(ct), "--mask", str(mask), "--views", "oblique"], "unknown view 'oblique'"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(args + ["--out", str(tmp_path / "o"), "--size", "32"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- the real CT


@pytest.mark.verse
@pytest.mark.skipif(not verse_dir().is_dir(), reason="the VerSe CT is not available")
def test_verse_ct_bodies_points_and_fractures(tmp_path):
    folder = verse_dir()
    grades = tmp_path / "grades.csv"
    grades.write_text("level,genant_grade\nT10,0\nT11,0\nT12,0\nL1,3\nL2,0\nL3,1\n")
    result = render_ct(folder / "sub-verse012_ct.nii.gz", folder / "sub-verse012_seg-vert_msk.nii.gz",
                       tmp_path / "out", grades, size=384, progress=False)
    records = read_vertebrae_csv(tmp_path / "out" / "vertebrae.csv")
    assert len(records) == 3
    for rec in records:
        levels = [v["level"] for v in rec["vertebrae"]]
        assert levels == ["T10", "T11", "T12", "L1", "L2", "L3"]
        row = next(r for r in result["images"] if rec["image"].endswith(r["image"]))
        bodies = cv2.imread(str(tmp_path / "out" / row["mask"]), cv2.IMREAD_UNCHANGED)
        for k, v in enumerate(rec["vertebrae"], start=1):
            near_body = cv2.dilate((bodies == k).astype(np.uint8), np.ones((5, 5), np.uint8))
            for x, y in np.round(v["points"]).astype(int):
                assert near_body[y, x], (rec["image"], v["level"], x, y)
        if rec["view"] == "lateral":
            pts = np.array([v["points"] for v in rec["vertebrae"]])
            graded = grade_vertebrae(pts)
            ratios = [min(g["heights"]) / max(g["heights"]) for g in graded]
            assert int(np.argmin(ratios)) == levels.index("L1")
            assert graded[levels.index("L1")]["genant_grade"] == 3
            loss = [g["height_loss"] for g in graded]
            normal = [loss[levels.index(level)] for level in ("T10", "T11", "T12", "L2")]
            l3 = graded[levels.index("L3")]
            assert l3["genant_grade"] >= 1 or l3["height_loss"] > max(normal)
