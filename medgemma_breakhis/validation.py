"""Whether a BreakHis image listed in Folds.csv can be used: a path that stays inside the dataset, a file that decodes
to a 700x460 RGB image, and a label that matches its folder. Only `download` runs these checks.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
from PIL import Image

from medgemma_breakhis.atomic import atomic_write_text
from medgemma_breakhis.errors import DataError
from medgemma_breakhis.labels import IMAGE_MODE, IMAGE_SIZE, is_malignant, label_from_path, patient_from_path
from medgemma_breakhis.logs import progress

logger = logging.getLogger(__name__)

EXCLUDED_COLUMNS = ("filename", "reason")


def path_problem(filename: str) -> str | None:
    """Why a Folds.csv `filename` could lead outside the dataset (where it is read) or outside data/raw (where it is
    written), if it could: Folds.csv comes from a third-party download, and is not trusted to stay inside.

    Checked on the path as written, so that a dataset folder may itself be a symlink to where the images are."""
    as_posix = PurePosixPath(filename.replace("\\", "/"))
    if as_posix.is_absolute() or PureWindowsPath(filename).drive:
        return "absolute path; Folds.csv paths must be relative to the dataset folder"
    if ".." in as_posix.parts:
        return "path with '..' segments; Folds.csv paths must stay inside the dataset folder"
    return None


def image_problem(image_root: Path, filename: str) -> str | None:
    """Why the listed image cannot be used (missing, undecodable, wrong mode or size, label against its folder)."""
    if (unsafe := path_problem(filename)) is not None:
        return unsafe  # never read, nor written under data/raw
    path = image_root / filename
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated or corrupt file fails here
            mode, size = image.mode, image.size
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for files it cannot decode
        return f"does not decode: {err}"
    if mode != IMAGE_MODE:
        return f"mode {mode}, expected {IMAGE_MODE}"
    if size != IMAGE_SIZE:
        return f"size {size[0]}x{size[1]}, expected {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
    try:
        malignant = is_malignant(label_from_path(filename))
        patient_from_path(filename)  # split_balance needs the patient from the file name
    except ValueError as err:
        return str(err)
    folder = "malignant" if "/malignant/" in filename else "benign" if "/benign/" in filename else None
    if folder != ("malignant" if malignant else "benign"):
        return (
            f"its tumour type is {'malignant' if malignant else 'benign'} but it is under "
            f"{'/' + folder + '/' if folder else 'neither /benign/ nor /malignant/'}"
        )
    return None


def validate_images(
    folds: pd.DataFrame, image_root: Path, exclude_invalid: bool, excluded_report: Path
) -> pd.DataFrame:
    """Check every listed image; return the Folds.csv rows to keep and write the excluded-images report.

    Without `exclude_invalid`, any problem stops the stage with the whole list, not the first one.
    """
    filenames = list(dict.fromkeys(folds["filename"]))
    problems = {
        f: problem
        for f in progress(filenames, desc="validating images", unit="img")
        if (problem := image_problem(image_root, f)) is not None
    }
    if problems and not exclude_invalid:
        listing = "\n  ".join(f"{image_root / f}: {reason}" for f, reason in problems.items())
        raise DataError(
            f"{len(problems)} of {len(filenames)} listed image(s) cannot be used:\n  {listing}\n"
            "Fix or re-download them, or set data.exclude_invalid=true to leave them out "
            f"(they are then listed in {excluded_report})."
        )
    excluded = pd.DataFrame(list(problems.items()), columns=list(EXCLUDED_COLUMNS))
    atomic_write_text(excluded_report, excluded.to_csv(index=False))
    if problems:
        logger.warning(
            "left out %d of %d images (data.exclude_invalid=true); listed in %s",
            len(problems),
            len(filenames),
            excluded_report,
        )
    return folds[~folds["filename"].isin(problems)]
