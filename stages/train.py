"""Stage `train`: LoRA fine-tuning of the base model on the training split, resumable from checkpoints.

Run: dvc repro train
     (or: python -m stages.train --images data/raw --train data/split/train.csv --adapter models/adapter
          --metrics metrics/train.json --loss plots/train_loss.csv --checkpoints checkpoints)
With execution.num_processes > 1 it starts itself again under `accelerate launch`, one process per GPU.
"""

import argparse
import os
import sys
from pathlib import Path

from medgemma_breakhis.core.files import in_main_repo
from medgemma_breakhis.core.stage import setup_stage, stage_entry
from medgemma_breakhis.train.execution import run_distributed_if_asked
from medgemma_breakhis.train.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder the split's filenames are relative to")
    parser.add_argument("--train", type=Path, required=True, help="training split CSV")
    parser.add_argument("--adapter", type=Path, required=True, help="folder for the LoRA adapter")
    parser.add_argument("--metrics", type=Path, required=True, help="training summary JSON to write")
    parser.add_argument("--loss", type=Path, required=True, help="loss curve CSV to write")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint root, shared by DVC experiments")
    arguments = sys.argv[1:] if argv is None else argv
    args, params = setup_stage(parser, arguments)
    run_distributed_if_asked(params.execution.num_processes, "stages.train", arguments)
    # a cloud job's bucket mount, where a preempted job resumes (docs/cloud.md); not a param: it changes nothing trained
    checkpoints = Path(os.environ.get("MEDGEMMA_CHECKPOINTS_DIR") or args.checkpoints)
    run_training(
        params,
        image_root=args.images,
        train_csv=args.train,
        adapter_dir=args.adapter,
        metrics_path=args.metrics,
        loss_path=args.loss,
        checkpoint_root=in_main_repo(checkpoints),
    )


if __name__ == "__main__":
    stage_entry(main)
