"""The phantom's material table against the real CT it was calibrated on."""
import os
from pathlib import Path

import pytest

from data.projector import hu_to_mu
from data.spine3d.materials import MATERIAL_HU, MEASURED_HU, MEASURE_TOLERANCE_HU, mu

REPO = Path(__file__).resolve().parents[1]


def verse_dir() -> Path:
    return (REPO / os.environ.get("VCF_VERSE_DIR", "../shared/data/verse")).resolve()


def test_table_orders_and_converts_like_the_projector():
    assert mu("air") == 0.0 < mu("lung") < mu("fat") < mu("soft") < mu("disc") < mu("trabecular") < mu("cortical")
    assert abs(mu("cortical") - float(hu_to_mu([MATERIAL_HU["cortical"]])[0])) < 1e-9
    # the classes the CT measures are taken from it
    for name in ("trabecular", "soft", "fat", "disc"):
        assert abs(MATERIAL_HU[name] - MEASURED_HU[name]) <= 1.0


@pytest.mark.verse
@pytest.mark.skipif(not verse_dir().is_dir(), reason="the VerSe CT is not available")
def test_table_matches_the_measurement_on_the_verse_ct():
    from data.spine3d.calibrate import measure_verse

    measured = measure_verse(verse_dir())
    for name in ("trabecular", "soft", "fat", "disc"):
        assert abs(measured[name] - MATERIAL_HU[name]) <= MEASURE_TOLERANCE_HU, (name, measured[name])
    # the CT's shell reads cortical bone blurred with its neighbours: above trabecular bone, below compact bone
    assert MATERIAL_HU["trabecular"] < measured["cortical_shell"] < MATERIAL_HU["cortical"]
