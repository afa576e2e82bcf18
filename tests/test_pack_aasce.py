"""data.pack_aasce: a smaller copy of an AASCE folder that the project reads as it reads the original."""
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data.landmarks import points_array, read_aasce
from data.pack_aasce import main, pack_aasce, packed_size

REPO = Path(__file__).resolve().parents[1]
MAX_SIDE = 128
# (name, height, width): taller than MAX_SIDE, wider than MAX_SIDE, already small enough
FILMS = [("pat-1 A AP.jpg", 400, 160), ("pat-1 B AP.jpg", 150, 380), ("pat 2 A AP.jpg", 90, 60)]


def aasce_dir() -> Path:
    """The real AASCE folder: $VCF_AASCE_DIR, else ../shared/data/aasce beside the repo."""
    return (REPO / os.environ.get("VCF_AASCE_DIR", "../shared/data/aasce")).resolve()


def synthetic_film(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A film with 17 bright bodies down its middle and their corners normalised to 0..1,
    (17, 4, 2) as tl, tr, bl, br."""
    rng = np.random.default_rng(seed)
    film = cv2.GaussianBlur((40 + 20 * rng.random((h, w))).astype(np.float32), (5, 5), 0)
    corners = []
    for k in range(17):
        top, bottom = (0.04 + 0.055 * k), (0.04 + 0.055 * k + 0.04)
        left, right = 0.35 + 0.01 * (k % 3), 0.65 + 0.01 * (k % 3)
        film[int(top * h):int(bottom * h) + 1, int(left * w):int(right * w) + 1] += 150
        corners.append([[left, top], [right, top], [left, bottom], [right, bottom]])
    return np.clip(film, 0, 255).astype(np.uint8), np.array(corners)


@pytest.fixture
def aasce(tmp_path):
    root = tmp_path / "aasce src"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (name, h, w) in enumerate(FILMS):
        film, corners = synthetic_film(h, w, i)
        cv2.imwrite(str(root / "images" / name), film, [cv2.IMWRITE_JPEG_QUALITY, 95])
        flat = corners.reshape(-1, 2)
        rows.append(np.concatenate([flat[:, 0], flat[:, 1]]))
    pd.DataFrame([n for n, _, _ in FILMS]).to_csv(root / "filenames.csv", header=False, index=False)
    pd.DataFrame(np.array(rows)).to_csv(root / "landmarks.csv", header=False, index=False)
    pd.DataFrame([[10.5, 3.0, 1.25]] * len(FILMS)).to_csv(root / "angles.csv", header=False, index=False)
    (root / "README.md").write_text("# a tiny AASCE-like folder\n")
    return root


def test_packed_size_caps_the_longer_side_and_keeps_the_aspect():
    assert packed_size(2400, 1000, 1024) == (1024, 427)
    assert packed_size(500, 1300, 1024) == (394, 1024)
    assert packed_size(900, 700, 1024) == (900, 700)


def test_pack_caps_sizes_keeps_names_tables_and_content(aasce, tmp_path):
    out = tmp_path / "packed"
    summary = pack_aasce(aasce, out, max_side=MAX_SIDE, quality=90)
    assert summary["n_packed"] == 3 and summary["failed"] == []
    assert summary["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(n for n, _, _ in FILMS)
    for name in ("filenames.csv", "landmarks.csv", "angles.csv", "README.md"):
        assert (out / name).read_bytes() == (aasce / name).read_bytes()
    for name, h, w in FILMS:
        data = (out / "images" / name).read_bytes()
        assert data[:2] == b"\xff\xd8"  # JPEG, whatever the name says
        packed = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert packed.ndim == 2  # greyscale
        ph, pw = packed.shape
        assert max(ph, pw) == min(MAX_SIDE, max(h, w))
        scale = min(1.0, MAX_SIDE / max(h, w))
        assert abs(ph - h * scale) <= 0.5 and abs(pw - w * scale) <= 0.5  # aspect kept to the pixel
        original = cv2.imread(str(aasce / "images" / name), cv2.IMREAD_GRAYSCALE)
        expected = cv2.resize(original, (pw, ph), interpolation=cv2.INTER_AREA)
        assert np.abs(packed.astype(float) - expected).mean() < 3  # the same film, JPEG aside


def test_landmarks_read_the_packed_folder_as_the_original(aasce, tmp_path):
    out = tmp_path / "packed"
    pack_aasce(aasce, out, max_side=MAX_SIDE, quality=90)
    before, after = read_aasce(aasce), read_aasce(out)
    assert len(before) == len(after) == len(FILMS)
    for a, b in zip(before, after):
        assert Path(a["image"]).name == Path(b["image"]).name
        assert a["patient_id"] == b["patient_id"]
        assert len(a["vertebrae"]) == len(b["vertebrae"]) == 17
        assert [v["level"] for v in a["vertebrae"]] == [v["level"] for v in b["vertebrae"]]
        (h, w), (ph, pw) = a["size"], b["size"]
        assert (ph, pw) == packed_size(h, w, MAX_SIDE)
        scaled = points_array(a) * np.array([pw / w, ph / h])
        np.testing.assert_allclose(points_array(b), scaled, atol=1.0)
        assert bool(a["problems"]) == bool(b["problems"])


def test_corrupt_film_is_named_copied_and_the_rest_packed(aasce, tmp_path, capsys):
    bad = aasce / "images" / FILMS[1][0]
    bad.write_bytes(bad.read_bytes()[:300])  # a JPEG cut short
    out = tmp_path / "packed"
    with pytest.raises(SystemExit) as exc:
        main(["--aasce", str(aasce), "--out", str(out), "--max-side", str(MAX_SIDE)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err
    assert err.count(FILMS[1][0]) >= 2  # the line when it happened and the list at the end
    assert (out / "images" / FILMS[1][0]).read_bytes() == bad.read_bytes()  # copied unchanged
    for name, h, w in (FILMS[0], FILMS[2]):
        packed = cv2.imread(str(out / "images" / name), cv2.IMREAD_GRAYSCALE)
        assert max(packed.shape) == min(MAX_SIDE, max(h, w))
    summary = json.loads((out / "pack.json").read_text())
    assert summary["n_packed"] == 2 and [f["image"] for f in summary["failed"]] == [str(bad)]


def test_cli_prints_the_total_size(aasce, tmp_path, capsys):
    main(["--aasce", str(aasce), "--out", str(tmp_path / "packed"), "--max-side", str(MAX_SIDE)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("packed 3 of 3 films into") and "MB in all" in line


@pytest.mark.parametrize("case", ["inside", "same", "no landmarks", "bad quality"])
def test_usage_errors_exit_2_with_one_line(aasce, tmp_path, capsys, case):
    out = {"inside": aasce / "packed", "same": aasce}.get(case, tmp_path / "packed")
    if case == "no landmarks":
        (aasce / "landmarks.csv").unlink()
    args = ["--aasce", str(aasce), "--out", str(out)] + (["--quality", "0"] if case == "bad quality" else [])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (aasce / "packed").exists()


@pytest.mark.aasce
@pytest.mark.skipif(not aasce_dir().is_dir(), reason="real AASCE films not available")
def test_real_films_pack_and_read_alike(tmp_path):
    """Six real films (a folder of their rows): packed at the default size, read alike."""
    src, subset = aasce_dir(), tmp_path / "subset"
    (subset / "images").mkdir(parents=True)
    names = pd.read_csv(src / "filenames.csv", header=None, dtype=str)[0].tolist()[:6]
    landmarks = (src / "landmarks.csv").read_text().splitlines()[:6]
    for name in names:
        shutil.copy(src / "images" / name, subset / "images" / name)
    (subset / "filenames.csv").write_text("\n".join(names) + "\n")
    (subset / "landmarks.csv").write_text("\n".join(landmarks) + "\n")
    out = tmp_path / "packed"
    summary = pack_aasce(subset, out)
    assert summary["n_packed"] == 6
    before, after = read_aasce(subset), read_aasce(out)
    for a, b in zip(before, after):
        (h, w), (ph, pw) = a["size"], b["size"]
        assert max(ph, pw) == 1024 and max(h, w) > 1024
        np.testing.assert_allclose(points_array(b), points_array(a) * np.array([pw / w, ph / h]), atol=1.0)
        assert bool(a["problems"]) == bool(b["problems"])
    # about 32 kB a film at quality 80 (481 films: 15.6 MB); far below the originals
    assert summary["image_bytes"] < 0.5 * summary["source_image_bytes"]
