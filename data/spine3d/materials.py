"""The phantom's materials: attenuation at ~60 keV, calibrated on a real CT.

The table gives each material's Hounsfield units; :func:`mu` turns them into linear
attenuation (1/mm) with :func:`data.projector.hu_to_mu`, the conversion the CT projector uses,
so a procedural vertebra and a DRR of a real one are rendered on one scale.

Provenance (``python -m data.spine3d.calibrate --verse ../shared/data/verse``, 2026-12-06, the
VerSe subject sub-verse012, T10-L3, :func:`data.spine3d.calibrate.measure_verse`):

* ``trabecular``: median HU of the vertebral bodies eroded by 3 mm (the cancellous core);
  measured 114 HU. The subject has osteoporotic fractures, so this is bone of low density;
  the phantom scales it per film (``anatomy.BONE_DENSITY``: 1.1-1.6 x for normal bone, 0.6-0.95 x
  for osteoporotic bone, i.e. about 70-180 HU, the range of QCT in adults).
* ``cortical``: 95th percentile of the bodies' 1-voxel shell; measured 844 HU. A 3 x 1 x 1 mm
  CT cannot resolve a 0.5-1 mm cortex, so the shell reads low by partial volume; the table uses
  the literature's compact bone, 1500 HU (ICRU 44 cortical bone at a CT's ~70 keV), and the
  test checks only that the measured shell lies between trabecular bone and that value.
* ``soft``: median HU of the voxels outside every vertebra between -30 and 150 HU (muscle and
  organs); measured 44 HU.
* ``fat``: median HU of the voxels between -200 and -30 HU; measured -97 HU.
* ``disc``: median HU around the midpoints between neighbouring bodies' centres, outside the
  vertebra masks; measured 64 HU.
* ``air`` is -1000 HU and ``lung`` (aerated) -850 HU: the cropped CT holds neither field.
"""
from __future__ import annotations

import numpy as np

from data.projector import hu_to_mu

# Hounsfield units of each material (module docstring for where each number comes from).
MATERIAL_HU: dict[str, float] = {
    "cortical": 1500.0,
    "trabecular": 114.0,
    "soft": 44.0,
    "fat": -97.0,
    "disc": 64.0,
    "lung": -850.0,
    "air": -1000.0,
}
# what the CT measured (the table's source; cortical is not taken from it, see above)
MEASURED_HU: dict[str, float] = {"cortical_shell": 844.0, "trabecular": 114.0, "soft": 44.0,
                                 "fat": -97.0, "disc": 63.5}
MEASURE_TOLERANCE_HU = 25.0


def mu(material: str) -> float:
    """Linear attenuation (1/mm) of a material of the table."""
    return float(hu_to_mu(np.array([MATERIAL_HU[material]]))[0])
