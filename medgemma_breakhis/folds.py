"""Folds.csv, the one file every BreakHis copy shares: its name, its columns, and reading it with every value checked.

Both `download` (which validates a copy before taking it in) and `split_balance` (which selects from it) read it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medgemma_breakhis.errors import DataError
from medgemma_breakhis.labels import FOLDS, MAGNIFICATIONS

FOLDS_CSV = "Folds.csv"
FOLDS_COLUMNS = ("fold", "mag", "grp", "filename")


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
    for column, allowed in (("fold", set(FOLDS)), ("mag", set(MAGNIFICATIONS)), ("grp", {"train", "test"})):
        bad = folds[~folds[column].isin(allowed)]
        if len(bad):
            problems.append(
                f"column {column} has {len(bad)} value(s) outside {sorted(allowed, key=str)}, first at "
                f"row {bad.index[0] + 2}: {bad[column].tolist()[0]!r}"
            )
    empty = folds["filename"].isna() | (folds["filename"].astype(str).str.strip() == "")
    if empty.any():
        problems.append(
            f"column filename is empty in {int(empty.sum())} row(s), first at row {folds.index[empty][0] + 2}"
        )
    if problems:
        raise DataError(f"{path} is malformed: " + "; ".join(problems))
    return folds
