"""BreakHis stated once: classes, folds, magnifications, image format, paths, a checked Folds.csv (docs/breakhis.md)."""

import re
import typing
from pathlib import Path, PurePosixPath

import pandas as pd

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.core.params import Fold, Magnification

CLASS_NAMES: tuple[str, ...] = (  # index = label, in the reference's order: 0-3 benign, 4-7 malignant
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
# Tumour-type folder in a BreakHis path -> label, and its code in file names (SOB_B_A-…).
TUMOR_TYPE_TO_LABEL: dict[str, int] = {name.split("_", 1)[1]: label for label, name in enumerate(CLASS_NAMES)}
TUMOR_TYPE_CODES: tuple[str, ...] = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
MAGNIFICATIONS: tuple[int, ...] = typing.get_args(Magnification)
FOLDS: tuple[int, ...] = typing.get_args(Fold)
IMAGE_SIZE: tuple[int, int] = (700, 460)  # every BreakHis image is a 700x460 RGB PNG: (width, height), as in PIL
IMAGE_MODE = "RGB"
FOLDS_CSV = "Folds.csv"
FOLDS_COLUMNS = ("fold", "mag", "grp", "filename")

_FILE_NAME = re.compile(  # SOB_B_A-14-22549AB-100-001.png -> code, year, patient, magnification, sequence number
    r"^SOB_(?P<side>[BM])_(?P<code>[A-Z]+)-(?P<year>\d+)-(?P<patient>[^-]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$"
)


def is_malignant(label: int) -> bool:
    """The reference's binary task: labels 4-7 are malignant."""
    return label >= NUM_CLASSES // 2


def binary_name(label: int) -> str:
    return "malignant" if is_malignant(label) else "benign"


def label_from_path(filename: str) -> int:
    """The label of a BreakHis path's tumour-type folder; ValueError naming the path where it has none."""
    for part in PurePosixPath(filename.replace("\\", "/").lower()).parts:
        if part in TUMOR_TYPE_TO_LABEL:
            return TUMOR_TYPE_TO_LABEL[part]
    raise ValueError(f"no tumour-type folder ({', '.join(TUMOR_TYPE_TO_LABEL)}) in image path {filename!r}")


def patient_from_path(filename: str) -> str:
    """The patient id: the third hyphen field of the file name (SOB_B_A-14-22549AB-100-001.png -> 22549AB)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if (match := _FILE_NAME.match(name)) is None:
        raise ValueError(
            f"image file name {name!r} does not follow the BreakHis pattern "
            "SOB_<B|M>_<type>-<year>-<patient>-<magnification>-<seq>.png"
        )
    return match["patient"]


def listing(lines: list[str], limit: int = 20) -> str:
    """`lines` indented one per line, the first `limit` of them and then how many more: an error stays readable."""
    more = [f"… and {len(lines) - limit} more"] if len(lines) > limit else []
    return "".join(f"\n  {line}" for line in lines[:limit] + more)


def read_folds(path: Path) -> pd.DataFrame:
    """A BreakHis Folds.csv, every value checked, in its row order."""
    if not path.is_file():
        raise DataError(f"{path} not found: the dataset must have a {FOLDS_CSV} at its top level")
    try:
        folds = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV: {err}") from err
    if missing := [c for c in FOLDS_COLUMNS if c not in folds.columns]:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; expected columns {', '.join(FOLDS_COLUMNS)}")
    if folds.empty:
        raise DataError(f"{path} lists no images: it has its header and no rows")
    values = (("fold", set(FOLDS)), ("mag", set(MAGNIFICATIONS)), ("grp", {"train", "test"}))
    bad = {f"a {column} outside {sorted(allowed, key=str)}": ~folds[column].isin(allowed) for column, allowed in values}
    bad["an empty filename"] = folds["filename"].isna() | (folds["filename"].astype(str).str.strip() == "")
    # a repeated row counts its image twice: in the test set, or as many times in training
    bad["the fold, mag, grp and filename of an earlier row"] = folds.duplicated(list(FOLDS_COLUMNS))
    problems = [
        f"{rows.sum()} row(s) with {what}, first at row {', '.join(str(i + 2) for i in folds.index[rows][:5])}: "
        + ",".join(map(str, folds[rows].iloc[0]))
        for what, rows in bad.items()
        if rows.any()
    ]
    if problems:
        raise DataError(f"{path} is malformed: " + "; ".join(problems))
    return folds
