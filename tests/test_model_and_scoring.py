import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from medgemma_breakhis.data.breakhis import NUM_CLASSES
from medgemma_breakhis.evaluate.scoring import generate_answers, parse_answer, score_images
from medgemma_breakhis.model.builtin import MM_TOKENS_PER_IMAGE, build_tiny_gemma3
from medgemma_breakhis.model.prompt import answer_token_ids, end_of_turn_id, prompt_text


def test_tiny_model_is_gemma3_loaded_through_auto_classes(tiny_model) -> None:
    model, processor, info = tiny_model
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    assert info.resolved_revision.startswith("sha256:") and info.dtype == "float32"
    # The projector must not be Gemma 3's zero init, or no image information reaches the language model.
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_tiny_model_build_is_deterministic(tmp_path: Path) -> None:
    first, second = build_tiny_gemma3(tmp_path / "a"), build_tiny_gemma3(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_image_placeholder_expands_to_soft_tokens(tiny_model, synthetic_root: Path) -> None:
    _, processor, _ = tiny_model
    from PIL import Image

    image = Image.open(next(synthetic_root.rglob("*.png"))).convert("RGB")
    batch = processor(text=[prompt_text(processor)], images=[[image]], add_special_tokens=False, return_tensors="pt")
    soft = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    assert int((batch["input_ids"] == soft).sum()) == MM_TOKENS_PER_IMAGE
    assert int(batch["token_type_ids"].sum()) == MM_TOKENS_PER_IMAGE
    assert (batch["input_ids"][0] == processor.tokenizer.bos_token_id).sum() == 1  # no doubled <bos>


def test_answer_tokens_are_the_eight_digits(tiny_model) -> None:
    _, processor, _ = tiny_model
    ids = answer_token_ids(processor)
    assert len(set(ids)) == NUM_CLASSES
    assert [processor.tokenizer.decode([i]) for i in ids] == [str(d) for d in range(NUM_CLASSES)]
    assert prompt_text(processor).endswith("<start_of_turn>model\n")
    assert end_of_turn_id(processor) == processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")


def test_scores_are_probabilities_and_batching_does_not_change_them(tiny_model, synthetic_root: Path) -> None:
    model, processor, _ = tiny_model
    paths = sorted(synthetic_root.rglob("*-100-*.png"))[:5]
    batched = score_images(model, processor, paths, batch_size=4)
    single = score_images(model, processor, paths, batch_size=1)
    assert batched.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize(
    "loaded",
    ["tiny_model", pytest.param("real_vocabulary_model", marks=pytest.mark.slow)],  # slow: a 262,145-row vocabulary
)
def test_scores_read_the_answer_token_logits(loaded: str, request: pytest.FixtureRequest, synthetic_root: Path) -> None:
    """Pointing one answer's row of the LM head along the hidden states it reads must make that answer the
    prediction for every image, on the tiny tokenizer and on Gemma 3's.

    The head is untied from the input embeddings first: with them tied, the boost would also change every prompt
    token that is a digit (Gemma 3's prompt holds the answer digits a dozen times) and so the hidden states."""
    model, processor, _ = request.getfixturevalue(loaded)
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    paths = sorted(synthetic_root.rglob("*-100-*.png"))[:3]
    read: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: read.append(args[0][:, -1].detach()))
    score_images(model, processor, paths, batch_size=2)
    hook.remove()
    hidden = torch.cat(read)
    direction = hidden.mean(dim=0)
    assert (hidden @ direction > 0).all()  # one direction that every image's answer position leans along
    target = answer_token_ids(processor)[5]
    with torch.no_grad():
        head.weight[target] = 1e3 * direction / direction.norm() ** 2
    probabilities = score_images(model, processor, paths, batch_size=2)
    answers = generate_answers(model, processor, paths, batch_size=2, max_new_tokens=1)
    assert (probabilities.argmax(axis=1) == 5).all()
    # generation (the reference's method) starts its answer with the same token, and parsing finds the class
    assert [parse_answer(answer) for answer in answers] == [5] * len(paths)
