"""Where a `model.id` is loaded from, decided in one place for everything that needs a model: loading the weights
(`modeling.load_base_model`), the checks before they load (`modeling.check_model`), the memory planner
(`tools/gpu_memory.py`) and the cloud launcher, which only asks whether a job needs a Hugging Face token and runs
without this package's heavy dependencies (so nothing heavy is imported at module level here).

A model id is one of:
- a built-in model, built locally, never downloaded: `tiny-gemma3`, the offline default (a tiny random Gemma 3 that
  trains on a CPU), or `medgemma-4b-random`, MedGemma 4B's architecture with random weights and Gemma 3's own
  tokenizer, for timing and sizing a real run on a GPU without the gated weights (never for results);
- a local folder holding a model saved with `save_pretrained` (config, weights, processor);
- anything else is a Hugging Face hub id, such as google/medgemma-4b-it, loaded at `model.revision`.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from medgemma_breakhis.errors import ExpectedError

TINY_MODEL_ID = "tiny-gemma3"
RANDOM_MEDGEMMA_ID = "medgemma-4b-random"
BUILT_IN_IDS = (TINY_MODEL_ID, RANDOM_MEDGEMMA_ID)
# Written beside weights whose digest is known at build time, so that 8 GB are not read again on every load.
DIGEST_FILE = "weights_digest.txt"

Kind = Literal["built-in", "folder", "hub"]


class ModelLoadError(ExpectedError, RuntimeError):
    """The model cannot be loaded here; the message says what to set."""


def is_path(model_id: str) -> bool:
    """A hub id is `name` or `owner/name`; `./x`, `/x`, `~/x` and `a/b/c` can only be folders."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def kind_of(model_id: str) -> Kind:
    if model_id in BUILT_IN_IDS:
        return "built-in"
    if is_path(model_id) or Path(model_id).is_dir():
        return "folder"
    return "hub"


def needs_hub_token(model_id: str) -> bool:
    """Whether loading `model_id` asks the Hugging Face hub (where MedGemma is gated behind a token)."""
    return kind_of(model_id) == "hub"


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` loads for a model id: a folder, or a hub id at a revision."""

    model_id: str
    kind: Kind
    location: str
    revision: str | None  # None for a folder

    @property
    def folder(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.location)


def require_gpu_for(model_id: str) -> None:
    """Refuse, in one line, to load `medgemma-4b-random`'s weights without a GPU."""
    import torch

    if model_id == RANDOM_MEDGEMMA_ID and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.id={RANDOM_MEDGEMMA_ID} is MedGemma 4B's size (4.3 billion parameters) for timing and sizing on "
            "a GPU, and no CUDA GPU is visible here: on a CPU, use model.id=tiny-gemma3"
        )


def resolve(model_id: str, revision: str, weights: bool = True) -> ModelSource:
    """The source of `model_id`, built locally if it is a built-in. Without `weights`, only what describes the
    model (config and processor) has to exist: a built-in is then built without its weights, in seconds, on any
    machine. Refuses in one line what cannot load here: a missing folder, or `medgemma-4b-random`'s weights
    without a GPU."""
    kind = kind_of(model_id)
    if kind == "hub":
        return ModelSource(model_id, kind, model_id, revision)
    if kind == "folder":
        if not Path(model_id).expanduser().is_dir():
            raise ModelLoadError(
                f"model.id={model_id!r} is a local path, and no folder is there (from {Path.cwd()}); "
                "set model.id to the folder holding the model's config.json and weights, or to a hub id "
                "such as google/medgemma-4b-it"
            )
        return ModelSource(model_id, kind, str(Path(model_id).expanduser()), None)
    if model_id == TINY_MODEL_ID:
        return ModelSource(model_id, kind, str(tiny_model_folder()), None)
    if weights:
        require_gpu_for(model_id)
    from medgemma_breakhis.medgemma_architecture import random_medgemma_folder

    return ModelSource(model_id, kind, str(random_medgemma_folder(weights=weights)), None)


def recorded_revision(source: ModelSource, commit_hash: str | None) -> str:
    """What the loaded weights are recorded as: the hub commit, or a digest of a folder's weights."""
    if source.folder is None:
        return commit_hash or "unknown"
    recorded = source.folder / DIGEST_FILE
    return recorded.read_text(encoding="utf-8") if recorded.is_file() else weights_digest(source.folder)


def weights_digest(folder: Path) -> str:
    """One digest over a folder's weight files: what a local or built model is recorded as, in place of a commit."""
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        with weights.open("rb") as stream:  # file_digest reads in 256 KiB chunks: a local MedGemma copy is 8 GB
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return f"sha256:{digest.hexdigest()[:16]}"


@cache
def tiny_model_folder() -> Path:
    """The tiny model, built afresh (once per process) and kept in a folder named by its digest.

    peft writes the base model's folder into the adapter's files: a folder that depends only on the model's content
    keeps the adapter byte-identical between runs, so DVC sees the same hash. Built beside it and renamed into place,
    so concurrent stages (DVC's queue workers, distributed ranks) never see a half-written model.
    """
    from medgemma_breakhis.tiny_model import build_tiny_gemma3

    parent = Path(tempfile.gettempdir())
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_ID}.partial-", dir=parent))
    try:
        build_tiny_gemma3(staging)
        folder = parent / f"{TINY_MODEL_ID}-{weights_digest(staging).removeprefix('sha256:')}"
        if not folder.exists():
            with contextlib.suppress(OSError):  # another process renamed its identical build into place first
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
