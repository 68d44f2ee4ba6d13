"""The `split_balance` stage (the reference's fold, magnification and balance selection) and its split files read."""

import logging
from pathlib import Path

import pandas as pd

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.core.files import atomic_directory, atomic_write_json
from medgemma_breakhis.core.params import SplitParams
from medgemma_breakhis.data.breakhis import CLASS_NAMES, label_from_path, listing, patient_from_path, read_folds

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("filename", "label", "class_name", "patient")


def select_split(folds: pd.DataFrame, split: SplitParams) -> dict[str, pd.DataFrame]:
    """Train and test rows of one fold and magnification, balanced like the reference; keeps Folds.csv order."""
    chosen = folds[(folds["mag"] == split.magnification) & (folds["fold"] == split.fold)]
    if chosen.empty:
        raise DataError(f"Folds.csv has no rows for fold {split.fold} at {split.magnification}X")
    subsets = {}
    for group in ("train", "test"):
        rows = chosen[chosen["grp"] == group]
        if split.balance == "binary":  # as the reference does: by a substring of the path, sample(n=min), benign first
            sides = [rows[rows["filename"].str.contains(side)] for side in ("benign", "malignant")]
            rows = pd.concat([side.sample(n=min(map(len, sides)), random_state=split.seed) for side in sides])
        if rows.empty:
            raise DataError(f"the {group} split of fold {split.fold} at {split.magnification}X is empty")
        labels = rows["filename"].map(label_from_path)
        subsets[group] = pd.DataFrame(
            {
                "filename": rows["filename"],
                "label": labels,
                "class_name": labels.map(CLASS_NAMES.__getitem__),
                "patient": rows["filename"].map(patient_from_path),
            }
        ).reset_index(drop=True)
    check_patient_disjoint(subsets["train"], subsets["test"], f"fold {split.fold} at {split.magnification}X")
    return subsets


def check_patient_disjoint(train: pd.DataFrame, test: pd.DataFrame, where: str) -> None:
    """Refuse a split with a patient in both train and test, listing every image of every such patient."""
    leaked = sorted(set(train["patient"]) & set(test["patient"]))
    if not leaked:
        return
    pairs = [(patient, group, rows) for patient in leaked for group, rows in (("train", train), ("test", test))]
    lines = [f"patient {p}, {g}: {f}" for p, g, rows in pairs for f in rows.loc[rows["patient"] == p, "filename"]]
    raise DataError(
        f"{len(leaked)} patient(s) are in both train and test of {where}: {', '.join(leaked)}. "
        "BreakHis folds are patient-disjoint, so Folds.csv is damaged or not the official one; "
        "the offending images:\n  " + "\n  ".join(lines)
    )


def split_summary(subsets: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """Images and patients per split and class, and images per patient: the data summary kept as a DVC metric."""
    summary = {}
    for group, rows in subsets.items():
        per_patient = rows.groupby("patient").size()
        per_class = rows.groupby("class_name")["patient"].agg(["size", "nunique"]).reindex(CLASS_NAMES, fill_value=0)
        summary[group] = {
            "images": len(rows),
            "patients": int(rows["patient"].nunique()),
            "images_per_patient": {
                "min": int(per_patient.min()),
                "median": float(per_patient.median()),
                "max": int(per_patient.max()),
            },
            "per_class": {name: {"images": int(n), "patients": int(p)} for name, (n, p) in per_class.iterrows()},
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
        classes = {name: counts["images"] for name, counts in figures["per_class"].items()}
        logger.info("%s: %d images, %d patients, per class %s", group, figures["images"], figures["patients"], classes)
    return subsets


def read_split(path: Path, image_root: Path) -> pd.DataFrame:
    """A split CSV written by `write_split`, with its images checked to exist under `image_root`."""
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro split_balance` first")
    rows = pd.read_csv(path, dtype={"patient": str})
    if missing := [c for c in SPLIT_COLUMNS if c not in rows.columns]:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; re-run `dvc repro split_balance`")
    if missing := [str(image_root / f) for f in rows["filename"] if not (image_root / f).is_file()]:
        raise DataError(f"{len(missing)} image(s) listed in Folds.csv are missing:{listing(missing)}")
    return rows
