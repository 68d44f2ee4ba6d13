"""The cross-validation summary: mean and spread over folds of every metric the per-fold stages wrote
(cv/metrics/fold<f>-<m>x/{data,baseline,finetuned,train}.json), and its table."""

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.files import atomic_write_json, atomic_write_text
from medgemma_breakhis.core.params import CrossValidationParams, dotted_get, flatten, set_in
from medgemma_breakhis.evaluate.metrics import HEADLINE

METRICS_FILES = ("data", "baseline", "finetuned", "train")
# A breakdown, not a figure of the fold: averaging it over folds with few patients per class would mostly be noise.
NOT_AGGREGATED = frozenset({"per_class"})
_LABEL = {figure.key: figure.label for figure in HEADLINE}
# (column, metrics file, dotted key): the data's size, then headline figures, fine-tuned unless the column says baseline.
TABLE_COLUMNS = (
    ("test images", "data", "test.images"),
    ("test patients", "data", "test.patients"),
    (f"baseline {_LABEL['eight_class.accuracy']}", "baseline", "eight_class.accuracy"),
    *(
        (_LABEL[key], "finetuned", key)
        for key in ("eight_class.accuracy", "eight_class.f1_weighted", "binary.accuracy", "binary.roc_auc")
    ),
    (_LABEL["patient_level.accuracy"], "finetuned", "patient_level.accuracy"),
)


class CrossValidationError(ExpectedError, RuntimeError):
    """A fold's metrics are missing or disagree in shape with the others; the message says which and what to run."""


def fold_name(fold: int, magnification: int) -> str:
    return f"fold{fold}-{magnification}x"


def _numbers(files: dict[str, Any]) -> dict[str, float]:
    """Every numeric leaf of a fold's metrics files, by dotted key (`finetuned.binary.accuracy`)."""
    return {
        key: float(value)
        for key, value in flatten(files).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and NOT_AGGREGATED.isdisjoint(key.split("."))
    }


def summarise(folds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation, smallest and largest value over `folds` (name -> its metrics files) of every
    metric; one that a fold lacks (binary.roc_auc, where a test set holds one class) is an error, never averaged."""
    if len(folds) < 2:
        raise CrossValidationError(f"a spread needs at least two folds, got {len(folds)}")
    table = pd.DataFrame({name: _numbers(files) for name, files in folds.items()}).sort_index()
    for name in table:
        if len(extra := table.index[table[name].notna() & table.isna().any(axis=1)]):
            raise CrossValidationError(f"{name} has metrics other folds lack: {', '.join(extra)}")
    summary: dict[str, Any] = {"n_folds": len(folds), "folds": list(folds)}
    for key, stats in table.agg(["mean", "std", "min", "max"], axis=1).iterrows():
        set_in(summary, key, {name: float(value) for name, value in stats.items()})
    return summary


def read_fold_metrics(metrics_dir: Path, cv: CrossValidationParams) -> dict[int, dict[str, dict[str, Any]]]:
    """Per magnification, the metrics files of the folds `cv` asks for (and only those: stale folds are ignored)."""
    folds: dict[int, dict[str, dict[str, Any]]] = {}
    for magnification, fold in itertools.product(cv.magnifications, cv.folds):
        folder = metrics_dir / fold_name(fold, magnification)
        if missing := [f"{folder / name}.json" for name in METRICS_FILES if not (folder / f"{name}.json").is_file()]:
            raise CrossValidationError(f"missing {', '.join(missing)}: run `dvc repro cv/dvc.yaml`, which writes them")
        files = {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name in METRICS_FILES}
        folds.setdefault(magnification, {})[folder.name] = files
    return folds


def summarise_magnifications(folds: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The summary of each magnification's folds (as `read_fold_metrics` gives them), keyed e.g. "100x"."""
    return {f"{magnification}x": summarise(per_fold) for magnification, per_fold in folds.items()}


def _number_cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.3f}"


def summary_table(folds: dict[int, dict[str, dict[str, Any]]], summary: dict[str, Any]) -> str:
    """Markdown: one row per fold, then mean ± std and [min, max]; fine-tuned unless the column says baseline."""
    sections = []
    for magnification, per_fold in folds.items():
        aggregated = summary[f"{magnification}x"]
        rows = {
            name.removeprefix("fold").split("-")[0]: [
                _number_cell(dotted_get(files[file], key)) for _, file, key in TABLE_COLUMNS
            ]
            for name, files in per_fold.items()
        }
        stats = [dotted_get(aggregated, f"{file}.{key}") for _, file, key in TABLE_COLUMNS]
        rows["mean ± std"] = [f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "n/a" for s in stats]
        rows["[min, max]"] = [f"[{_number_cell(s['min'])}, {_number_cell(s['max'])}]" if s else "n/a" for s in stats]
        table = pd.DataFrame.from_dict(rows, orient="index", columns=[label for label, _, _ in TABLE_COLUMNS])
        # numparse off: tabulate would otherwise reformat the cells' fixed decimals
        markdown = table.rename_axis("fold").to_markdown(disable_numparse=True)
        sections.append(f"### {magnification}X, {aggregated['n_folds']} folds\n{markdown}")
    return "\n\n".join(sections) + "\n"


def write_summary(metrics_dir: Path, cv: CrossValidationParams, summary_path: Path, table_path: Path) -> str:
    """The `cv/dvc.yaml:summary` stage: the summary JSON (a DVC metric) and its markdown table; returns the table."""
    folds = read_fold_metrics(metrics_dir, cv)
    summary = summarise_magnifications(folds)
    table = summary_table(folds, summary)
    atomic_write_json(summary_path, summary)
    atomic_write_text(table_path, table)
    return table
