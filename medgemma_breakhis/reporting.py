"""Baseline vs fine-tuned metrics of one DVC experiment, as a table for the terminal.

Run: python -m medgemma_breakhis.reporting <experiment name>
"""

from __future__ import annotations

import argparse
from typing import Any

import dvc.api

ROWS = (
    ("8-class accuracy", "eight_class.accuracy"),
    ("8-class F1 (weighted)", "eight_class.f1_weighted"),
    ("binary accuracy", "binary.accuracy"),
    ("binary F1 (malignant)", "binary.f1_malignant"),
    ("test images", "n_images"),
)


def experiment_metrics(name: str) -> dict[str, Any]:
    """The `dvc exp show` row of experiment `name`."""
    for row in dvc.api.exp_show():
        if row.get("Experiment") == name:
            return row
    raise LookupError(f"no DVC experiment named {name!r}; `dvc exp show` lists them")


def comparison_table(row: dict[str, Any]) -> str:
    lines = [f"{'metric':<24}{'baseline':>10}{'fine-tuned':>12}"]
    for label, key in ROWS:
        base, tuned = row[f"metrics/baseline.json:{key}"], row[f"metrics/finetuned.json:{key}"]
        # `dvc exp show` may return counts as floats.
        cells = [f"{int(v):>10d}" if key == "n_images" else f"{v:>10.3f}" for v in (base, tuned)]
        lines.append(f"{label:<24}{cells[0]}  {cells[1]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", help="a DVC experiment name, as `dvc exp show` lists it")
    args = parser.parse_args()
    print(f"Experiment {args.experiment}: test-set metrics")
    print(comparison_table(experiment_metrics(args.experiment)))


if __name__ == "__main__":
    main()
