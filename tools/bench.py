"""Images per second of the two evaluation methods, `score` and `generate`, on the same model, images and batch size.
Run: make bench [OFFLINE=1]   (or: python -m tools.bench [--synthetic] [-S key=value ...] [--images N] [--merge])"""

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
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


def split_rows(params: Params, group: str, synthetic: bool, scratch: Path) -> tuple[pd.DataFrame, Path]:
    """The `group` ("train" or "test") split and its image folder: synthetic in `scratch`, or the pipeline's own."""
    if synthetic:
        image_root = generate_synthetic_breakhis(scratch, params.data.synthetic)
        return select_split(read_folds(image_root / FOLDS_CSV), params.split)[group], image_root
    paths = pipeline_paths()
    image_root = Path(paths["raw_dir"])
    return read_split(Path(paths["split_dir"]) / f"{group}.csv", image_root), image_root


def _timed(work: Callable[..., object], *args: object) -> tuple[object, float]:
    """`work(*args)` and its seconds, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def benchmark(model: PreTrainedModel, processor: ProcessorMixin, images: list[Path], settings: EvalParams) -> list[str]:
    """Each method's seconds and images/s over `images` after an untimed warm-up batch, and how often they agree."""
    size, tokens = settings.batch_size, settings.max_new_tokens
    methods = {
        "score": partial(score_images, model, processor, batch_size=size),
        "generate": partial(generate_answers, model, processor, batch_size=size, max_new_tokens=tokens),
    }
    for method in methods.values():
        method(images[:size])
    lines, outputs, rates = [f"{'method':<10}{'seconds':>10}{'images/s':>12}"], {}, {}
    for name, method in methods.items():
        outputs[name], seconds = _timed(method, images)
        rates[name] = len(images) / seconds
        lines.append(f"{name:<10}{seconds:>10.2f}{rates[name]:>12.2f}")
    parsed = np.array([parse_answer(a) for a in outputs["generate"]])
    agreement = (parsed == outputs["score"].argmax(axis=1)).mean()
    lines.append(
        f"score is {rates['score'] / rates['generate']:.1f}x the images/s of generate; the two agree on "
        f"{agreement:.0%} of images; generate left {(parsed < 0).sum()} unparseable"
    )
    return lines


def merge_comparison(
    model: PreTrainedModel, processor: ProcessorMixin, images: list[Path], settings: EvalParams, lora: LoraParams
) -> str:
    """`score` with a random (non-identity) LoRA adapter unmerged, as `evaluate` runs it, against it merged."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    adapted = get_peft_model(model, config)
    unmerged, unmerged_seconds = _timed(score_images, adapted, processor, images, settings.batch_size)
    merged, merged_seconds = _timed(score_images, adapted.merge_and_unload(), processor, images, settings.batch_size)
    kept = (unmerged.argmax(axis=1) == merged.argmax(axis=1)).mean()
    return (
        f"LoRA unmerged: {len(images) / unmerged_seconds:.2f} images/s, merged: {len(images) / merged_seconds:.2f} "
        f"images/s; merging moved answer probabilities by up to {np.abs(unmerged - merged).max():.4f} and kept "
        f"{kept:.0%} of the predicted classes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)
    parser.add_argument("--synthetic", action="store_true", help="synthetic images instead of data/ (offline)")
    parser.add_argument("--images", type=int, default=64, help="how many test images to time (default 64)")
    parser.add_argument("--merge", action="store_true", help="also time `score` with a random LoRA unmerged vs merged")
    args = parser.parse_args()
    configure_logging()
    params = load_params(overrides=args.overrides)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        test, image_root = split_rows(params, "test", args.synthetic, Path(scratch))
        images = [image_root / f for f in test["filename"][: args.images]]
        model, processor, info = load_base_model(params.model, params.eval.precision)
        lines = benchmark(model, processor, images, params.eval)
        print(
            f"{params.model.id} on {info.device}, {len(images)} images, batch size {params.eval.batch_size}, "
            f"generate max_new_tokens {params.eval.max_new_tokens}"
        )
        print("\n".join(lines))
        if args.merge:
            print(merge_comparison(model, processor, images, params.eval, params.lora))


if __name__ == "__main__":
    main()
