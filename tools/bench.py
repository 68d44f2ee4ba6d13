"""Images per second of the two evaluation methods, `score` and `generate`, on the same model, images and batch size.

Run: make bench              (params.yaml's model on this machine's GPU, on the test split: `dvc repro split_balance`
                              first)
     make bench OFFLINE=1    (the tiny model on synthetic images, on a CPU)
     (or: python -m tools.bench [--synthetic] [-S key=value ...] [--images N])
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, ProcessorMixin

from medgemma_breakhis.core.files import pipeline_paths
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import EvalParams, LoraParams, Params, add_override_argument, load_params
from medgemma_breakhis.data.breakhis import FOLDS_CSV, read_folds
from medgemma_breakhis.data.split import read_split, select_split
from medgemma_breakhis.download.sources import generate_synthetic_breakhis
from medgemma_breakhis.evaluate.scoring import generate_answers, parse_answer, score_images
from medgemma_breakhis.model.load import load_base_model

logger = logging.getLogger(__name__)


def split_rows(params: Params, group: str, synthetic: bool, scratch: Path) -> tuple[pd.DataFrame, Path]:
    """The `group` ("train" or "test") split and its image folder: of synthetic images drawn into `scratch`, or the
    pipeline's own (`dvc repro split_balance` first)."""
    if synthetic:
        image_root = generate_synthetic_breakhis(scratch, params.data.synthetic)
        return select_split(read_folds(image_root / FOLDS_CSV), params.split)[group], image_root
    paths = pipeline_paths()
    image_root = Path(paths["raw_dir"])
    return read_split(Path(paths["split_dir"]) / f"{group}.csv", image_root), image_root


def _timed(work: Callable[[], object]) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def benchmark(
    model: PreTrainedModel, processor: ProcessorMixin, images: list[Path], settings: EvalParams
) -> dict[str, float]:
    """Seconds for each method over `images`, after one untimed warm-up batch of each; and how often they agree."""
    warm_up = images[: settings.batch_size]
    score_images(model, processor, warm_up, settings.batch_size)
    generate_answers(model, processor, warm_up, settings.batch_size, settings.max_new_tokens)
    probabilities, score_seconds = _timed(lambda: score_images(model, processor, images, settings.batch_size))
    answers, generate_seconds = _timed(
        lambda: generate_answers(model, processor, images, settings.batch_size, settings.max_new_tokens)
    )
    parsed = np.array([parse_answer(a) for a in answers])
    return {
        "score_seconds": score_seconds,
        "generate_seconds": generate_seconds,
        "agreement": float((parsed == probabilities.argmax(axis=1)).mean()),
        "unparseable": int((parsed < 0).sum()),
    }


def merge_comparison(
    model: PreTrainedModel, processor: ProcessorMixin, images: list[Path], settings: EvalParams, lora: LoraParams
) -> dict[str, float]:
    """`score` with a LoRA adapter applied unmerged (as `evaluate` does) against the same adapter merged into the base
    weights: seconds of each, and how far the answer probabilities move. The adapter is random (peft's
    init_lora_weights=False), so it changes the outputs as a trained one does."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    adapted = get_peft_model(model, config)
    unmerged, unmerged_seconds = _timed(lambda: score_images(adapted, processor, images, settings.batch_size))
    merged_model = adapted.merge_and_unload()
    merged, merged_seconds = _timed(lambda: score_images(merged_model, processor, images, settings.batch_size))
    return {
        "unmerged_seconds": unmerged_seconds,
        "merged_seconds": merged_seconds,
        "max_probability_change": float(np.abs(unmerged - merged).max()),
        "argmax_agreement": float((unmerged.argmax(axis=1) == merged.argmax(axis=1)).mean()),
    }


def merge_report(result: dict[str, float], n_images: int) -> str:
    return (
        f"LoRA unmerged: {n_images / result['unmerged_seconds']:.2f} images/s, merged: "
        f"{n_images / result['merged_seconds']:.2f} images/s; merging moved answer probabilities by up to "
        f"{result['max_probability_change']:.4f} and kept {result['argmax_agreement']:.0%} of the predicted classes"
    )


def report(result: dict[str, float], n_images: int, settings: EvalParams, model_id: str, device: str) -> str:
    score_rate, generate_rate = n_images / result["score_seconds"], n_images / result["generate_seconds"]
    return "\n".join(
        [
            (
                f"{model_id} on {device}, {n_images} images, batch size {settings.batch_size}, "
                f"generate max_new_tokens {settings.max_new_tokens}"
            ),
            f"{'method':<10}{'seconds':>10}{'images/s':>12}",
            f"{'score':<10}{result['score_seconds']:>10.2f}{score_rate:>12.2f}",
            f"{'generate':<10}{result['generate_seconds']:>10.2f}{generate_rate:>12.2f}",
            (
                f"score is {score_rate / generate_rate:.1f}x the images/s of generate; the two agree on "
                f"{result['agreement']:.0%} of images; generate left {result['unparseable']} unparseable"
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)
    parser.add_argument("--synthetic", action="store_true", help="synthetic images instead of data/ (offline)")
    parser.add_argument("--images", type=int, default=64, help="how many test images to time (default 64)")
    parser.add_argument(
        "--merge", action="store_true", help="also time `score` with a (random) LoRA adapter unmerged against merged"
    )
    args = parser.parse_args()
    configure_logging()
    params = load_params(overrides=args.overrides)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        test, image_root = split_rows(params, "test", args.synthetic, Path(scratch))
        images = [image_root / f for f in test["filename"][: args.images]]
        model, processor, info = load_base_model(params.model, params.eval.precision)
        result = benchmark(model, processor, images, params.eval)
        print(report(result, len(images), params.eval, params.model.id, info.device))
        if args.merge:
            print(merge_report(merge_comparison(model, processor, images, params.eval, params.lora), len(images)))


if __name__ == "__main__":
    main()
