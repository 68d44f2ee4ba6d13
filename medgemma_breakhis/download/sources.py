"""The `download` stage: BreakHis from Kaggle, a local copy or synthetic (docs/design.md) into `data/raw`, validated."""

import itertools
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd
from PIL import Image, ImageColor

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.core.files import atomic_directory, atomic_write_text
from medgemma_breakhis.core.logs import progress
from medgemma_breakhis.core.params import OFFLINE, DataParams, SyntheticData
from medgemma_breakhis.data import breakhis

logger = logging.getLogger(__name__)

IMAGE_WIDTH, IMAGE_HEIGHT = breakhis.IMAGE_SIZE
_IMAGE_ROOT_CANDIDATES = (".", "BreaKHis_v1")  # Kaggle's copy nests the images a level deeper (docs/breakhis.md)


def path_problem(filename: str) -> str | None:
    """Why a Folds.csv `filename` could lead outside the dataset or data/raw, if it could (checked as written)."""
    as_posix = PurePosixPath(filename.replace("\\", "/"))
    if as_posix.is_absolute() or PureWindowsPath(filename).drive:
        return "absolute path; Folds.csv paths must be relative to the dataset folder"
    if ".." in as_posix.parts:
        return "path with '..' segments; Folds.csv paths must stay inside the dataset folder"
    return None


def lookup_problem(image_root: Path, filename: str) -> str | None:
    """Why the listed file cannot be read inside `image_root`: missing, a name refused, or a symlink leading outside."""
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
    """Why the listed image cannot be used: unsafe path, missing, undecodable, wrong size or mode, or mislabelled."""
    if problem := path_problem(filename) or lookup_problem(image_root, filename):  # an unsafe path is never read
        return problem
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 million pixels (the size is checked below, before decoding) and refuses from twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image_root / filename) as image:
                if image.size != (IMAGE_WIDTH, IMAGE_HEIGHT):
                    return f"size {image.size[0]}x{image.size[1]}, expected {IMAGE_WIDTH}x{IMAGE_HEIGHT}"
                if image.mode != breakhis.IMAGE_MODE:
                    return f"mode {image.mode}, expected {breakhis.IMAGE_MODE}"
                image.load()  # decodes every pixel: a truncated or corrupt file fails here
    except Image.DecompressionBombError as err:
        return f"declares more pixels than are safe to decode: {err}"
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for files it cannot decode
        return f"does not decode: {err}"
    try:
        side = breakhis.binary_name(breakhis.label_from_path(filename))
        breakhis.patient_from_path(filename)  # split_balance needs the patient from the file name
    except ValueError as err:
        return str(err)
    if f"/{side}/" not in filename:
        return f"its tumour type is {side} but it is not under /{side}/"
    return None


def validate_images(
    folds: pd.DataFrame, image_root: Path, exclude_invalid: bool, excluded_report: Path
) -> pd.DataFrame:
    """The rows with usable images; the others go to `excluded_report`, or stop the stage unless `exclude_invalid`."""
    filenames = list(dict.fromkeys(folds["filename"]))
    problems = {
        f: problem
        for f in progress(filenames, desc="validating images", unit="img")
        if (problem := image_problem(image_root, f)) is not None
    }
    if problems and not exclude_invalid:
        listed = breakhis.listing([f"{image_root / f}: {reason}" for f, reason in problems.items()])
        raise DataError(
            f"{len(problems)} of {len(filenames)} listed image(s) cannot be used:{listed}\nFix or re-download them, or "
            f"set data.exclude_invalid=true to leave them out (they are then listed in {excluded_report})."
        )
    excluded = pd.DataFrame(list(problems.items()), columns=["filename", "reason"])
    atomic_write_text(excluded_report, excluded.to_csv(index=False))
    if problems:
        left_out = "left out %d of %d images (data.exclude_invalid=true); listed in %s"
        logger.warning(left_out, len(problems), len(filenames), excluded_report)
    return folds[~folds["filename"].isin(problems)]


def find_image_root(dataset_root: Path, filenames: Iterable[str]) -> Path:
    """The folder under which Folds.csv's `filename` paths resolve (the Kaggle download adds a BreaKHis_v1/ level)."""
    safe = [f for f in filenames if path_problem(f) is None]
    if not safe:
        raise DataError("no filename in Folds.csv is a relative path inside the dataset folder")
    for filename, candidate in itertools.product(safe, _IMAGE_ROOT_CANDIDATES):
        if lookup_problem(dataset_root / candidate, filename) is None:
            return dataset_root / candidate  # the first one there decides; validation lists those missing
    tried = ", ".join(str(dataset_root / candidate / safe[0]) for candidate in _IMAGE_ROOT_CANDIDATES)
    raise DataError(f"cannot find the images listed in Folds.csv; the first listed image is not at any of: {tried}")


