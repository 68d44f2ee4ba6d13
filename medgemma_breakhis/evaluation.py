"""The `baseline` and `evaluate` stages: score the test set with the base model, or base + adapter."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import mlflow
from peft import PeftModel

from medgemma_breakhis.atomic import atomic_write_json
from medgemma_breakhis.data import read_split
from medgemma_breakhis.modeling import load_base_model
from medgemma_breakhis.params import Params
from medgemma_breakhis.scoring import evaluate_split
from medgemma_breakhis.tracking import stage_run

logger = logging.getLogger(__name__)


def run_evaluation(params: Params, stage: str, image_root: Path, test_csv: Path, metrics_path: Path,
                   adapter_dir: Path | None = None) -> dict[str, Any]:
    """Score the test split and write the metrics JSON; with `adapter_dir`, the adapter is applied unmerged.

    Unmerged, because merging LoRA into bf16 weights shifts logits enough to flip predictions (REFERENCE.md §4).
    """
    rows = read_split(test_csv, image_root)
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {adapter_dir}; run `dvc repro train` first")
    with stage_run(stage, params):
        model, processor, info = load_base_model(params.model, params.eval.precision)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        mlflow.set_tags({f"loaded_{k}": v for k, v in dataclasses.asdict(info).items()})
        metrics = evaluate_split(model, processor, rows, image_root, params.eval.batch_size)
        atomic_write_json(metrics_path, metrics)
        mlflow.log_metrics({
            "eight_class_accuracy": metrics["eight_class"]["accuracy"],
            "eight_class_f1_weighted": metrics["eight_class"]["f1_weighted"],
            "binary_accuracy": metrics["binary"]["accuracy"],
            "binary_f1_malignant": metrics["binary"]["f1_malignant"],
        })
        mlflow.log_artifact(str(metrics_path))
    logger.info("%s metrics: %s", stage, metrics)
    return metrics
