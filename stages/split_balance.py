"""Stage `split_balance`: the reference's fold/magnification filter and benign/malignant undersampling.

Run: dvc repro split_balance   (or: python -m stages.split_balance --folds data/raw/Folds.csv --out data/split
                                                --summary metrics/data.json)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.data.split import write_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=Path, required=True, help="the dataset's Folds.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.csv and test.csv")
    parser.add_argument("--summary", type=Path, required=True, help="JSON of images and patients by split and class")
    args, params = setup_stage(parser, argv)
    write_split(args.folds, params.split, args.out, args.summary)


if __name__ == "__main__":
    stage_entry(main)