def import_dataset(dataset_root: Path, output_dir: Path, exclude_invalid: bool, excluded_report: Path) -> int:
    """Bring an extracted BreakHis copy into the repository layout, validated; returns the number of images."""
    if not dataset_root.is_dir():
        problem = "is a file" if dataset_root.is_file() else "does not exist"
        raise DataError(f"dataset folder {dataset_root} {problem}; set data.path to the folder holding Folds.csv")
    folds = breakhis.read_folds(dataset_root / breakhis.FOLDS_CSV)
    image_root = find_image_root(dataset_root, folds["filename"])
    kept = validate_images(folds, image_root, exclude_invalid, excluded_report)
    filenames = list(dict.fromkeys(kept["filename"]))
    with atomic_directory(output_dir) as staging:
        if len(kept) == len(folds):
            shutil.copy2(dataset_root / breakhis.FOLDS_CSV, staging / breakhis.FOLDS_CSV)
        else:
            kept.to_csv(staging / breakhis.FOLDS_CSV, index=False)
        for filename in progress(filenames, desc=f"importing {dataset_root}", unit="img"):
            (staging / filename).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image_root / filename, staging / filename)  # kagglehub's cache: no second copy of ~4 GB
            except OSError:
                shutil.copy2(image_root / filename, staging / filename)
    return len(filenames)


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; returns the folder holding its files."""
    import kagglehub
    from kagglehub.config import get_kaggle_credentials

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many kinds (HTTP, auth, network); all need the same advice
        found = "were found" if get_kaggle_credentials() is not None else "were NOT found"
        raise DataError(
            f"downloading Kaggle dataset {handle!r} failed: {err}. Kaggle credentials {found}. Set KAGGLE_USERNAME and "
            "KAGGLE_KEY (or KAGGLE_API_TOKEN), or put kaggle.json in ~/.kaggle/ (see https://www.kaggle.com/settings → "
            f"API), and check network access; or use a local copy (-S data.source=local -S data.path=<its folder>); or run "
            f"offline: {OFFLINE}"
        ) from err


YEAR = "14"

# The stain of each class: far apart, so that even a 64x64 view separates them.
_STAIN_COLOURS = ("#eca0c8", "#9650a0", "#f0c878", "#78aae6", "#c85a5a", "#5aa06e", "#aaaaaa", "#f07828")
_STAIN = np.array([ImageColor.getrgb(colour) for colour in _STAIN_COLOURS], dtype=np.float32)
_NUCLEUS_RADIUS = (6, 10, 14, 18, 8, 12, 16, 20)
_X = np.arange(IMAGE_WIDTH, dtype=np.float32)
_Y = np.arange(IMAGE_HEIGHT, dtype=np.float32)


def synthetic_filename(label: int, patient: str, magnification: int, seq: int) -> str:
    """A path relative to the dataset root, in the real Folds.csv pattern (docs/breakhis.md#file-names)."""
    side, tumor_type = breakhis.binary_name(label), breakhis.CLASS_NAMES[label].split("_", 1)[1]
    sob = f"SOB_{side[0].upper()}_{breakhis.TUMOR_TYPE_CODES[label]}"
    return (
        f"BreaKHis_v1/histology_slides/breast/{side}/SOB/{tumor_type}/{sob}_{YEAR}-{patient}/"
        f"{magnification}X/{sob}-{YEAR}-{patient}-{magnification}-{seq:03d}.png"
    )


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
        image[y0:y1, x0:x1][disk] *= 0.35
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode=breakhis.IMAGE_MODE)


def generate_synthetic_breakhis(output_dir: Path, spec: SyntheticData) -> Path:
    """Write Folds.csv and the PNGs of `spec` under `output_dir`, each image from a seeded generator of its own."""
    images, rows = [], []
    for label, index in itertools.product(range(len(breakhis.CLASS_NAMES)), range(spec.patients_per_class)):
        patient = f"{90000 + 100 * label + index}S"
        shift = np.random.default_rng([spec.seed, label, index]).normal(0, 8, 3)
        count = spec.images_per_patient + (spec.images_per_patient // 2 if breakhis.is_malignant(label) else 0)
        for magnification in (m for m in breakhis.MAGNIFICATIONS if m in spec.magnifications):  # Folds.csv's order
            for seq in range(1, count + 1):
                filename = synthetic_filename(label, patient, magnification, seq)
                rng = np.random.default_rng([spec.seed, label, index, magnification, seq])
                images.append((output_dir / filename, label, shift, rng))
                rows += [  # patient-disjoint folds: each class's patient with index f-1 (mod 5) is in fold f's test
                    (fold, magnification, "test" if index % len(breakhis.FOLDS) == fold - 1 else "train", filename)
                    for fold in breakhis.FOLDS
                ]
    for path, label, shift, rng in progress(images, desc="synthetic images", unit="img"):
        path.parent.mkdir(parents=True, exist_ok=True)
        render_image(label, shift, rng).save(path, compress_level=1)
    folds = pd.DataFrame(rows, columns=list(breakhis.FOLDS_COLUMNS)).sort_values("fold", kind="stable")
    folds.to_csv(output_dir / breakhis.FOLDS_CSV, index=False)
    return output_dir


def prepare_raw_data(params: DataParams, output_dir: Path, excluded_report: Path) -> int:
    """The `download` stage: fill `output_dir` from the configured source, validated; returns the number of images."""
    if params.source == "synthetic":
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        # beside the output, on the same file system, so importing it hard-links rather than copies
        with tempfile.TemporaryDirectory(prefix=".synthetic-breakhis-", dir=output_dir.parent) as generated:
            root = generate_synthetic_breakhis(Path(generated), params.synthetic)
            return import_dataset(root, output_dir, params.exclude_invalid, excluded_report)
    # a relative data.path from where the stage runs, as DVC takes the dep on it (in a --temp or --queue copy: there)
    root = Path(params.path) if params.source == "local" else download_kaggle(params.kaggle_dataset)
    return import_dataset(root, output_dir, params.exclude_invalid, excluded_report)
