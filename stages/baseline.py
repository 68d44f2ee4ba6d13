"""Stage `baseline`: score the test set with the base model, before any fine-tuning; with --probe, also a linear probe
on its frozen image features, fitted on the training split (its files beside the baseline's, named `probe`).

Run: dvc repro baseline
     (or: python -m stages.baseline --images data/raw --test data/split/test.csv --metrics metrics/baseline.json
          --headline metrics/headline/baseline.json --predictions predictions/baseline.csv --roc plots/roc_baseline.csv
          --probe data/split/train.csv)
"""

import argparse
from functools import partial
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.data.split import read_split
from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.evaluate.scoring import probe_predictions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder the split's filenames are relative to")
    parser.add_argument("--test", type=Path, required=True, help="test split CSV")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--headline", type=Path, help="JSON to write of the few figures `dvc exp show` lists")
    parser.add_argument("--predictions", type=Path, required=True, help="per-image predictions CSV to write")
    parser.add_argument("--roc", type=Path, required=True, help="ROC curve points CSV to write")
    parser.add_argument("--probe", type=Path, metavar="TRAIN_CSV", help="also a linear probe fitted on this split")
    args, params = setup_stage(parser, argv)
    outputs = {"metrics_path": args.metrics, "predictions_path": args.predictions, "roc_path": args.roc}
    run_evaluation(
        params, "baseline", image_root=args.images, test_csv=args.test, headline_path=args.headline, **outputs
    )
    if args.probe is not None:
        probed = {key: path.with_stem(path.stem.replace("baseline", "probe")) for key, path in outputs.items()}
        run_evaluation(
            params,
            "probe",
            image_root=args.images,
            test_csv=args.test,
            headline_path=args.headline and args.headline.with_stem("probe"),
            predict=partial(probe_predictions, train=read_split(args.probe, args.images)),
            **probed,
        )


if __name__ == "__main__":
    stage_entry(main)
