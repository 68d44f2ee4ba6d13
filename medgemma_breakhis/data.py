"""Getting BreakHis into `data/raw`, reading Folds.csv, and the reference's fold/magnification/balance selection.

`data/raw` always has one layout, whatever the source: `Folds.csv` at the top and every listed image at
`data/raw/<filename as in Folds.csv>`. Later stages rely on nothing else.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
from PIL import Image
from tqdm import tqdm

from medgemma_breakhis.atomic import atomic_directory, atomic_write_json, atomic_write_text
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.labels import CLASS_NAMES, MAGNIFICATIONS, is_malignant, label_from_path, patient_from_path
from medgemma_breakhis.params import DataParams, SplitParams
from medgemma_breakhis.repository import in_main_repo
from medgemma_breakhis.synthetic import generate_synthetic_breakhis

logger = logging.getLogger(__name__)

FOLDS_CSV = "Folds.csv"
FOLDS_COLUMNS = ("fold", "mag", "grp", "filename")
SPLIT_COLUMNS = ("filename", "label", "class_name", "patient")
# The Kaggle download (version 4) nests the images one folder deeper than Folds.csv says (docs/breakhis.md#on-kaggle).
_IMAGE_ROOT_CANDIDATES = (".", "BreaKHis_v1")
# Every BreakHis image is a 700x460 RGB PNG (docs/breakhis.md#images).
IMAGE_SIZE = (700, 460)
IMAGE_MODE = "RGB"
EXCLUDED_COLUMNS = ("filename", "reason")


class DataError(ExpectedError, RuntimeError):
    """Input data that is missing, malformed or unreachable; the message names the file and the fix."""


def read_folds(path: Path) -> pd.DataFrame:
    """Read and validate a BreakHis Folds.csv, keeping its row order."""
    if not path.is_file():
        raise DataError(f"{path} not found: the dataset must have a {FOLDS_CSV} at its top level")
    try:
        folds = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV: {err}") from err
    missing = [c for c in FOLDS_COLUMNS if c not in folds.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; expected columns {', '.join(FOLDS_COLUMNS)}")
    problems = []
    for column, allowed in (("fold", {1, 2, 3, 4, 5}), ("mag", set(MAGNIFICATIONS)), ("grp", {"train", "test"})):
        bad = folds[~folds[column].isin(allowed)]
        if len(bad):
            problems.append(f"column {column} has {len(bad)} value(s) outside {sorted(allowed, key=str)}, first at "
                            f"row {bad.index[0] + 2}: {bad[column].tolist()[0]!r}")
    empty = folds["filename"].isna() | (folds["filename"].astype(str).str.strip() == "")
    if empty.any():
        problems.append(f"column filename is empty in {int(empty.sum())} row(s), "
                        f"first at row {folds.index[empty][0] + 2}")
    if problems:
        raise DataError(f"{path} is malformed: " + "; ".join(problems))
    return folds


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


def find_image_root(dataset_root: Path, filenames: Iterable[str]) -> Path:
    """The folder under which Folds.csv's `filename` paths resolve (the Kaggle download adds a BreaKHis_v1/ level)."""
    first = next((f for f in filenames if path_problem(f) is None), None)
    if first is None:
        raise DataError("no filename in Folds.csv is a relative path inside the dataset folder")
    tried = [dataset_root / candidate / first for candidate in _IMAGE_ROOT_CANDIDATES]
    for path in tried:
        if path.is_file():
            return path.parents[len(Path(first).parts) - 1]
    raise DataError(
        "cannot find the images listed in Folds.csv; the first listed image is not at any of: "
        + ", ".join(str(p) for p in tried)
    )


def check_images_exist(image_root: Path, filenames: Iterable[str]) -> None:
    missing = [f for f in filenames if not (image_root / f).is_file()]
    if missing:
        shown = "\n  ".join(str(image_root / f) for f in missing[:20])
        more = f"\n  … and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DataError(f"{len(missing)} image(s) listed in Folds.csv are missing:\n  {shown}{more}")


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
        return (f"its tumour type is {'malignant' if malignant else 'benign'} but it is under "
                f"{'/' + folder + '/' if folder else 'neither /benign/ nor /malignant/'}")
    return None


def validate_images(folds: pd.DataFrame, image_root: Path, exclude_invalid: bool,
                    excluded_report: Path) -> pd.DataFrame:
    """Check every listed image; return the Folds.csv rows to keep and write the excluded-images report.

    Without `exclude_invalid`, any problem stops the stage with the whole list, not the first one.
    """
    filenames = list(dict.fromkeys(folds["filename"]))
    problems = {f: problem for f in tqdm(filenames, desc="validating images", unit="img")
                if (problem := image_problem(image_root, f)) is not None}
    if problems and not exclude_invalid:
        listing = "\n  ".join(f"{image_root / f}: {reason}" for f, reason in problems.items())
        raise DataError(f"{len(problems)} of {len(filenames)} listed image(s) cannot be used:\n  {listing}\n"
                        "Fix or re-download them, or set data.exclude_invalid=true to leave them out "
                        f"(they are then listed in {excluded_report}).")
    excluded = pd.DataFrame(list(problems.items()), columns=list(EXCLUDED_COLUMNS))
    atomic_write_text(excluded_report, excluded.to_csv(index=False))
    if problems:
        logger.warning("left out %d of %d images (data.exclude_invalid=true); listed in %s", len(problems),
                       len(filenames), excluded_report)
    return folds[~folds["filename"].isin(problems)]


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
        raise DataError(f"dataset folder {dataset_root} does not exist; "
                        f"set data.path to the folder holding {FOLDS_CSV}")
    folds = read_folds(dataset_root / FOLDS_CSV)
    image_root = find_image_root(dataset_root, folds["filename"])
    kept = validate_images(folds, image_root, exclude_invalid, excluded_report)
    filenames = list(dict.fromkeys(kept["filename"]))
    with atomic_directory(output_dir) as staging:
        if len(kept) == len(folds):
            shutil.copy2(dataset_root / FOLDS_CSV, staging / FOLDS_CSV)
        else:
            kept.to_csv(staging / FOLDS_CSV, index=False)
        for filename in tqdm(filenames, desc=f"importing {dataset_root}", unit="img"):
            _link_or_copy(image_root / filename, staging / filename)
    return len(filenames)


