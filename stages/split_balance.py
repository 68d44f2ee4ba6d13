"""Stage `split_balance`: the reference's fold/magnification filter and benign/malignant undersampling.

Run: dvc repro split_balance   (or: python -m stages.split_balance --folds data/raw/Folds.csv --out data/split)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.data import write_split
from medgemma_breakhis.logs import configure_logging
from medgemma_breakhis.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=Path, required=True, help="the dataset's Folds.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.csv and test.csv")
    args = parser.parse_args()
    configure_logging()
    params = load_params()
    write_split(args.folds, params.split, args.out)


if __name__ == "__main__":
    main()
