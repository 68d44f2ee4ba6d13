"""A deterministic synthetic dataset in the exact layout of the Kaggle BreakHis download (docs/design.md#synthetic):
its Folds.csv, paths and 700x460 RGB PNGs, a stain colour and nucleus size per class, more images per malignant
patient."""

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medgemma_breakhis.core.logs import progress
from medgemma_breakhis.core.params import SyntheticData
from medgemma_breakhis.data.breakhis import (
    CLASS_NAMES,
    FOLDS,
    FOLDS_COLUMNS,
    FOLDS_CSV,
    IMAGE_MODE,
    IMAGE_SIZE,
    MAGNIFICATIONS,
    TUMOR_TYPE_CODES,
    binary_name,
    is_malignant,
)

IMAGE_WIDTH, IMAGE_HEIGHT = IMAGE_SIZE
YEAR = "14"

# (R, G, B) stain per class: far apart, so that even a 64x64 view separates them.
_STAIN = np.array(
    [
        (236, 160, 200),
        (150, 80, 160),
        (240, 200, 120),
        (120, 170, 230),
        (200, 90, 90),
        (90, 160, 110),
        (170, 170, 170),
        (240, 120, 40),
    ],
    dtype=np.float32,
)
_NUCLEUS_RADIUS = (6, 10, 14, 18, 8, 12, 16, 20)
_X = np.arange(IMAGE_WIDTH, dtype=np.float32)
_Y = np.arange(IMAGE_HEIGHT, dtype=np.float32)


def synthetic_filename(label: int, patient: str, magnification: int, seq: int) -> str:
    """A path relative to the dataset root, in the real Folds.csv pattern (docs/breakhis.md#file-names)."""
    tumor_type, side, code = CLASS_NAMES[label].split("_", 1)[1], binary_name(label), TUMOR_TYPE_CODES[label]
    sob = f"SOB_{side[0].upper()}_{code}"
    return (
        f"BreaKHis_v1/histology_slides/breast/{side}/SOB/{tumor_type}/{sob}_{YEAR}-{patient}/"
        f"{magnification}X/{sob}-{YEAR}-{patient}-{magnification}-{seq:03d}.png"
    )


def images_per_patient(label: int, base: int) -> int:
    return base + (base // 2 if is_malignant(label) else 0)


def render_image(label: int, patient_shift: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A smooth stained background with dark round nuclei; smooth so the PNGs stay small."""
    phase = rng.uniform(0, 2 * np.pi, size=2)
    # sin(x) * cos(y) is separable: one row times one column instead of a sine and a cosine per pixel
    shade = 12.0 * np.outer(np.cos(_Y / 70.0 + phase[1]), np.sin(_X / 90.0 + phase[0]))
    colour = np.clip(_STAIN[label] + patient_shift + rng.normal(0, 4, size=3), 0, 255).astype(np.float32)
    image = shade[..., None] + colour
    radius = _NUCLEUS_RADIUS[label]
    for cx, cy in zip(rng.uniform(0, IMAGE_WIDTH, size=40), rng.uniform(0, IMAGE_HEIGHT, size=40), strict=True):
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, IMAGE_HEIGHT))
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, IMAGE_WIDTH))
        disk = (_Y[y0:y1, None] - cy) ** 2 + (_X[None, x0:x1] - cx) ** 2 <= radius**2
        nuclei = image[y0:y1, x0:x1]
        nuclei[disk] *= 0.35
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode=IMAGE_MODE)


def generate_synthetic_breakhis(output_dir: Path, spec: SyntheticData) -> Path:
    """Write Folds.csv and the PNGs of `spec.magnifications` under `output_dir`, the same bytes for the same spec; each
    image has a generator of its own, so it never depends on which other images are drawn."""
    images, rows = [], []
    for label, index in itertools.product(range(len(CLASS_NAMES)), range(spec.patients_per_class)):
        patient, shift = (
            f"{90000 + 100 * label + index}S",
            np.random.default_rng([spec.seed, label, index]).normal(0, 8, 3),
        )
        for magnification in (m for m in MAGNIFICATIONS if m in spec.magnifications):  # Folds.csv's order
            for seq in range(1, images_per_patient(label, spec.images_per_patient) + 1):
                filename = synthetic_filename(label, patient, magnification, seq)
                rng = np.random.default_rng([spec.seed, label, index, magnification, seq])
                images.append((output_dir / filename, label, shift, rng))
                # patient-disjoint folds: in fold f the patient with index = f-1 (mod 5) of every class is in test
                rows += [
                    (fold, magnification, "test" if index % len(FOLDS) == fold - 1 else "train", filename)
                    for fold in FOLDS
                ]
    for path, label, shift, rng in progress(images, desc="synthetic images", unit="img"):
        path.parent.mkdir(parents=True, exist_ok=True)
        render_image(label, shift, rng).save(path, compress_level=1)
    folds = pd.DataFrame(rows, columns=list(FOLDS_COLUMNS)).sort_values("fold", kind="stable")
    folds.to_csv(output_dir / FOLDS_CSV, index=False)
    return output_dir
