"""GPU memory of MedGemma 4B LoRA training per execution setting, and what `auto` picks on common GPUs: the
estimate `train` plans with, from the model's shapes (no GPU, no download).

Run: make gpu-memory   (or: python -m tools.gpu_memory [--tokens 298] [--lora-r 8])

Parameter counts are exact: MedGemma 4B's architecture is built on PyTorch's meta device, which allocates nothing.
The activation estimate is calibrated to peak CUDA memory measured on one H100 (`execution.ACTIVATION_SCALE`).
"""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import torch

from medgemma_breakhis.execution import ModelShape, estimate_peak_gib, model_shape, plan_execution
from medgemma_breakhis.medgemma_architecture import medgemma_4b_on_meta
from medgemma_breakhis.params import LoraParams, TrainParams

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
GPUS = {"H100 / H200 80GB": 79.2, "A100 40GB": 39.4, "L4 24GB": 22.0}


def medgemma_shape(lora_r: int) -> ModelShape:
    """MedGemma 4B's shapes with bf16 weights, as `train` loads them."""
    shape = model_shape(medgemma_4b_on_meta(), lora_r)
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
    parser.add_argument(
        "--tokens",
        type=int,
        default=298,
        help="decoder tokens per example: 256 image tokens + the prompt, template and answer",
    )
    parser.add_argument("--lora-r", type=int, default=LoraParams().r)
    args = parser.parse_args(argv)
    shape = medgemma_shape(args.lora_r)
    print(f"Parameters: {shape.parameters:,} (LoRA r={args.lora_r} all-linear adds {shape.lora_parameters:,})")
    print(
        f"Estimated peak GPU memory (GiB) of one bf16 training step, {args.tokens} decoder tokens and "
        f"{shape.patches} vision-tower patches per example, fused AdamW:"
    )
    print(estimates(shape, args.tokens).to_markdown(index=False, floatfmt=".1f"))
    print("\nWhat train.micro_batch_size/gradient_checkpointing/compile=auto pick at the default batch of 8:")
    print(auto_plans(shape, args.tokens).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
