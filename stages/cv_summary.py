"""Stage `summary` of cv/dvc.yaml: the mean and spread over the cross-validation folds of every metric.

Run: dvc repro cv/dvc.yaml
     (or: python -m stages.cv_summary --metrics cv/metrics --out cv/summary.json --table cv/summary.md)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.report.cross_validation import write_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the per-fold metrics folders")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON to write (mean, std, min, max)")
    parser.add_argument("--table", type=Path, required=True, help="markdown table to write, one row per fold")
    args, params = setup_stage(parser, argv)
    print(write_summary(args.metrics, params.cv, args.out, args.table), end="")


if __name__ == "__main__":
    stage_entry(main)
