"""How the phantoms and the fracture simulator draw fractures: grade loss ranges, grade and shape
probabilities for acute and chronic fractures, and where along the spine fractures happen."""
from __future__ import annotations

# Height-loss ranges per grade, kept clear of the grade boundaries so that the grade measured
# from the points is unambiguous.
LOSS_RANGE = {1: (0.21, 0.24), 2: (0.27, 0.37), 3: (0.44, 0.60)}
ACUTE_GRADE_P = (0.45, 0.40, 0.15)  # acute fractures collapse less
CHRONIC_GRADE_P = (0.15, 0.40, 0.45)
ACUTE_SHAPE_P = {"wedge": 0.45, "biconcave": 0.35, "crush": 0.20}
CHRONIC_SHAPE_P = {"wedge": 0.60, "biconcave": 0.20, "crush": 0.20}
# Where fractures happen: mostly the thoracolumbar junction and the mid-thoracic spine.
LEVEL_FRACTURE_WEIGHT = {
    "T4": 0.4, "T5": 0.6, "T6": 1.0, "T7": 1.2, "T8": 1.0, "T9": 0.7, "T10": 0.8,
    "T11": 1.4, "T12": 2.0, "L1": 2.0, "L2": 1.4, "L3": 0.8, "L4": 0.6, "L5": 0.4,
}
