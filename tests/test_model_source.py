"""Every kind of model id resolved in one place: the built-in models, a local folder and a hub id, each accepted
offline by the checks that run before any weights load; and the refusals, in one line, of what cannot load here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from repo_params import params

from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.model.builtin import DIGEST_FILE, medgemma_4b_config, tiny_model_folder, weights_digest
from medgemma_breakhis.model.load import (
    ModelLoadError,
    check_lora_targets,
    check_model,
    load_base_model,
    load_processor,
)
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


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This user's model cache (XDG_CACHE_HOME) and the shared temporary folder both in `tmp_path`, and the tiny
    model built afresh for the test (and for the tests after it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "shared-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "shared-tmp"))
    tiny_model_folder.cache_clear()
    yield tmp_path / "cache" / "medgemma-breakhis"
    tiny_model_folder.cache_clear()


def _plant(folder: Path, digest: str) -> None:
    """Alter the weights of the model in `folder`, and write beside them the digest of the original ones."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    save_file({name: tensor + 1 for name, tensor in weights.items()}, folder / "model.safetensors", {"format": "pt"})
    (folder / DIGEST_FILE).write_text(digest)


def test_a_planted_tiny_model_is_never_used_and_a_digest_file_never_trusted(own_cache: Path) -> None:
    """feb5c85 kept the tiny model in the shared temporary folder under a predictable name and used whatever was
    there: a copy with altered weights and the original weights_digest.txt was loaded, and recorded (and checked at
    registration) as the original revision."""
    built = tiny_model_folder()
    digest = weights_digest(built)
    shared = Path(tempfile.gettempdir()) / built.name  # where feb5c85 built it, and any user could put one first
    shutil.copytree(built, shared)
    _plant(shared, digest)
    _plant(built, digest)  # this user's own copy, altered in place
    tiny_model_folder.cache_clear()  # the next process
    assert tiny_model_folder() == built and built.parent == own_cache
    assert weights_digest(built) == digest == (built / DIGEST_FILE).read_text()  # replaced by a fresh build
    assert (own_cache.stat().st_mode & 0o777, built.stat().st_mode & 0o077) == (0o700, 0)
    _, _, info = load_base_model(params({"model": {"id": "tiny-gemma3"}}).model, "fp32")
    assert info.resolved_revision == digest
    _, _, info = load_base_model(params({"model": {"id": str(shared)}}).model, "fp32")  # a folder: its weights hashed
    assert info.resolved_revision == weights_digest(shared) != digest


def test_a_model_cache_that_anyone_else_can_write_or_owns_is_refused_in_one_line(own_cache: Path) -> None:
    """feb5c85: a root-owned 0700 copy in the shared temporary folder locked every other user out of the tiny model,
    with tracebacks about permissions."""
    own_cache.mkdir(parents=True)
    os.chmod(own_cache, 0o777)
    with pytest.raises(ModelLoadError) as refused:
        check_model(params({"model": {"id": "tiny-gemma3"}}).model)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"the model cache {own_cache} belongs to uid {os.getuid()}")
    assert "with mode 777" in message and message.endswith("remove it, or set XDG_CACHE_HOME to a folder of yours")
    if os.getuid() == 0:  # only root can give a folder to another user
        os.chmod(own_cache, 0o700)
        os.chown(own_cache, 4321, 4321)
        with pytest.raises(ModelLoadError, match=f"^the model cache {own_cache} belongs to uid 4321 with mode 700;"):
            tiny_model_folder()
    shutil.rmtree(own_cache)
    assert tiny_model_folder().parent == own_cache  # made again, this user's
