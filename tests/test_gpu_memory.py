"""`make gpu-memory`: exact parameter counts of MedGemma 4B's shapes, the estimate per setting, and auto's picks."""

from __future__ import annotations

import pytest

from medgemma_breakhis.medgemma_architecture import TEXT, medgemma_4b_on_meta
from tools.gpu_memory import auto_plans, estimates, main, medgemma_shape

# keras-hub's gemma3_4b_text preset, an independent count of the same decoder with 64 fewer vocabulary rows.
KERAS_GEMMA3_4B_TEXT = 3_880_099_328


def test_parameter_counts_are_medgemma_4b() -> None:
    shape = medgemma_shape(lora_r=8)
    model = medgemma_4b_on_meta()
    assert sum(p.numel() for p in model.model.language_model.parameters()) == (
        KERAS_GEMMA3_4B_TEXT + 64 * TEXT["hidden_size"]
    )
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    # r=8 on every linear layer of both towers (34 decoder layers x 7, 27 vision layers x 6), none on lm_head
    assert 0.004 < shape.lora_parameters / shape.parameters < 0.005
    assert medgemma_shape(lora_r=16).lora_parameters == 2 * shape.lora_parameters


def test_estimate_grows_as_it_should() -> None:
    table = estimates(medgemma_shape(8), 298).set_index(["micro-batch", "gradient checkpointing", "torch.compile"])
    total = table["total"]
    assert total[1, "on", "off"] < total[8, "on", "off"] < total[1, "off", "on"] < total[8, "off", "on"]
    assert total[8, "off", "on"] < total[8, "off", "off"]  # compiled layers keep fewer intermediates
    assert table.loc[(4, "on", "off"), "activations"] == pytest.approx(4 * table.loc[(1, "on", "off"), "activations"])
    assert table["weights"].tolist() == pytest.approx([4_300_079_472 * 2 / 2**30] * len(table))


def test_auto_fits_every_listed_gpu() -> None:
    plans = auto_plans(medgemma_shape(8), 298)
    assert list(plans["estimated peak"] < [79.2, 39.4, 22.0]) == [True, True, True]


def test_tool_prints_both_tables(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    out = capsys.readouterr().out
    assert out.startswith("Parameters: 4,300,079,472 (LoRA r=8 all-linear adds 19,248,896)")
    assert "| H100 / H200 80GB | 8 x 1 " in out
