"""Which checkpoint a training run may resume from, on hand-made checkpoint folders (no model)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from repo_params import params
from safetensors.torch import save_file

from medgemma_breakhis.train.checkpoints import (
    MANIFEST,
    Fingerprint,
    checkpoint_folder,
    last_complete_checkpoint,
    prepare_checkpoint_folder,
    training_fingerprint,
)


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run's folder is looked up in the DVC cache of the repository a stage runs in: none here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)


def fingerprint(**params: object) -> Fingerprint:
    return Fingerprint(
        params={"lora.r": 8, "train.epochs": 5, **params},
        model={"resolved_revision": "sha256:aa"},
        data={"train_split": "sha256:" + "1" * 64, "images": "sha256:" + "2" * 64},
        libraries={"torch": "2.13.0", "transformers": "5.23.0"},
    )


def checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"lora_A": torch.zeros(4, 2)}, path / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(64, 64)}}}, path / "optimizer.pt")  # mostly tensor data
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_differences_name_every_changed_input_with_both_values() -> None:
    ours = fingerprint(**{"lora.r": 16})
    theirs = Fingerprint(
        params={"lora.r": 8, "train.epochs": 5},
        model=ours.model,
        data={**ours.data, "train_split": "sha256:" + "9" * 64},
        libraries={**ours.libraries, "torch": "2.12.0"},
    )
    assert ours.differences(theirs) == [
        "params lora.r: 8 in the checkpoint, 16 now",
        "data train_split: sha256:999999999999 in the checkpoint, sha256:111111111111 now",
        "libraries torch: '2.12.0' in the checkpoint, '2.13.0' now",
    ]
    assert ours.differences(ours) == []
    assert ours.digest != theirs.digest and ours.digest == fingerprint(**{"lora.r": 16}).digest


def test_other_inputs_get_their_own_folder_and_are_reported_not_resumed(tmp_path: Path, caplog) -> None:
    stale = prepare_checkpoint_folder(tmp_path, fingerprint())
    checkpoint(stale, 40, json.dumps({"global_step": 40}))
    (tmp_path / "train-0000000000000000").mkdir()  # no manifest: unknown inputs
    caplog.set_level(logging.WARNING)
    ours = fingerprint(**{"lora.r": 16})
    folder = prepare_checkpoint_folder(tmp_path, ours)
    assert folder == checkpoint_folder(tmp_path, ours) != stale
    assert Fingerprint.load(folder / MANIFEST) == ours
    assert last_complete_checkpoint(folder, clean=True) is None
    assert (
        f"not resuming the checkpoints in {stale}: made under different inputs:\n"
        "    params lora.r: 8 in the checkpoint, 16 now" in caplog.text
    )
    assert f"{tmp_path / 'train-0000000000000000'}: its {MANIFEST} cannot be read" in caplog.text
    assert (stale / "checkpoint-40").is_dir()  # another experiment's: left alone


def test_the_last_complete_checkpoint_is_resumed_and_interrupted_saves_are_deleted(tmp_path: Path) -> None:
    folder = prepare_checkpoint_folder(tmp_path, fingerprint())
    checkpoint(folder, 10, json.dumps({"global_step": 10}))
    checkpoint(folder, 20, json.dumps({"global_step": 20}))
    truncated = checkpoint(folder, 30, '{"global_step": 30, "log_hist')
    unfinished = checkpoint(folder, 40, None)
    assert last_complete_checkpoint(folder, clean=False) == folder / "checkpoint-20"
    assert truncated.exists() and unfinished.exists()
    assert last_complete_checkpoint(folder, clean=True) == folder / "checkpoint-20"
    assert not truncated.exists() and not unfinished.exists()


def test_fingerprint_covers_training_params_data_and_libraries_but_not_execution_nor_code(
    tmp_path: Path, synthetic_root: Path
) -> None:
    """852abeb fingerprinted every loaded module of the repository: a docstring edit threw the checkpoints away."""
    files = sorted(p.relative_to(synthetic_root).as_posix() for p in synthetic_root.rglob("*-100-*.png"))[:3]
    (tmp_path / "train.csv").write_text("filename\n" + "\n".join(files) + "\n")

    def of(raw: dict, images: list[str] = files, prompt: str = "the prompt") -> Fingerprint:
        return training_fingerprint(params(raw), "sha256:aa", prompt, tmp_path / "train.csv", synthetic_root, images)

    base = of({})
    assert of({"execution": {"checkpoint_steps": 7, "micro_batch_size": 2, "num_processes": 2}}) == base
    assert of({"eval": {"batch_size": 2}, "data": {"source": "synthetic"}}) == base
    assert of({"lora": {"r": 4}}).differences(base) == ["params lora.r: 8 in the checkpoint, 4 now"]
    assert [line.split(":")[0] for line in of({}, files[:2]).differences(base)] == ["data images"]
    assert [line.split(":")[0] for line in of({}, prompt="another").differences(base)] == ["data prompt"]
    assert not any("medgemma_breakhis" in json.dumps(value) for value in asdict(base).values())
    assert {"torch", "transformers", "peft", "trl", "accelerate"} == set(base.libraries)


@pytest.mark.parametrize("manifest", ["{not json", json.dumps({"params": {}})])
def test_unreadable_manifest_is_reported_not_resumed(tmp_path: Path, manifest: str, caplog) -> None:
    broken = tmp_path / "train-ffffffffffffffff"
    broken.mkdir()
    (broken / MANIFEST).write_text(manifest)
    caplog.set_level(logging.WARNING)
    prepare_checkpoint_folder(tmp_path, fingerprint())
    assert f"not resuming the checkpoints in {broken}: its {MANIFEST} cannot be read" in caplog.text


def test_corrupt_checkpoints_are_moved_aside_with_one_line_and_never_loaded(tmp_path: Path, caplog) -> None:
    """852abeb: a trainer_state.json of `[]` stopped `train` with an AttributeError, and a truncated weights file
    with a valid state with a SafetensorError after "resuming from", on every run until deleted by hand."""
    folder = prepare_checkpoint_folder(tmp_path, fingerprint())
    good = checkpoint(folder, 10, json.dumps({"global_step": 10}))
    checkpoint(folder, 20, "[]")
    truncated = checkpoint(folder, 30, json.dumps({"global_step": 30}))
    weights = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    flipped = checkpoint(folder, 40, json.dumps({"global_step": 40}))
    optimizer = bytearray((flipped / "optimizer.pt").read_bytes())
    optimizer[len(optimizer) // 2] ^= 0xFF
    (flipped / "optimizer.pt").write_bytes(bytes(optimizer))
    caplog.set_level(logging.WARNING)

    assert last_complete_checkpoint(folder, clean=True) == good
    aside = tmp_path / "corrupt"
    assert sorted(p.name for p in aside.iterdir()) == [f"{folder.name}-checkpoint-{step}" for step in (20, 30, 40)]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-10"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert f"{folder / 'checkpoint-20'} is corrupt (trainer_state.json holds no optimizer step: '[]')" in warnings[0]
    assert "adapter_model.safetensors: SafetensorError" in warnings[1] and "optimizer.pt:" in warnings[2]
    assert all(w.endswith("never loaded") for w in warnings)

    shutil.rmtree(good)
    checkpoint(folder, 20, "[]")  # again, with a folder of that name already aside
    assert last_complete_checkpoint(folder, clean=True) is None  # nothing good left: the run starts afresh
    assert len(list(aside.iterdir())) == 4


def test_a_finished_runs_last_checkpoint_stays_until_the_dvc_cache_holds_its_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """feb5c85 deleted the checkpoints as `train` ended, before DVC cached the adapter: a failed cache write cost the
    whole training. Now a finished run's folder is resumed at its last step until DVC's cache holds the adapter, and
    removed at the next run's start once it does, a forced run of the same inputs included (one finished folder)."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as DVC sets it for the stages it runs
    root = tmp_path / "checkpoints"
    folder = prepare_checkpoint_folder(root, fingerprint())
    last = checkpoint(folder, 40, json.dumps({"global_step": 40}))
    adapter = tmp_path / "models" / "adapter"  # what `train` saved at the end: the last checkpoint's weights
    adapter.mkdir(parents=True)
    shutil.copy(last / "adapter_model.safetensors", adapter)
    (adapter / "adapter_config.json").write_text("{}")
    caplog.set_level(logging.INFO)

    other = prepare_checkpoint_folder(root, fingerprint(**{"lora.r": 16}))  # the adapter is not in DVC's cache
    assert prepare_checkpoint_folder(root, fingerprint()) == folder
    assert last_complete_checkpoint(folder, clean=True) == last  # nothing to train again: the adapter is saved anew
    checkpoint(other, 8, json.dumps({"global_step": 8}))  # the other inputs' run, finished too: the same weights here
    unfinished = prepare_checkpoint_folder(root, fingerprint(**{"lora.r": 4}))
    save_file(
        {"lora_A": torch.ones(4, 2)},
        checkpoint(unfinished, 4, json.dumps({"global_step": 4})) / "adapter_model.safetensors",
    )
    with Repo(str(tmp_path)) as repo:
        repo.add("models/adapter")  # what `dvc repro` does with a stage's outputs when it can write its cache
    assert prepare_checkpoint_folder(root, fingerprint()) == folder
    assert f"removing {folder}: its run finished, and the DVC cache holds its adapter" in caplog.text
    assert f"removing {other}:" in caplog.text and set(root.iterdir()) == {folder, unfinished}
    assert f"not resuming the checkpoints in {unfinished}" in caplog.text
    assert last_complete_checkpoint(folder, clean=True) is None  # a forced run trains afresh
