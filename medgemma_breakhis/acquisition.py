"""The `download` stage: getting BreakHis into `data/raw` from Kaggle, a local copy, or the synthetic generator.

`data/raw` always has one layout, whatever the source: `Folds.csv` at the top and every listed image at
`data/raw/<filename as in Folds.csv>`. Later stages rely on nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from medgemma_breakhis.atomic import atomic_directory
from medgemma_breakhis.errors import DataError
from medgemma_breakhis.folds import FOLDS_CSV, read_folds
from medgemma_breakhis.logs import progress
from medgemma_breakhis.params import DataParams
from medgemma_breakhis.repository import in_main_repo
from medgemma_breakhis.synthetic import generate_synthetic_breakhis
from medgemma_breakhis.validation import lookup_problem, path_problem, validate_images

# The Kaggle download (version 4) nests the images one folder deeper than Folds.csv says (docs/breakhis.md#on-kaggle).
_IMAGE_ROOT_CANDIDATES = (".", "BreaKHis_v1")


def find_image_root(dataset_root: Path, filenames: Iterable[str]) -> Path:
    """The folder under which Folds.csv's `filename` paths resolve (the Kaggle download adds a BreaKHis_v1/ level)."""
    safe = [f for f in filenames if path_problem(f) is None]
    if not safe:
        raise DataError("no filename in Folds.csv is a relative path inside the dataset folder")
    # the first listed image that is there decides (one that is missing or unreadable is listed by validation)
    for filename in safe:
        for candidate in _IMAGE_ROOT_CANDIDATES:
            if lookup_problem(dataset_root / candidate, filename) is None:
                return dataset_root / candidate
    first = safe[0]
    tried = [dataset_root / candidate / first for candidate in _IMAGE_ROOT_CANDIDATES]
    raise DataError(
        "cannot find the images listed in Folds.csv; the first listed image is not at any of: "
        + ", ".join(str(p) for p in tried)
    )


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same file system (the usual kagglehub cache): no second copy of ~4 GB
    except OSError:
        shutil.copy2(source, target)


def import_dataset(dataset_root: Path, output_dir: Path, exclude_invalid: bool, excluded_report: Path) -> int:
    """Bring an extracted BreakHis copy into the repository layout, validated; returns the number of images."""
    if dataset_root.is_file():
        raise DataError(f"dataset folder {dataset_root} is a file; set data.path to the folder holding {FOLDS_CSV}")
    if not dataset_root.is_dir():
        raise DataError(
            f"dataset folder {dataset_root} does not exist; set data.path to the folder holding {FOLDS_CSV}"
        )
    folds = read_folds(dataset_root / FOLDS_CSV)
    image_root = find_image_root(dataset_root, folds["filename"])
    kept = validate_images(folds, image_root, exclude_invalid, excluded_report)
    filenames = list(dict.fromkeys(kept["filename"]))
    with atomic_directory(output_dir) as staging:
        if len(kept) == len(folds):
            shutil.copy2(dataset_root / FOLDS_CSV, staging / FOLDS_CSV)
        else:
            kept.to_csv(staging / FOLDS_CSV, index=False)
        for filename in progress(filenames, desc=f"importing {dataset_root}", unit="img"):
            _link_or_copy(image_root / filename, staging / filename)
    return len(filenames)


def _kaggle_credentials_hint() -> str:
    from kagglehub.config import get_kaggle_credentials

    found = "were found" if get_kaggle_credentials() is not None else "were NOT found"
    return (
        f"Kaggle credentials {found}. Set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put "
        "kaggle.json in ~/.kaggle/ (see https://www.kaggle.com/settings → API), and check network access. "
        "To run offline, use data.source=synthetic, or data.source=local with data.path set."
    )


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; returns the folder holding its files."""
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many kinds (HTTP, auth, network); all need the same advice
        raise DataError(f"downloading Kaggle dataset {handle!r} failed: {err}. {_kaggle_credentials_hint()}") from err


def prepare_raw_data(params: DataParams, output_dir: Path, excluded_report: Path) -> int:
    """The `download` stage: fill `output_dir` from the configured source, every image validated; returns the number
    of images. Images left out by `data.exclude_invalid` are listed in `excluded_report`."""
    if params.source == "synthetic":
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        # beside the output, on the same file system, so importing it hard-links rather than copies
        with tempfile.TemporaryDirectory(prefix=".synthetic-breakhis-", dir=output_dir.parent) as generated:
            root = generate_synthetic_breakhis(Path(generated), params.synthetic)
            return import_dataset(root, output_dir, params.exclude_invalid, excluded_report)
    if params.source == "local":
        # from the main repository, like the checkpoints: `dvc exp run --temp/--queue` runs in a copy elsewhere
        return import_dataset(in_main_repo(Path(params.path)), output_dir, params.exclude_invalid, excluded_report)
    return import_dataset(download_kaggle(params.kaggle_dataset), output_dir, params.exclude_invalid, excluded_report)
