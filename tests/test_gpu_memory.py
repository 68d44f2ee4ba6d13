"""`make gpu-memory`: exact parameter counts of MedGemma 4B's shapes, the estimate per setting, and auto's picks."""

from __future__ import annotations

import pytest

from medgemma_breakhis.model.builtin import TEXT, medgemma_4b_config
from medgemma_breakhis.model.load import model_on_meta
from tools.gpu_memory import GPUS, auto_plans, bf16_shape, estimates, main

MEDGEMMA = "medgemma-4b-random"

# keras-hub's gemma3_4b_text preset, an independent count of the same decoder with 64 fewer vocabulary rows.
KERAS_GEMMA3_4B_TEXT = 3_880_099_328


def test_parameter_counts_are_medgemma_4b(gemma3_tokenizer) -> None:
    shape = bf16_shape(MEDGEMMA, lora_r=8)
    model = model_on_meta(medgemma_4b_config())
    assert sum(p.numel() for p in model.model.language_model.parameters()) == (
        KERAS_GEMMA3_4B_TEXT + 64 * TEXT["hidden_size"]
    )
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    # r=8 on every linear layer of both towers (34 decoder layers x 7, 27 vision layers x 6), none on lm_head
    assert 0.004 < shape.lora_parameters / shape.parameters < 0.005
    assert bf16_shape(MEDGEMMA, lora_r=16).lora_parameters == 2 * shape.lora_parameters


def test_estimate_grows_as_it_should(gemma3_tokenizer) -> None:
    table = estimates(bf16_shape(MEDGEMMA, 8), 375).set_index(
        ["micro-batch", "gradient checkpointing", "torch.compile"]
    )
    total = table["total"]
    assert total[1, "on", "off"] < total[8, "on", "off"] < total[1, "off", "on"] < total[8, "off", "on"]
    assert total[8, "off", "on"] < total[8, "off", "off"]  # compiled layers keep fewer intermediates
    assert table.loc[(4, "on", "off"), "activations"] == pytest.approx(4 * table.loc[(1, "on", "off"), "activations"])
    assert table["weights"].tolist() == pytest.approx([4_300_079_472 * 2 / 2**30] * len(table))


def test_auto_fits_every_listed_gpu(gemma3_tokenizer) -> None:
    plans = auto_plans(bf16_shape(MEDGEMMA, 8), 375)
    assert (plans["estimated peak"] < [0.85 * gib for gib in GPUS.values()]).all()


@pytest.mark.slow  # the whole tool: MedGemma 4B's shapes and its processor
def test_tool_counts_the_tokens_with_medgemmas_processor(gemma3_tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    out = capsys.readouterr().out
    assert out.startswith("Parameters: 4,300,079,472 (LoRA r=8 all-linear adds 19,248,896)")
    assert "of medgemma-4b-random, 375 decoder tokens and 4096 vision-tower patches per example" in out
    assert "| H200 141GB | 8 x 1 " in out
