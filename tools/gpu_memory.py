"""GPU memory of MedGemma 4B LoRA training per execution setting, and what `auto` picks on common GPUs: the
estimate `train` plans with, from the model's shapes and its processor's tokens per example (no GPU, no weights).

Run: make gpu-memory   (or: python -m tools.gpu_memory [--model ID] [--tokens N] [--lora-r 8])

The model is `medgemma-4b-random` by default: MedGemma 4B's architecture and processor, Gemma 3's tokenizer
included (`make tokenizer`). Parameter counts are exact: the architecture is built on PyTorch's meta device, which
allocates nothing. The activation estimate is calibrated to peak CUDA memory measured on one H100
(`execution.ACTIVATION_SCALE`).
"""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import torch

from medgemma_breakhis.execution import ModelShape, estimate_peak_gib, model_shape, plan_execution
from medgemma_breakhis.logs import configure_logging
from medgemma_breakhis.model_source import RANDOM_MEDGEMMA_ID
from medgemma_breakhis.modeling import load_processor, model_config, model_on_meta
from medgemma_breakhis.params import LoraParams, ModelParams, TrainParams
from medgemma_breakhis.training import decoder_tokens_per_example

# (micro-batch, gradient checkpointing, torch.compile) of the table
SETTINGS = (
    (1, True, False),
    (2, True, False),
    (4, True, False),
    (8, True, False),
    (1, False, True),
    (2, False, True),
    (4, False, True),
    (8, False, True),
    (8, False, False),
)
# Memory of common GPUs as torch reports it (GiB)
GPUS = {"H200 141GB": 139.0, "H100 80GB": 79.2, "A100 40GB": 39.4, "L4 24GB": 22.0}


def bf16_shape(model: ModelParams, lora_r: int) -> ModelShape:
    """The model's shapes with bf16 weights, as `train` loads them."""
    shape = model_shape(model_on_meta(model_config(model)), lora_r)
    return dataclasses.replace(shape, weight_bytes=2 * shape.parameters)


def estimates(shape: ModelShape, tokens: int) -> pd.DataFrame:
    rows = []
    for micro, checkpointing, compiled in SETTINGS:
        parts = estimate_peak_gib(shape, micro, checkpointing, tokens, compiled=compiled)
        rows.append(
            {
                "micro-batch": micro,
                "gradient checkpointing": "on" if checkpointing else "off",
                "torch.compile": "on" if compiled else "off",
                **parts,
                "total": sum(parts.values()),
            }
        )
    return pd.DataFrame(rows)


def auto_plans(shape: ModelShape, tokens: int) -> pd.DataFrame:
    rows = []
    for gpu, gib in GPUS.items():
        plan = plan_execution(TrainParams(), shape, tokens, torch.device("cuda"), memory_gib=gib)
        rows.append(
            {
                "GPU": gpu,
                "micro-batch x accumulation": f"{plan.micro_batch_size} x {plan.grad_accum_steps}",
                "gradient checkpointing": "on" if plan.gradient_checkpointing else "off",
                "torch.compile": "on" if plan.compile else "off",
                "estimated peak": plan.estimated_peak_gib,
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=RANDOM_MEDGEMMA_ID, help=f"a model.id (default {RANDOM_MEDGEMMA_ID})")
    parser.add_argument(
        "--tokens",
        type=int,
        help="decoder tokens per example (default: counted with the model's processor, as the trainer counts them)",
    )
    parser.add_argument("--lora-r", type=int, default=LoraParams().r)
    args = parser.parse_args(argv)
    configure_logging()
    model = ModelParams(id=args.model)
    shape = bf16_shape(model, args.lora_r)
    tokens = args.tokens or decoder_tokens_per_example(load_processor(model))
    print(f"Parameters: {shape.parameters:,} (LoRA r={args.lora_r} all-linear adds {shape.lora_parameters:,})")
    print(
        f"Estimated peak GPU memory (GiB) of one bf16 training step of {args.model}, {tokens} decoder tokens and "
        f"{shape.patches} vision-tower patches per example, fused AdamW:"
    )
    print(estimates(shape, tokens).to_markdown(index=False, floatfmt=".1f"))
    print("\nWhat train.micro_batch_size/gradient_checkpointing/compile=auto pick at the default batch of 8:")
    print(auto_plans(shape, tokens).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