def _kaggle_credentials_hint() -> str:
    from kagglehub.config import get_kaggle_credentials

    found = "were found" if get_kaggle_credentials() is not None else "were NOT found"
    return (f"Kaggle credentials {found}. Set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put "
            "kaggle.json in ~/.kaggle/ (see https://www.kaggle.com/settings → API), and check network access. "
            "To run offline, use data.source=synthetic, or data.source=local with data.path set.")


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


def _with_labels(rows: pd.DataFrame) -> pd.DataFrame:
    labels = rows["filename"].map(label_from_path)
    return pd.DataFrame({
        "filename": rows["filename"].to_numpy(),
        "label": labels.to_numpy(),
        "class_name": labels.map(lambda label: CLASS_NAMES[label]).to_numpy(),
        "patient": rows["filename"].map(patient_from_path).to_numpy(),
    })


def _balance_binary(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    # Exactly the reference's code: substring match on the path, sample(n=min) per side, benign first.
    benign = rows[rows["filename"].str.contains("benign")]
    malignant = rows[rows["filename"].str.contains("malignant")]
    n = min(len(benign), len(malignant))
    return pd.concat([benign.sample(n=n, random_state=seed), malignant.sample(n=n, random_state=seed)])


def select_split(folds: pd.DataFrame, split: SplitParams) -> dict[str, pd.DataFrame]:
    """Train and test rows of one fold and magnification, balanced like the reference; keeps Folds.csv order."""
    chosen = folds[folds["mag"] == split.magnification]
    chosen = chosen[chosen["fold"] == split.fold]
    if chosen.empty:
        raise DataError(f"Folds.csv has no rows for fold {split.fold} at {split.magnification}X")
    subsets = {}
    for group in ("train", "test"):
        rows = chosen[chosen["grp"] == group]
        if split.balance == "binary":
            rows = _balance_binary(rows, split.seed)
        if rows.empty:
            raise DataError(f"the {group} split of fold {split.fold} at {split.magnification}X is empty")
        subsets[group] = _with_labels(rows)
    check_patient_disjoint(subsets["train"], subsets["test"], f"fold {split.fold} at {split.magnification}X")
    return subsets


def check_patient_disjoint(train: pd.DataFrame, test: pd.DataFrame, where: str) -> None:
    """Refuse a split with a patient in both train and test, listing every image of every such patient.

    BreakHis folds are patient-disjoint; a leak would make test accuracy measure memorised patients.
    """
    leaked = sorted(set(train["patient"]) & set(test["patient"]))
    if not leaked:
        return
    lines = []
    for patient in leaked:
        for group, rows in (("train", train), ("test", test)):
            lines += [f"patient {patient}, {group}: {f}" for f in rows.loc[rows["patient"] == patient, "filename"]]
    raise DataError(f"{len(leaked)} patient(s) are in both train and test of {where}: {', '.join(leaked)}. "
                    "BreakHis folds are patient-disjoint, so Folds.csv is damaged or not the official one; "
                    "the offending images:\n  " + "\n  ".join(lines))


def split_summary(subsets: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """Images and patients per split and class, and images per patient: the data summary kept as a DVC metric."""
    summary = {}
    for group, rows in subsets.items():
        per_patient = rows.groupby("patient").size()
        summary[group] = {
            "images": len(rows),
            "patients": int(rows["patient"].nunique()),
            "images_per_patient": {"min": int(per_patient.min()), "median": float(per_patient.median()),
                                   "max": int(per_patient.max())},
            "per_class": {name: {"images": int((rows["class_name"] == name).sum()),
                                 "patients": int(rows.loc[rows["class_name"] == name, "patient"].nunique())}
                          for name in CLASS_NAMES},
        }
    return summary


def write_split(folds_csv: Path, split: SplitParams, output_dir: Path, summary_path: Path) -> dict[str, pd.DataFrame]:
    """The `split_balance` stage: write `<output_dir>/train.csv` and `test.csv`, and the data summary."""
    subsets = select_split(read_folds(folds_csv), split)
    with atomic_directory(output_dir) as staging:
        for group, rows in subsets.items():
            rows.to_csv(staging / f"{group}.csv", index=False)
    summary = split_summary(subsets)
    atomic_write_json(summary_path, summary)
    for group, figures in summary.items():
        logger.info("%s: %d images, %d patients, per class %s", group, figures["images"], figures["patients"],
                    {name: counts["images"] for name, counts in figures["per_class"].items()})
    return subsets


def read_split(path: Path, image_root: Path) -> pd.DataFrame:
    """A split CSV written by `write_split`, with its images checked to exist under `image_root`."""
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro split_balance` first")
    rows = pd.read_csv(path, dtype={"patient": str})
    missing = [c for c in SPLIT_COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; re-run `dvc repro split_balance`")
    check_images_exist(image_root, rows["filename"])
    return rows
