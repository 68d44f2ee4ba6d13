"""The conversation the model is trained on and scored by: the reference's prompt (docs/reference-experiment.md) with
the image, and the answer, the class number alone. Only the model stages (baseline, train, evaluate) import this, so
editing the prompt re-runs them and not the data stages."""

from __future__ import annotations

from typing import Any

from medgemma_breakhis.labels import CLASS_NAMES

PROMPT = (
    "Analyze this breast tissue histopathology image and classify it.\n\n"
    "Classes (0-7):\n"
    + "".join(f"{label}: {name}\n" for label, name in enumerate(CLASS_NAMES))
    + "\nAnswer with only the number (0-7):"
)


def prompt_messages() -> list[dict[str, Any]]:
    """The user's turn: the image, then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def completion_messages(label: int) -> list[dict[str, Any]]:
    """The model's turn: the class number alone."""
    return [{"role": "assistant", "content": [{"type": "text", "text": str(label)}]}]
