"""Cheaper reading of large films, with the same numbers: DICOM values through a table of the
type's values (data/readers.py), percentiles on a grid for films over 2 M pixels (data/transforms.py)."""
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from data.readers import read_image
from data.transforms import SUBSAMPLE_ABOVE, normalize_intensity
from tests.test_readers import write_dicom


def _direct(path, voi_lut):
    """The reader's rules applied to every pixel (no table): modality LUT, then the VOI window
    or the stored range, clipped to [0, 1], MONOCHROME1 inverted."""
    ds = dcmread(path)
    arr = ds.pixel_array
    modality = apply_modality_lut(arr, ds)
    if voi_lut and "WindowCenter" in ds:
        data = np.asarray(apply_voi_lut(modality, ds, index=0, prefer_lut=True), dtype=np.float64)
        lo, hi = 0.0, 2.0 ** ds.BitsStored - 1
        if ds.PixelRepresentation:
            lo, hi = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
        if "RescaleSlope" in ds:
            lo, hi = sorted((lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                             hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
    else:
        data = np.asarray(modality, dtype=np.float64)
        bits = ds.BitsStored
        values = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) if ds.PixelRepresentation else np.arange(2 ** bits)
        mapped = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
        lo, hi = mapped.min(), mapped.max()
    pixels = np.clip((data - lo) / (hi - lo), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1 - pixels
    return pixels.astype(np.float32)


@pytest.mark.parametrize("signed, photometric, attrs", [
    (False, "MONOCHROME2", {}),
    (False, "MONOCHROME1", {}),
    (True, "MONOCHROME2", {"RescaleSlope": "0.5", "RescaleIntercept": "-100"}),
    (False, "MONOCHROME2", {"WindowCenter": "2000", "WindowWidth": "1000"}),
    (True, "MONOCHROME1", {"WindowCenter": "0", "WindowWidth": "3000"}),
])
@pytest.mark.parametrize("voi_lut", [False, True])
def test_dicom_pixels_through_the_value_table_equal_the_rules_applied_to_each_pixel(tmp_path, signed, photometric,
                                                                                   attrs, voi_lut):
    rng = np.random.default_rng(0)
    arr = rng.integers(-2048, 2048, (40, 30)) if signed else rng.integers(0, 4096, (40, 30))
    path = write_dicom(tmp_path / "film.dcm", arr.astype(np.int16 if signed else np.uint16),
                       photometric=photometric, signed=signed, **attrs)
    np.testing.assert_array_equal(read_image(path, voi_lut=voi_lut).pixels, _direct(path, voi_lut))


def test_a_small_film_is_normalised_exactly_and_a_large_one_to_a_part_in_a_thousand():
    rng = np.random.default_rng(1)
    small = rng.random((100, 80), dtype=np.float32) ** 2
    lo, hi = np.percentile(small, [0.5, 99.5])
    np.testing.assert_array_equal(normalize_intensity(small), np.clip((small - lo) / (hi - lo), 0, 1).astype(np.float32))
    side = int(np.sqrt(SUBSAMPLE_ABOVE)) + 200
    large = rng.random((side, side), dtype=np.float32) ** 2
    lo, hi = np.percentile(large, [0.5, 99.5])
    fast = normalize_intensity(large)
    assert fast.dtype == np.float32 and fast.shape == large.shape
    np.testing.assert_allclose(fast, np.clip((large - lo) / (hi - lo), 0, 1), atol=1e-3)
    assert not normalize_intensity(np.full((side, side), 0.3, np.float32)).any()  # a blank film: all zeros
