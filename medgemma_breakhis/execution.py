"""How a training step is executed: micro-batch x gradient accumulation, gradient checkpointing, dataloader workers.

None of it changes what is trained: the optimizer sees the same `train.batch_size` examples per step in the same
order (the sampler's permutation does not depend on how a step is cut into micro-batches), and transformers
normalises the loss by the answer tokens of the whole step, so 1 x 8, 2 x 4 and 8 x 1 give the same loss and
gradients up to float rounding (tests/test_execution.py). `auto` picks the fastest setting whose estimated peak
memory fits the device, from a memory estimate calibrated on an H100 and a step-time model fitted there
(docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from transformers import PretrainedConfig

from medgemma_breakhis.memory import GIB
from medgemma_breakhis.params import TrainParams

logger = logging.getLogger(__name__)

# Share of the device's memory that `auto` plans to use: the rest is left for the CUDA context, the allocator's
# fragmentation (reserved minus allocated) and the estimate's error.
MEMORY_FRACTION = 0.85
# Allocated beyond weights, LoRA, optimizer and activations (fitted, below).
OVERHEAD_GIB = 0.3
# What autograd keeps, as a multiple of the tensors `activation_elements_per_token` counts, by (gradient
# checkpointing, torch.compile): fitted to peak CUDA memory allocated on one H100 (docs/gpu.md), where the
# estimate is then within 2% at micro-batches 1, 4 and 8. Compiled layers keep fewer intermediates.
ACTIVATION_SCALE = {(False, False): 0.929, (True, False): 1.279, (False, True): 0.817, (True, True): 1.279}
# Step-time model, fitted to the H100 measurements, eager and compiled: seconds of host-side cost per forward/backward
# pass and seconds of GPU work per example; and the factor of recomputing activations under checkpointing.
STEP_COST = {False: (0.44, 0.073), True: (0.29, 0.049)}
CHECKPOINTING_COST = 1.61
MAX_WORKERS = 4


@dataclass(frozen=True)
class ExecutionPlan:
    """How each optimizer step runs; `estimated_peak_gib` and `memory_budget_gib` say why (None when not auto)."""

    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    dataloader_workers: int
    compile: bool = False
    estimated_peak_gib: float | None = None
    memory_budget_gib: float | None = None

    def describe(self) -> str:
        fits = (
            f", estimated peak {self.estimated_peak_gib:.1f} GiB of a {self.memory_budget_gib:.1f} GiB budget"
            if self.estimated_peak_gib is not None and self.memory_budget_gib is not None
            else ""
        )
        return (
            f"micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation steps, gradient "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.dataloader_workers} dataloader "
            f"workers, torch.compile {'on' if self.compile else 'off'}{fits}"
        )


def activation_elements_per_token(
    hidden: int, intermediate: int, attention_width: int, kv_width: int, gated: bool
) -> int:
    """Values autograd keeps per token and layer for the backward pass, LoRA on every linear layer.

    Attention: the block input and its norm, q, k, v (and q/k after their norms in Gemma), the attention output
    (SDPA keeps no s x s matrix), the output projection and its norm. MLP: the input and its norm, the up (and gate)
    projections, the activation, the product, the down projection and its norm. LoRA dropout keeps a dropped copy
    of each adapted layer's input.
    """
    attention = 2 * hidden + (attention_width + 2 * kv_width) * (2 if gated else 1) + attention_width + 2 * hidden
    mlp = 2 * hidden + intermediate * (4 if gated else 2) + 2 * hidden
    lora_inputs = 3 * hidden + attention_width + (2 if gated else 1) * hidden + intermediate
    return attention + mlp + lora_inputs


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a Gemma 3 vision-language model."""

    parameters: int
    weight_bytes: int
    lora_parameters: int
    text: dict[str, int]
    vision: dict[str, int]

    @property
    def patches(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2

    @classmethod
    def of(cls, config: PretrainedConfig, parameters: int, weight_bytes: int, lora_parameters: int) -> ModelShape:
        text, vision = config.text_config, config.vision_config
        return cls(
            parameters=parameters,
            weight_bytes=weight_bytes,
            lora_parameters=lora_parameters,
            text={
                "hidden": text.hidden_size,
                "intermediate": text.intermediate_size,
                "layers": text.num_hidden_layers,
                "attention": text.num_attention_heads * text.head_dim,
                "kv": text.num_key_value_heads * text.head_dim,
            },
            vision={
                "hidden": vision.hidden_size,
                "intermediate": vision.intermediate_size,
                "layers": vision.num_hidden_layers,
                "image_size": vision.image_size,
                "patch_size": vision.patch_size,
            },
        )


def lora_parameter_count(model: nn.Module, r: int) -> int:
    """Parameters LoRA adds with `target_modules=all-linear`: r x (in + out) on every linear layer but the LM head."""
    output = model.get_output_embeddings()
    return sum(
        r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, nn.Linear) and m is not output
    )


def model_shape(model: nn.Module, lora_r: int) -> ModelShape:
    parameters = list({id(p): p for p in model.parameters()}.values())
    return ModelShape.of(
        model.config,
        sum(p.numel() for p in parameters),
        sum(p.numel() * p.element_size() for p in parameters),
        lora_parameter_count(model, lora_r),
    )


