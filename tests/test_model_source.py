"""Every kind of model id resolved in one place: the built-in models, a local folder and a hub id, each accepted
offline by the checks that run before any weights load; and the refusals, in one line, of what cannot load here."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from repo_params import params

from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.model.builtin import medgemma_4b_config, tiny_model_folder
from medgemma_breakhis.model.load import ModelLoadError, check_lora_targets, check_model, load_processor
from medgemma_breakhis.model.prompt import prompt_text

HUB_ID = "google/medgemma-4b-it"
COMMIT = "0" * 40


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A copy of the tiny model, as a model saved with save_pretrained in a local folder."""
    return Path(shutil.copytree(tiny_model_folder(), tmp_path / "model"))


@pytest.fixture
def filled_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, with MedGemma's config in the Hugging Face cache, as a machine that once downloaded it has."""
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT
    medgemma_4b_config().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    # read at import, so the environment variables would come too late
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    ("model_id", "needs"),
    [
        ("tiny-gemma3", False),
        ("medgemma-4b-random", False),
        ("./models/medgemma", False),
        ("/models/medgemma", False),
        ("models/google/medgemma", False),
        (HUB_ID, True),
        ("medgemma", True),
    ],
)
def test_only_a_hub_id_needs_a_hugging_face_token(model_id: str, needs: bool) -> None:
    assert (params({"model": {"id": model_id}}).model.kind == "hub") is needs


def test_the_tiny_model_is_accepted_offline() -> None:
    check_lora_targets(params({"model": {"id": "tiny-gemma3"}}).model, params().lora)


def test_the_architecture_exact_model_is_accepted_offline_without_building_its_weights(gemma3_tokenizer) -> None:
    started = time.monotonic()
    check_lora_targets(params({"model": {"id": "medgemma-4b-random"}}).model, params().lora)
    assert time.monotonic() - started < 60  # its 8 GB of weights would take minutes on a CPU


def test_a_local_folder_is_accepted(tiny_folder: Path) -> None:
    check_lora_targets(params({"model": {"id": str(tiny_folder)}}).model, params().lora)


def test_a_hub_id_is_accepted_offline_from_a_filled_cache(filled_hub_cache: None) -> None:
    check_lora_targets(params({"model": {"id": HUB_ID}}).model, params().lora)


def test_the_architecture_exact_model_refuses_a_cpu_in_one_line_before_any_work(
    split_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: medgemma-4b-random is meant for it")
    with pytest.raises(ModelLoadError) as refused:
        run_evaluation(
            params({"model": {"id": "medgemma-4b-random"}}),
            "baseline",
            image_root=synthetic_root,
            test_csv=split_dir / "test.csv",
            metrics_path=tmp_path / "metrics.json",
            predictions_path=tmp_path / "predictions.csv",
            roc_path=tmp_path / "roc.csv",
        )
    message = str(refused.value)
    assert "\n" not in message and "no CUDA GPU" in message and "model.id=tiny-gemma3" in message
    assert "gated" not in message and "huggingface.co" not in message
    assert not list(tmp_path.iterdir())  # no MLflow run, no output


def test_a_chat_template_kept_only_in_the_tokenizer_config_is_used(tiny_folder: Path) -> None:
    template = (tiny_folder / "chat_template.jinja").read_text()
    (tiny_folder / "chat_template.jinja").unlink()
    config = json.loads((tiny_folder / "tokenizer_config.json").read_text())
    (tiny_folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    model = params({"model": {"id": str(tiny_folder)}}).model
    check_model(model)
    assert prompt_text(load_processor(model)).endswith("<start_of_turn>model\n")


def test_a_model_without_a_chat_template_is_refused_before_its_weights_load(tiny_folder: Path) -> None:
    (tiny_folder / "chat_template.jinja").unlink()
    (tiny_folder / "model.safetensors").unlink()  # refused without them: so never loaded
    with pytest.raises(ModelLoadError, match=r"has no chat template \(chat_template.jinja, chat_template.json or"):
        check_model(params({"model": {"id": str(tiny_folder)}}).model)
