"""Stage `train`: LoRA fine-tuning of the base model on the training split.

Run: dvc repro train
     (or: python -m stages.train --images data/raw --train data/split/train.csv --adapter models/adapter
          --metrics metrics/train.json --loss plots/train_loss.csv)
"""

import argparse
from pathlib import Path

from medgemma_breakhis.logs import configure_logging
from medgemma_breakhis.params import load_params
from medgemma_breakhis.training import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder the split's filenames are relative to")
    parser.add_argument("--train", type=Path, required=True, help="training split CSV")
    parser.add_argument("--adapter", type=Path, required=True, help="folder for the LoRA adapter")
    parser.add_argument("--metrics", type=Path, required=True, help="training summary JSON to write")
    parser.add_argument("--loss", type=Path, required=True, help="loss curve CSV to write")
    args = parser.parse_args()
    configure_logging()
    params = load_params()
    run_training(params, args.images, args.train, args.adapter, args.metrics, args.loss)


if __name__ == "__main__":
    main()
