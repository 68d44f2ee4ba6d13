"""Stage `baseline`: score the test set with the base model, before any fine-tuning.

Run: dvc repro baseline
     (or: python -m stages.baseline --images data/raw --test data/split/test.csv --metrics metrics/baseline.json
          --headline metrics/headline/baseline.json --predictions predictions/baseline.csv --roc plots/roc_baseline.csv)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.evaluate.evaluation import run_evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder the split's filenames are relative to")
    parser.add_argument("--test", type=Path, required=True, help="test split CSV")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--headline", type=Path, help="JSON to write of the few figures `dvc exp show` lists")
    parser.add_argument("--predictions", type=Path, required=True, help="per-image predictions CSV to write")
    parser.add_argument("--roc", type=Path, required=True, help="ROC curve points CSV to write")
    args, params = setup_stage(parser, argv)
    run_evaluation(
        params,
        "baseline",
        image_root=args.images,
        test_csv=args.test,
        metrics_path=args.metrics,
        headline_path=args.headline,
        predictions_path=args.predictions,
        roc_path=args.roc,
    )


if __name__ == "__main__":
    stage_entry(main)
