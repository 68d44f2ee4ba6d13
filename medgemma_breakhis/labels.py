"""BreakHis facts stated once: classes, the malignant rule, folds, magnifications, the image format, and labels and
patient ids derived from image paths.

Everything here follows the reference experiment (docs/reference-experiment.md) so that the same Folds.csv gives
the same labels as the blog's code.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# Index = label. 0-3 benign, 4-7 malignant, in the reference's order.
CLASS_NAMES: tuple[str, ...] = (
    "benign_adenosis",
    "benign_fibroadenoma",
    "benign_phyllodes_tumor",
    "benign_tubular_adenoma",
    "malignant_ductal_carcinoma",
    "malignant_lobular_carcinoma",
    "malignant_mucinous_carcinoma",
    "malignant_papillary_carcinoma",
)
NUM_CLASSES = len(CLASS_NAMES)

# Tumour-type folder in the BreakHis path -> label.
TUMOR_TYPE_TO_LABEL: dict[str, int] = {
    "adenosis": 0,
    "fibroadenoma": 1,
    "phyllodes_tumor": 2,
    "tubular_adenoma": 3,
    "ductal_carcinoma": 4,
    "lobular_carcinoma": 5,
    "mucinous_carcinoma": 6,
    "papillary_carcinoma": 7,
}
# Tumour-type code in BreakHis file names (SOB_B_A-…): needed to generate the synthetic layout.
TUMOR_TYPE_CODES: tuple[str, ...] = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")

MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
FOLDS: tuple[int, ...] = (1, 2, 3, 4, 5)
# Every BreakHis image is a 700x460 RGB PNG (docs/breakhis.md#images): (width, height), as PIL gives sizes.
IMAGE_SIZE: tuple[int, int] = (700, 460)
IMAGE_MODE = "RGB"

# SOB_B_A-14-22549AB-100-001.png -> tumour code, year, patient, magnification, sequence number.
_FILE_NAME = re.compile(
    r"^SOB_(?P<side>[BM])_(?P<code>[A-Z]+)-(?P<year>\d+)-(?P<patient>[^-]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$"
)


def is_malignant(label: int) -> bool:
    """Binary task of the reference: labels 4-7 are malignant."""
    return label >= NUM_CLASSES // 2


def label_from_path(filename: str) -> int:
    """Label from the tumour-type folder of a BreakHis path, like the reference's `get_label_from_filename`.

    Raises ValueError naming the path when no known tumour-type folder is in it, instead of the reference's -1.
    """
    parts = PurePosixPath(filename.replace("\\", "/").lower()).parts
    for part in parts:
        if part in TUMOR_TYPE_TO_LABEL:
            return TUMOR_TYPE_TO_LABEL[part]
    raise ValueError(f"no tumour-type folder ({', '.join(TUMOR_TYPE_TO_LABEL)}) in image path {filename!r}")


def patient_from_path(filename: str) -> str:
    """Patient id: the third hyphen field of the BreakHis file name (SOB_B_A-14-22549AB-100-001.png -> 22549AB)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    match = _FILE_NAME.match(name)
    if match is None:
        raise ValueError(
            f"image file name {name!r} does not follow the BreakHis pattern "
            "SOB_<B|M>_<type>-<year>-<patient>-<magnification>-<seq>.png"
        )
    return match["patient"]
