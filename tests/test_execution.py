"""How a training step is executed: the same optimisation whatever the micro-batch, `auto` by the GPU's memory, the
memory estimate against the H100 measurements, and the architecture-exact model used to measure them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from repo_params import params
from transformers import TrainerCallback

from medgemma_breakhis.data.breakhis import FOLDS_CSV, read_folds
from medgemma_breakhis.data.split import select_split
from medgemma_breakhis.model.builtin import IMAGE_TOKENS, medgemma_4b_config
from medgemma_breakhis.model.load import load_base_model, model_on_meta
from medgemma_breakhis.train.execution import auto_setting, plan_execution
from medgemma_breakhis.train.trainer import build_trainer
from tools.gpu_memory import GPUS, decoder_tokens_per_example, estimate_peak_gib, model_shape, recommend

# The parameter count of google/medgemma-4b-it, as loaded on the H100 on which docs/gpu.md's figures were measured.
MEDGEMMA_4B_PARAMETERS = 4_300_079_472
# Decoder tokens per training example with MedGemma's processor (Gemma 3's tokenizer), as trl's collator counts them.
DECODER_TOKENS = 375


@pytest.fixture(scope="module")
def medgemma_shape():
    """MedGemma 4B's shapes with bf16 weights, as `train` loads them."""
    shape = model_shape(model_on_meta(medgemma_4b_config()), params().lora.r)
    return dataclasses.replace(shape, weight_bytes=2 * shape.parameters)


def test_architecture_exact_model_has_medgemma_4b_size_and_inputs(medgemma_shape, medgemma_processor) -> None:
    assert medgemma_shape.parameters == MEDGEMMA_4B_PARAMETERS
    inputs = medgemma_processor(text=["<start_of_image>"], images=[[Image.new("RGB", (700, 460))]], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 896, 896)
    assert int(inputs["token_type_ids"].sum()) == IMAGE_TOKENS
    assert decoder_tokens_per_example(medgemma_processor) == DECODER_TOKENS


# Peak CUDA memory allocated (GiB) by `make bench-train` on one H100 80GB, medgemma-4b-random, bf16, LoRA r=8
# all-linear, fused AdamW (docs/gpu.md): (micro-batch, checkpointing, compiled) -> GiB. Measured with the
# stand-in tokenizer of the time: 298 decoder tokens per example, where Gemma 3's own gives 375.
STAND_IN_TOKENS = 298
MEASURED_PEAK_GIB = {
    (1, True, False): 9.12,
    (8, True, False): 13.90,
    (4, False, False): 40.31,
    (8, False, False): 71.99,
    (8, False, True): 64.34,
    (2, False, True): 22.55,
}


@pytest.mark.parametrize(("setting", "measured"), MEASURED_PEAK_GIB.items())
def test_memory_estimate_within_ten_percent_of_the_h100(medgemma_shape, setting, measured) -> None:
    micro, checkpointing, compiled = setting
    estimate = sum(estimate_peak_gib(medgemma_shape, micro, checkpointing, STAND_IN_TOKENS, compiled=compiled).values())
    assert estimate == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize(
    ("gpu_gib", "expected"),
    [
        # H100 80GB: 8 x 1 compiled, the fastest measured, is estimated at 67.4 GiB, just over its 67.3 GiB budget
        (79.2, (4, False, True)),
        (139.8, (8, False, True)),  # H200
        (39.4, (2, False, True)),  # A100 40GB
        (22.0, (8, True, False)),  # L4 24GB
    ],
)
def test_auto_picks_the_fastest_setting_that_fits(medgemma_shape, gpu_gib, expected) -> None:
    micro, checkpointing, compiled, peak = recommend(medgemma_shape, DECODER_TOKENS, gpu_gib, batch_size=8)
    assert (micro, checkpointing, compiled) == expected
    assert peak <= 0.85 * gpu_gib
    assert auto_setting(gpu_gib) == (micro, checkpointing)  # what `execution: auto` takes on that GPU


def test_auto_on_every_listed_gpu_is_the_recommendation(medgemma_shape) -> None:
    for gib in GPUS.values():
        assert auto_setting(gib) == recommend(medgemma_shape, DECODER_TOKENS, gib, batch_size=8)[:2], gib


def test_explicit_settings_are_kept() -> None:
    execution = {"micro_batch_size": 2, "gradient_checkpointing": True, "dataloader_workers": 3, "compile": False}
    plan = plan_execution(params({"execution": execution}).execution, 8, torch.device("cuda"))
    assert (
        plan.micro_batch_size,
        plan.grad_accum_steps,
        plan.gradient_checkpointing,
        plan.dataloader_workers,
        plan.compile,
    ) == (2, 4, True, 3, False)


def test_explicit_settings_need_nothing_of_the_model() -> None:
    """Given explicitly, the settings plan any model on any device: no GPU is asked for its memory."""
    execution = {"micro_batch_size": 4, "gradient_checkpointing": False, "dataloader_workers": 0, "compile": False}
    plan = plan_execution(params({"execution": execution}).execution, 8, torch.device("cpu"))
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.gradient_checkpointing, plan.compile) == (
        4,
        2,
        False,
        False,
    )


class FirstStepGradients(TrainerCallback):
    """The adapter's gradients just before the first optimizer step, accumulation complete."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if not self.gradients:
            # the tiny model's SigLIP pooling head is adapted but unused (MedGemma has none): it has no gradient
            self.gradients = {
                name: p.grad.detach().clone()
                for name, p in model.named_parameters()
                if p.requires_grad and p.grad is not None
            }


def first_step(rows: pd.DataFrame, image_root: Path, micro_batch_size: int, tmp_path: Path):
    run = params(
        {
            "model": {"id": "tiny-gemma3"},
            "lora": {"dropout": 0.0},
            "train": {"precision": "fp32"},
            "execution": {
                "micro_batch_size": micro_batch_size,
                "gradient_checkpointing": False,
                "dataloader_workers": 0,
            },
        }
    )
    model, processor, info = load_base_model(run.model, "fp32")
    trainer = build_trainer(
        model=model,
        processor=processor,
        info=info,
        params=run,
        rows=rows,
        image_root=image_root,
        output_dir=tmp_path / str(micro_batch_size),
        config_overrides={"max_steps": 1, "save_strategy": "no"},
    )
    gradients = FirstStepGradients()
    trainer.add_callback(gradients)
    trainer.train()
    return trainer.state.log_history[0]["loss"], gradients.gradients


@pytest.mark.slow
def test_micro_batch_splits_are_the_same_optimisation(synthetic_root: Path, tmp_path: Path) -> None:
    """1 x 8, 2 x 4 and 8 x 1 see the same eight examples and give the same loss and adapter gradients."""
    rows = select_split(read_folds(synthetic_root / FOLDS_CSV), params().split)["train"]
    results = {micro: first_step(rows, synthetic_root, micro, tmp_path) for micro in (1, 2, 8)}
    loss, gradients = results[8]
    assert loss > 0 and len(gradients) > 0
    for micro in (1, 2):
        other_loss, other_gradients = results[micro]
        assert other_loss == pytest.approx(loss, rel=1e-5), micro
        assert other_gradients.keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(other_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
