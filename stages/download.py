"""Stage `download`: put BreakHis (Kaggle, a local copy, or the synthetic offline set) into data/raw.

Run: dvc repro download   (or: python -m stages.download --out data/raw --excluded data/excluded_images.csv)
"""

import argparse
import logging
from pathlib import Path

from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.download.sources import prepare_raw_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to fill: Folds.csv and the images")
    parser.add_argument("--excluded", type=Path, required=True, help="CSV of the images left out, with the reason")
    args, params = setup_stage(parser, argv)
    count = prepare_raw_data(params.data, args.out, args.excluded)
    logging.getLogger(__name__).info("%s: %d images from source %s", args.out, count, params.data.source)


if __name__ == "__main__":
    stage_entry(main)
