"""Whether a BreakHis image listed in Folds.csv can be used: a path that stays inside the dataset, a file that decodes
to a 700x460 RGB image, and a label that matches its folder. Only `download` runs these checks.
"""

from __future__ import annotations

import logging
import warnings
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


def lookup_problem(image_root: Path, filename: str) -> str | None:
    """Why the listed file cannot be read from inside `image_root`: missing, a name the file system refuses (too
    long, a NUL byte), or a symlink that leads outside the dataset (it would be read, and hard-linked into data/raw,
    from anywhere on this machine)."""
    path = image_root / filename
    try:
        if not path.is_file():
            return "missing"
        target = path.resolve(strict=True)
        if not target.is_relative_to(image_root.resolve()):
            return (
                f"a symlink to {target}, outside the dataset folder {image_root}; set data.path to where the images "
                "are, or copy them into the dataset"
            )
    except (OSError, ValueError) as err:  # ENAMETOOLONG, ELOOP, an embedded NUL byte
        return f"cannot be looked up: {err}"
    return None


def image_problem(image_root: Path, filename: str) -> str | None:
    """Why the listed image cannot be used (unsafe path, missing, undecodable, wrong mode or size, label against its
    folder). Mode and size are read from the file's header and checked before any pixel is decoded: a file of a few
    bytes can declare 30000x30000 pixels, gigabytes once decoded."""
    if (unsafe := path_problem(filename)) is not None:
        return unsafe  # never read, nor written under data/raw
    if (unreadable := lookup_problem(image_root, filename)) is not None:
        return unreadable
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 million pixels (the size is checked below, before decoding) and refuses from twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image_root / filename) as image:
                if image.size != IMAGE_SIZE:
                    return f"size {image.size[0]}x{image.size[1]}, expected {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
                if image.mode != IMAGE_MODE:
                    return f"mode {image.mode}, expected {IMAGE_MODE}"
                image.load()  # decodes every pixel: a truncated or corrupt file fails here
    except Image.DecompressionBombError as err:
        return f"declares more pixels than are safe to decode: {err}"
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for files it cannot decode
        return f"does not decode: {err}"
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
