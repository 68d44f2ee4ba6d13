"""GPU memory of MedGemma 4B LoRA training per setting: an estimate, computed from the model's shapes.

Run: make gpu-memory   (or: python -m medgemma_breakhis.gpu_memory [--tokens 400])

Parameter counts are exact: MedGemma 4B's architecture (Gemma 3 4B: a 34-layer text decoder and the 27-layer SigLIP
so400m vision tower at 896x896) is built on PyTorch's meta device, which allocates nothing, and LoRA is applied by
peft as `train` applies it. Activation memory is counted per token and layer from the tensors autograd keeps
(`activation_elements_per_token`); it is an estimate, not a measurement, to be checked against
`peak_cuda_memory_allocated_gib` in MLflow after a real run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

GIB = 2**30
# google/medgemma-4b-it is Gemma 3 4B (its model card); these are Gemma 3 4B's published shapes. The text decoder
# without its 64 extra vocabulary rows has 3,880,099,328 parameters, as keras-hub's gemma3_4b_text preset says.
TEXT = {"vocab_size": 262_208, "hidden_size": 2560, "intermediate_size": 10_240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}
VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
          "image_size": 896, "patch_size": 14}
IMAGE_TOKENS = 256  # each image reaches the decoder as 256 tokens (model card)
PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 4096 tokens through the vision tower
# Per optimizer step, beyond weights and activations: the CUDA context, cuBLAS workspaces, allocator fragmentation.
OVERHEAD_GIB = 1.5
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def medgemma_4b_shapes() -> Gemma3ForConditionalGeneration:
    config = Gemma3Config(text_config=Gemma3TextConfig(**TEXT), vision_config=SiglipVisionConfig(**VISION),
                          mm_tokens_per_image=IMAGE_TOKENS)
    with init_empty_weights():
        return Gemma3ForConditionalGeneration(config)


def parameter_counts(lora_r: int = 8, lora_alpha: int = 16) -> dict[str, int]:
    """Parameters of the base model by part, and the LoRA parameters `train` adds (all-linear, as params.yaml)."""
    model = medgemma_4b_shapes()
    counts = {
        "text decoder": sum(p.numel() for p in model.model.language_model.parameters()),
        "vision tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
    }
    counts["total"] = sum(counts.values())
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    counts["lora"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return counts


def activation_elements_per_token(hidden: int, intermediate: int, attention_width: int, kv_width: int,
                                  gated: bool) -> int:
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
class Setting:
    precision: str
    batch_size: int
    gradient_checkpointing: bool


def memory_gib(counts: dict[str, int], setting: Setting, text_tokens: int) -> dict[str, float]:
    """Estimated peak GPU memory of one training step, by component."""
    width = BYTES[setting.precision]
    text_width = TEXT["num_attention_heads"] * TEXT["head_dim"]
    kv_width = TEXT["num_key_value_heads"] * TEXT["head_dim"]
    per_text_layer = text_tokens * activation_elements_per_token(
        TEXT["hidden_size"], TEXT["intermediate_size"], text_width, kv_width, gated=True)
    per_vision_layer = PATCHES * activation_elements_per_token(
        VISION["hidden_size"], VISION["intermediate_size"], VISION["hidden_size"], VISION["hidden_size"], gated=False)
    if setting.gradient_checkpointing:
        # each layer keeps only its input; one layer's activations exist again while it is recomputed
        kept = (TEXT["num_hidden_layers"] * text_tokens * TEXT["hidden_size"]
                + VISION["num_hidden_layers"] * PATCHES * VISION["hidden_size"]
                + max(per_text_layer, per_vision_layer))
    else:
        kept = TEXT["num_hidden_layers"] * per_text_layer + VISION["num_hidden_layers"] * per_vision_layer
    # logits over the vocabulary in float32 for the loss: the logits, their log-softmax and its gradient
    logits = 3 * text_tokens * TEXT["vocab_size"] * 4
    return {
        "weights": counts["total"] * width / GIB,
        # LoRA weights in float32 (peft upcasts them), their gradients and AdamW's two moments
        "lora + optimizer": counts["lora"] * 4 * 4 / GIB,
        "activations": setting.batch_size * (kept * width + logits) / GIB,
        "overhead": OVERHEAD_GIB,
    }


SETTINGS = tuple(Setting(precision, batch, checkpointing)
                 for precision in ("bf16", "fp32") for checkpointing in (True, False) for batch in (1, 2, 4, 8))


def table(counts: dict[str, int], text_tokens: int) -> str:
    lines = ["| precision | batch size | gradient checkpointing | weights | LoRA + optimizer | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        parts = memory_gib(counts, setting, text_tokens)
        lines.append(f"| {setting.precision} | {setting.batch_size} | {'on' if setting.gradient_checkpointing else 'off'}"
                     f" | {parts['weights']:.1f} | {parts['lora + optimizer']:.2f} | {parts['activations']:.1f} | "
                     f"**{sum(parts.values()):.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400,
                        help="decoder tokens per example: 256 image tokens + the prompt, template and answer")
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    counts = parameter_counts(args.lora_r, 2 * args.lora_r)
    print("Parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    print(f"Estimated peak GPU memory (GiB), {args.tokens} decoder tokens and {PATCHES} vision-tower patches per "
          f"example, LoRA r={args.lora_r} all-linear, AdamW; fp16 is as bf16:")
    print(table(counts, args.tokens))


if __name__ == "__main__":
    main()
