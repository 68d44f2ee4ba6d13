"""The GPU guide's calculation: exact parameter counts of MedGemma 4B's shapes, and how the estimate behaves."""

from __future__ import annotations

import pytest

from tools.gpu_memory import TEXT, Setting, memory_gib, parameter_counts, table

# keras-hub's gemma3_4b_text preset, an independent count of the same decoder with 64 fewer vocabulary rows.
KERAS_GEMMA3_4B_TEXT = 3_880_099_328


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    return parameter_counts()


def test_parameter_counts_are_medgemma_4b(counts: dict[str, int]) -> None:
    assert counts["text decoder"] == KERAS_GEMMA3_4B_TEXT + 64 * TEXT["hidden_size"]
    assert counts["total"] == counts["text decoder"] + counts["vision tower"] + counts["projector"]
    assert 4.2e9 < counts["total"] < 4.4e9  # "4B": 4.3 B with the vision tower
    # r=8 on every linear layer of both towers (34 decoder layers x 7, 27 vision layers x 6), none on lm_head
    assert 0.004 < counts["lora"] / counts["total"] < 0.005
    assert parameter_counts(lora_r=16, lora_alpha=32)["lora"] == 2 * counts["lora"]


def test_estimate_grows_as_it_should(counts: dict[str, int]) -> None:
    def total(precision: str, batch: int, checkpointing: bool) -> float:
        return sum(memory_gib(counts, Setting(precision, batch, checkpointing), 400).values())

    assert total("bf16", 1, True) < total("bf16", 2, True) < total("bf16", 1, False)
    assert total("fp32", 1, True) - total("bf16", 1, True) == pytest.approx(counts["total"] * 2 / 2**30, rel=0.2)
    assert memory_gib(counts, Setting("bf16", 4, True), 400)["activations"] == pytest.approx(
        4 * memory_gib(counts, Setting("bf16", 1, True), 400)["activations"])
    rows = table(counts, 400).splitlines()
    assert rows[2].startswith("| bf16 | 1 | on | 8.0 | 0.29 |") and len(rows) == 2 + 16
