"""Training checkpoints that outlive an interrupted `train`, and are resumed only by a run of the same inputs.

Each set of training inputs (params, base model, data, code, library versions) has its own folder under the
checkpoint root, named by a digest of those inputs and holding them in `fingerprint.json`. A run resumes from the
last complete checkpoint in its own folder only; every other folder was made under different inputs, is never
resumed, and is reported with what differs. The root is outside DVC's outputs (DVC neither deletes it when it
re-runs `train` nor pushes it to a remote) and in the main repository, so experiments run by `dvc exp run --temp`
or `--queue` resume too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medgemma_breakhis.atomic import atomic_write_json
from medgemma_breakhis.logs import progress
from medgemma_breakhis.params import Params, to_flat_dict
from medgemma_breakhis.repository import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "fingerprint.json"
FOLDER_PREFIX = "train-"
# Param sections that decide what is trained. Data and split params act through the data they select.
TRAINING_SECTIONS = ("model", "lora", "train")
# How and when a step is executed does not change what is trained (`execution`): a checkpoint stays valid across
# these, and they are the train keys that dvc.yaml leaves out of the `train` stage's params.
NOT_FINGERPRINTED = frozenset(
    {
        "train.checkpoint_steps",
        "train.micro_batch_size",
        "train.gradient_checkpointing",
        "train.dataloader_workers",
        "train.compile",
    }
)
# Code outside this repository that decides what a checkpoint holds and how it is read back.
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate")
_PACKAGE_ROOT = Path(__file__).resolve().parent
_CODE_ROOTS = (_PACKAGE_ROOT, _PACKAGE_ROOT.parent / "stages")


@dataclass(frozen=True)
class Fingerprint:
    """The inputs a training run depends on; two runs with equal fingerprints train the same adapter."""

    params: dict[str, Any]
    model: dict[str, str]
    data: dict[str, str]
    code: dict[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, checkpoint: Fingerprint) -> list[str]:
        """What a checkpoint was made under that this run does not have, one line per input."""
        lines = []
        for component, ours in asdict(self).items():
            theirs = getattr(checkpoint, component)
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    lines.append(
                        f"{component} {key}: {_short(theirs.get(key))} in the checkpoint, {_short(ours.get(key))} now"
                    )
        return lines

    @classmethod
    def load(cls, path: Path) -> Fingerprint:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _short(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return "absent" if value is None else repr(value)


def images_sha256(image_root: Path, filenames: Iterable[str]) -> str:
    """One digest over the bytes of every listed image, in order."""
    digest = hashlib.sha256()
    for filename in progress(list(filenames), desc="fingerprinting training images", unit="img", leave=False):
        digest.update(file_sha256(image_root / filename).encode())
    return "sha256:" + digest.hexdigest()


def loaded_code() -> dict[str, str]:
    """Digests of this repository's modules that the running process has imported: the code that trains."""
    files = {}
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        path = Path(source).resolve()
        if any(path.is_relative_to(root) for root in _CODE_ROOTS):
            files[path.relative_to(_PACKAGE_ROOT.parent).as_posix()] = file_sha256(path)
    return dict(sorted(files.items()))


def training_params(params: Params) -> dict[str, Any]:
    """The params that decide what is trained, by dotted key: exactly the ones `train` lists as params deps in
    dvc.yaml and cv/dvc.yaml (a test holds them equal), so a key left out here re-runs nothing."""
    return {
        key: value
        for key, value in to_flat_dict(params).items()
        if key.split(".")[0] in TRAINING_SECTIONS and key not in NOT_FINGERPRINTED
    }


def training_fingerprint(
    params: Params, resolved_model_revision: str, train_csv: Path, image_root: Path, filenames: Iterable[str]
) -> Fingerprint:
    return Fingerprint(
        params=training_params(params),
        model={"resolved_revision": resolved_model_revision},
        data={"train_split": file_sha256(train_csv), "images": images_sha256(image_root, filenames)},
        code=loaded_code() | {f"version.{name}": importlib.metadata.version(name) for name in LIBRARIES},
    )


def completed_step(checkpoint: Path) -> int | None:
    """The optimizer step a checkpoint holds, or None if it was not saved completely.

    The trainer writes trainer_state.json last, so a checkpoint interrupted while saving has none, or a truncated one.
    """
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state.get("global_step")


def checkpoint_folder(root: Path, fingerprint: Fingerprint) -> Path:
    return root / f"{FOLDER_PREFIX}{fingerprint.digest}"


def report_other_folders(root: Path, fingerprint: Fingerprint) -> None:
    """Log every checkpoint folder under `root` made under other inputs, with why it is not resumed."""
    own = checkpoint_folder(root, fingerprint)
    for folder in sorted(root.glob(f"{FOLDER_PREFIX}*")):
        if folder == own or not folder.is_dir():
            continue
        try:
            reason = "made under different inputs:\n    " + "\n    ".join(
                fingerprint.differences(Fingerprint.load(folder / MANIFEST))
            )
        except (FileNotFoundError, json.JSONDecodeError, TypeError) as err:
            reason = f"its {MANIFEST} cannot be read ({err}), so what it was made under is unknown"
        logger.warning(
            "not resuming the checkpoints in %s: %s\n  (delete the folder if no experiment needs it)", folder, reason
        )


def prepare_checkpoint_folder(root: Path, fingerprint: Fingerprint) -> Path:
    """This run's checkpoint folder, created with its manifest if new; other folders are reported, never used."""
    report_other_folders(root, fingerprint)
    folder = checkpoint_folder(root, fingerprint)
    if not (folder / MANIFEST).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / MANIFEST, asdict(fingerprint))
    return folder


def last_complete_checkpoint(folder: Path, delete_incomplete: bool) -> Path | None:
    """The complete checkpoint of the highest step in `folder`, if any.

    With `delete_incomplete`, checkpoints interrupted while being saved are deleted, so the trainer never sees them.
    """
    complete: dict[int, Path] = {}
    for checkpoint in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = completed_step(checkpoint)
        if step is not None:
            complete[step] = checkpoint
        elif delete_incomplete:
            logger.warning("deleting %s: it was interrupted while being saved", checkpoint)
            shutil.rmtree(checkpoint)
    return complete[max(complete)] if complete else None
