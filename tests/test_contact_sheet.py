"""The phantom contact sheet: rows of 3D and 2D phantom films (and real films) named by generator."""
import json

import cv2
import numpy as np

from data.contact_sheet import TILE, contact_sheet, generator_name
from data.phantom import generate_dataset
from data.phantom2d import generate_dataset as generate_2d


def _set(folder, generator, version):
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text("image,fracture\n")
    (folder / "phantom.json").write_text(json.dumps({"generator": generator, "version": version}))
    return folder / "manifest.csv"


def test_generator_name_tells_3d_from_2d_sets_including_those_written_before_the_rename(tmp_path):
    assert generator_name(_set(tmp_path / "a", "data.phantom", "3d-2")) == "phantom 3D"
    assert generator_name(_set(tmp_path / "b", "data.phantom2d", "1")) == "phantom 2D"
    # the 2D generator wrote data.phantom / version 1 before the 3D phantom took the name
    assert generator_name(_set(tmp_path / "c", "data.phantom", "1")) == "phantom 2D"
    assert generator_name(tmp_path / "missing" / "manifest.csv") == "phantom"


def test_sheet_has_one_row_per_set_and_one_of_real_films(tmp_path):
    generate_dataset(tmp_path / "3d", n=3, seed=5, size=160, workers=1, progress=False)
    generate_2d(tmp_path / "2d", n=3, seed=5, size=160, workers=1, progress=False)
    real = tmp_path / "real"
    real.mkdir()
    cv2.imwrite(str(real / "film.png"), (np.random.default_rng(0).random((200, 120)) * 255).astype(np.uint8))
    out = contact_sheet(tmp_path / "3d" / "manifest.csv", tmp_path / "sheet.png", real=real, n=3,
                        also=tmp_path / "2d" / "manifest.csv")
    sheet = cv2.imread(str(out))
    assert sheet.shape[:2] == (3 * TILE[0], 3 * TILE[1])
    # the real row holds one film and two blank tiles
    real_row = sheet[2 * TILE[0]:]
    assert real_row[:, :TILE[1]].any() and not real_row[:, TILE[1]:].any()
