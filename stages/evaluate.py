"""Stage `evaluate`: score the test set with the base model plus the fine-tuned LoRA adapter.

Run: dvc repro evaluate
     (or: python -m stages.evaluate --images data/raw --test data/split/test.csv --adapter models/adapter
          --metrics metrics/finetuned.json --headline metrics/headline/finetuned.json
          --predictions predictions/finetuned.csv --roc plots/roc_finetuned.csv --register)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.registry.model import register_adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder the split's filenames are relative to")
    parser.add_argument("--test", type=Path, required=True, help="test split CSV")
    parser.add_argument("--adapter", type=Path, required=True, help="LoRA adapter folder written by `train`")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--headline", type=Path, help="JSON to write of the few figures `dvc exp show` lists")
    parser.add_argument("--predictions", type=Path, required=True, help="per-image predictions CSV to write")
    parser.add_argument("--roc", type=Path, required=True, help="ROC curve points CSV to write")
    parser.add_argument("--register", action="store_true", help="register the adapter as a registry.model_name version")
    args, params = setup_stage(parser, argv)
    run_evaluation(
        params,
        "evaluate",
        image_root=args.images,
        test_csv=args.test,
        metrics_path=args.metrics,
        headline_path=args.headline,
        predictions_path=args.predictions,
        roc_path=args.roc,
        adapter_dir=args.adapter,
        register=register_adapter if args.register else None,
    )


if __name__ == "__main__":
    stage_entry(main)