def estimate_peak_gib(
    shape: ModelShape,
    micro_batch_size: int,
    gradient_checkpointing: bool,
    decoder_tokens: int,
    activation_bytes: int = 2,
    compiled: bool = False,
) -> dict[str, float]:
    """Estimated peak memory of one training step, by component (GiB).

    trl computes the loss through a chunked LM head, so no float32 logits over the whole vocabulary are kept.
    """
    text, vision = shape.text, shape.vision
    per_text_layer = decoder_tokens * activation_elements_per_token(
        text["hidden"], text["intermediate"], text["attention"], text["kv"], gated=True
    )
    per_vision_layer = shape.patches * activation_elements_per_token(
        vision["hidden"], vision["intermediate"], vision["hidden"], vision["hidden"], gated=False
    )
    if gradient_checkpointing:
        # each layer keeps only its input; one layer's activations exist again while it is recomputed
        kept = (
            text["layers"] * decoder_tokens * text["hidden"]
            + vision["layers"] * shape.patches * vision["hidden"]
            + max(per_text_layer, per_vision_layer)
        )
    else:
        kept = text["layers"] * per_text_layer + vision["layers"] * per_vision_layer
    return {
        "weights": shape.weight_bytes / GIB,
        # LoRA weights in float32 (peft upcasts them), their gradients and AdamW's two moments
        "lora + optimizer": shape.lora_parameters * 4 * 4 / GIB,
        "activations": micro_batch_size
        * kept
        * activation_bytes
        * ACTIVATION_SCALE[gradient_checkpointing, compiled]
        / GIB,
        "overhead": OVERHEAD_GIB,
    }


def step_seconds(per_process_batch: int, micro_batch_size: int, gradient_checkpointing: bool, compiled: bool) -> float:
    """Seconds per optimizer step by the step-time model: every forward/backward pass pays a fixed host-side cost
    (eager: some 15,000 operator calls for MedGemma with LoRA on every linear layer), every example its GPU work.
    Used to rank settings; on another GPU the ranking holds where the host-side cost dominates as it does here."""
    pass_cost, example_cost = STEP_COST[compiled]
    passes = per_process_batch // micro_batch_size
    return (
        passes * (pass_cost + example_cost * micro_batch_size) * (CHECKPOINTING_COST if gradient_checkpointing else 1.0)
    )


def device_memory_gib(device: torch.device) -> float:
    """Memory the device has: the GPU's, or for the CPU the RAM that is free now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return psutil.virtual_memory().available / GIB


def default_workers(device: torch.device) -> int:
    """On a GPU, processes that decode images while it trains; on a CPU they would take cores from training."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 1))


def resolve_compile(setting: bool | str, gradient_checkpointing: bool, device: torch.device) -> bool:
    """auto: compile on a GPU without checkpointing, the combination measured (on a CPU compilation costs more
    than it saves in a short run)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and not gradient_checkpointing


def dataloader_workers(train: TrainParams, device: torch.device) -> int:
    return default_workers(device) if train.dataloader_workers == "auto" else train.dataloader_workers


def explicit_plan(train: TrainParams, device: torch.device) -> ExecutionPlan | None:
    """The plan when the params fix the micro-batch and checkpointing: nothing to estimate, so nothing read from the
    model's shapes, which works for any image-text-to-text model. None when either is `auto`."""
    if train.micro_batch_size == "auto" or train.gradient_checkpointing == "auto":
        return None
    checkpointing = bool(train.gradient_checkpointing)
    return ExecutionPlan(
        train.micro_batch_size,
        train.batch_size // train.num_processes // train.micro_batch_size,
        checkpointing,
        dataloader_workers(train, device),
        resolve_compile(train.compile, checkpointing, device),
    )


def plan_execution(
    train: TrainParams,
    shape: ModelShape,
    decoder_tokens: int,
    device: torch.device,
    activation_bytes: int = 2,
    memory_gib: float | None = None,
) -> ExecutionPlan:
    """Resolve `auto` in the execution keys: of the settings the params allow, the fastest by the step-time model
    whose estimated peak fits `MEMORY_FRACTION` of the device's memory, or of `memory_gib` (or, if none fits, the
    smallest)."""
    per_process = train.batch_size // train.num_processes
    micro_sizes = (
        [train.micro_batch_size]
        if train.micro_batch_size != "auto"
        else [m for m in range(per_process, 0, -1) if per_process % m == 0]
    )
    checkpointing = [train.gradient_checkpointing] if train.gradient_checkpointing != "auto" else [False, True]
    workers = dataloader_workers(train, device)
    budget = MEMORY_FRACTION * (memory_gib if memory_gib is not None else device_memory_gib(device))
    candidates: list[tuple[float, float, int, bool]] = []
    for micro in micro_sizes:
        for ckpt in checkpointing:
            compiled = resolve_compile(train.compile, ckpt, device)
            peak = sum(estimate_peak_gib(shape, micro, ckpt, decoder_tokens, activation_bytes, compiled).values())
            candidates.append((step_seconds(per_process, micro, ckpt, compiled), peak, micro, ckpt))
    fitting = sorted(c for c in candidates if c[1] <= budget)
    _, peak, micro, ckpt = fitting[0] if fitting else min(candidates, key=lambda c: c[1])
    if not fitting:
        logger.warning(
            "no execution setting is estimated to fit %.1f GiB; trying the smallest (%.1f GiB)", budget, peak
        )
    return ExecutionPlan(
        micro, per_process // micro, ckpt, workers, resolve_compile(train.compile, ckpt, device), peak, budget
    )
