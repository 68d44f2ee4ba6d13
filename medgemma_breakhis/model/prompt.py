"""The conversation trained on and scored: the reference's prompt with the image, answered by the class number."""

from typing import Any

from transformers import ProcessorMixin
from trl.data_utils import apply_chat_template

from medgemma_breakhis.data.breakhis import CLASS_NAMES, NUM_CLASSES

PROMPT = (
    "Analyze this breast tissue histopathology image and classify it.\n\n"
    "Classes (0-7):\n"
    + "".join(f"{label}: {name}\n" for label, name in enumerate(CLASS_NAMES))
    + "\nAnswer with only the number (0-7):"
)


def prompt_messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def completion_messages(label: int) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": str(label)}]}]


def templated(processor: ProcessorMixin, label: int) -> dict[str, str]:
    """The prompt and the model's turn answering `label`, as the processor's chat template writes them."""
    return apply_chat_template({"prompt": prompt_messages(), "completion": completion_messages(label)}, processor)


def prompt_text(processor: ProcessorMixin) -> str:
    """The templated prompt, ending where the model's answer starts, exactly as in training."""
    return templated(processor, 0)["prompt"]


def completion_tokens(processor: ProcessorMixin, label: int) -> list[int]:
    """The model's turn answering `label`, tokenised as the trainer tokenises completions."""
    return processor.tokenizer(templated(processor, label)["completion"], add_special_tokens=False)["input_ids"]


def answer_token_ids(processor: ProcessorMixin) -> list[int]:
    """The first completion token of each answer "0".."7"; ValueError unless each is one distinct token."""
    ids = []
    for label in range(NUM_CLASSES):
        tokens = completion_tokens(processor, label)
        if not tokens or processor.tokenizer.decode(tokens[:1]).strip() != str(label):
            raise ValueError(f"answer {label} is not a single leading token of its completion {tokens}")
        ids.append(tokens[0])
    if len(set(ids)) != NUM_CLASSES:
        raise ValueError(f"answer tokens are not distinct: {ids}")
    return ids


def end_of_turn_id(processor: ProcessorMixin) -> int:
    """The token the chat template ends the model's turn with: the one after the answer."""
    return completion_tokens(processor, 0)[1]
