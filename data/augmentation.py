"""Training augmentation (albumentations), kept apart from data/transforms.py so that inference,
which reads transforms.py, does not import albumentations (about 0.5 s)."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


class RandomBrightnessContrast(A.RandomBrightnessContrast):
    """albumentations' RandomBrightnessContrast (the same parameters, drawn the same way), applied
    to float32 images in float32: albucore's float path goes through float64 and full-size arrays
    of ones, 8x the time, for results equal to within 1e-8."""

    def apply(self, img: np.ndarray, alpha: float, beta: float, **params) -> np.ndarray:
        if img.dtype != np.float32:
            return super().apply(img, alpha, beta, **params)
        out = img * np.float32(alpha)
        out += np.float32(beta)
        return np.clip(out, 0.0, 1.0, out=out)


def train_augmentation(strength: float = 1.0, flip: bool = True) -> A.Compose:
    """Geometric and photometric augmentation for radiographs (masks and keypoints follow the
    image). ``flip=False`` leaves the mirror to the caller, which must then relabel AP points."""
    return A.Compose(([A.HorizontalFlip(p=0.5)] if flip else []) + [  # lateral films face either way
        A.Affine(scale=(1 - 0.1 * strength, 1 + 0.1 * strength), rotate=(-7 * strength, 7 * strength),
                 translate_percent=(-0.05 * strength, 0.05 * strength), border_mode=cv2.BORDER_CONSTANT,
                 fill=0, fill_mask=0, p=0.8),
        A.RandomGamma(gamma_limit=(80, 125), p=0.5),
        RandomBrightnessContrast(brightness_limit=0.1 * strength, contrast_limit=0.15 * strength, p=0.5),
        A.GaussNoise(std_range=(0.0, 0.03 * strength), p=0.3),
    ], keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
