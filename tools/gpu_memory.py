"""GPU memory of MedGemma 4B LoRA training per execution setting, estimated from the model's shapes on the meta
device, and the setting recommended on common GPUs, what `execution: auto` takes (docs/gpu.md#memory-make-gpu-memory).
Run: make gpu-memory   (or: python -m tools.gpu_memory [--model ID] [--tokens N] [--lora-r 8])"""

import argparse
from dataclasses import dataclass

import pandas as pd
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, ProcessorMixin
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import RANDOM_MEDGEMMA_ID, load_params
from medgemma_breakhis.model.load import load_processor, model_config, model_on_meta
from medgemma_breakhis.model.prompt import completion_messages, prompt_messages

GIB = 2**30
# Share of the GPU's memory a recommendation may use: the rest is for the CUDA context, fragmentation and error.
MEMORY_FRACTION = 0.85
# Allocated beyond weights, LoRA, optimizer and activations (fitted, below).
OVERHEAD_GIB = 0.3
# What autograd keeps, as a multiple of `activation_elements_per_token`, by (gradient checkpointing, torch.compile):
# fitted to peak CUDA memory allocated on one H100, within 2% at micro-batches 1, 4 and 8.
ACTIVATION_SCALE = {(False, False): 0.929, (True, False): 1.279, (False, True): 0.817, (True, True): 1.279}
# Step time fitted on the H100, by torch.compile: (host seconds per forward/backward pass, GPU seconds per example).
STEP_COST = {False: (0.44, 0.073), True: (0.29, 0.049)}
CHECKPOINTING_COST = 1.61
# (micro-batch, gradient checkpointing, torch.compile) of the table: checkpointed, compiled, then neither
SETTINGS = (*((m, True, False) for m in (1, 2, 4, 8)), *((m, False, True) for m in (1, 2, 4, 8)), (8, False, False))
# Memory of common GPUs as torch reports it (GiB)
GPUS = {"H200 141GB": 139.0, "H100 80GB": 79.2, "A100 40GB": 39.4, "L4 24GB": 22.0}


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    weight_bytes: int
    lora_parameters: int
    text: PretrainedConfig
    vision: PretrainedConfig

    @property
    def patches(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2


def activation_elements_per_token(hidden: int, intermediate: int, attention: int, kv: int, gated: bool) -> int:
    """Values autograd keeps per token and layer, LoRA (and its dropout's input copies) on every linear layer."""
    attention_part = 2 * hidden + (attention + 2 * kv) * (2 if gated else 1) + attention + 2 * hidden
    mlp = 2 * hidden + intermediate * (4 if gated else 2) + 2 * hidden
    lora_inputs = 3 * hidden + attention + (2 if gated else 1) * hidden + intermediate
    return attention_part + mlp + lora_inputs


def model_shape(model: nn.Module, lora_r: int) -> ModelShape:
    """The shape of `model` with bf16 weights and LoRA of rank `lora_r` on every linear layer but the LM head."""
    parameters = sum(p.numel() for p in model.parameters())  # each shared parameter once
    output = model.get_output_embeddings()
    adapted = [layer for layer in model.modules() if isinstance(layer, nn.Linear) and layer is not output]
    lora = lora_r * sum(layer.in_features + layer.out_features for layer in adapted)
    return ModelShape(parameters, 2 * parameters, lora, model.config.text_config, model.config.vision_config)


def bf16_shape(model_id: str, lora_r: int) -> ModelShape:
    model = load_params().model.model_copy(update={"id": model_id})
    return model_shape(model_on_meta(model_config(model)), lora_r)


def estimate_peak_gib(
    shape: ModelShape, micro_batch_size: int, checkpointing: bool, tokens: int, compiled: bool = False
) -> dict[str, float]:
    """Estimated peak memory of one bf16 training step, by component (GiB)."""
    text, vision = shape.text, shape.vision
    attention, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    per_text_layer = tokens * activation_elements_per_token(
        text.hidden_size, text.intermediate_size, attention, kv, gated=True
    )
    per_vision_layer = shape.patches * activation_elements_per_token(
        vision.hidden_size, vision.intermediate_size, vision.hidden_size, vision.hidden_size, gated=False
    )
    if checkpointing:  # each layer keeps its input; one layer's activations exist again while recomputed
        kept = (
            text.num_hidden_layers * tokens * text.hidden_size
            + vision.num_hidden_layers * shape.patches * vision.hidden_size
            + max(per_text_layer, per_vision_layer)
        )
    else:
        kept = text.num_hidden_layers * per_text_layer + vision.num_hidden_layers * per_vision_layer
    return {
        "weights": shape.weight_bytes / GIB,
        "lora + optimizer": shape.lora_parameters * 4 * 4 / GIB,  # float32 weights, gradients, AdamW's two moments
        "activations": micro_batch_size * kept * 2 * ACTIVATION_SCALE[checkpointing, compiled] / GIB,
        "overhead": OVERHEAD_GIB,
    }


def step_seconds(batch_size: int, micro_batch_size: int, checkpointing: bool, compiled: bool) -> float:
    """Seconds per optimizer step by the step-time model, used to rank settings."""
    pass_cost, example_cost = STEP_COST[compiled]
    passes = batch_size // micro_batch_size
    return passes * (pass_cost + example_cost * micro_batch_size) * (CHECKPOINTING_COST if checkpointing else 1.0)


def recommend(shape: ModelShape, tokens: int, memory_gib: float, batch_size: int) -> tuple[int, bool, bool, float]:
    """(micro-batch, checkpointing, compiled, peak): the fastest setting that fits, compiled exactly when not
    checkpointing; else the smallest."""
    candidates = []
    for micro in (m for m in range(batch_size, 0, -1) if batch_size % m == 0):
        for checkpointing in (False, True):
            peak = sum(estimate_peak_gib(shape, micro, checkpointing, tokens, compiled=not checkpointing).values())
            seconds = step_seconds(batch_size, micro, checkpointing, not checkpointing)
            candidates.append((seconds, peak, micro, checkpointing))
    fitting = sorted(c for c in candidates if c[1] <= MEMORY_FRACTION * memory_gib)
    _, peak, micro, checkpointing = fitting[0] if fitting else min(candidates, key=lambda c: c[1])
    return micro, checkpointing, not checkpointing, peak


def decoder_tokens_per_example(processor: ProcessorMixin) -> int:
    """Tokens the decoder sees per training example, counted by trl's own collator (image tokens included)."""
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    blank = Image.new("RGB", (1, 1))  # the processor gives every image the same number of tokens
    example = {"images": [blank], "prompt": prompt_messages(), "completion": completion_messages(0)}
    return int(collator([example])["attention_mask"].sum())


def _setting(checkpointing: bool, compiled: bool) -> dict[str, str]:
    return {"gradient checkpointing": "on" if checkpointing else "off", "torch.compile": "on" if compiled else "off"}


def estimates(shape: ModelShape, tokens: int) -> pd.DataFrame:
    rows = []
    for micro, checkpointing, compiled in SETTINGS:
        parts = estimate_peak_gib(shape, micro, checkpointing, tokens, compiled=compiled)
        rows.append({"micro-batch": micro, **_setting(checkpointing, compiled), **parts, "total": sum(parts.values())})
    return pd.DataFrame(rows)


def auto_plans(shape: ModelShape, tokens: int, batch_size: int = 8) -> pd.DataFrame:
    rows = []
    for gpu, gib in GPUS.items():
        micro, checkpointing, compiled, peak = recommend(shape, tokens, gib, batch_size)
        plan = {"micro-batch x accumulation": f"{micro} x {batch_size // micro}", **_setting(checkpointing, compiled)}
        rows.append({"GPU": gpu, **plan, "estimated peak": peak})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=RANDOM_MEDGEMMA_ID, help=f"a model.id (default {RANDOM_MEDGEMMA_ID})")
    parser.add_argument("--tokens", type=int, help="decoder tokens per example (default: counted with its processor)")
    parser.add_argument("--lora-r", type=int, default=load_params().lora.r)
    args = parser.parse_args(argv)
    configure_logging()
    shape = bf16_shape(args.model, args.lora_r)
    processor = load_processor(load_params().model.model_copy(update={"id": args.model}))
    tokens = args.tokens or decoder_tokens_per_example(processor)
    print(f"Parameters: {shape.parameters:,} (LoRA r={args.lora_r} all-linear adds {shape.lora_parameters:,})")
    print(
        f"Estimated peak GPU memory (GiB) of one bf16 training step of {args.model}, {tokens} decoder tokens and "
        f"{shape.patches} vision-tower patches per example, fused AdamW:"
    )
    print(estimates(shape, tokens).to_markdown(index=False, floatfmt=".1f"))
    print("\nRecommended at a batch of 8 (what execution: auto takes; compile only without checkpointing):")
    print(auto_plans(shape, tokens).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
