"""Training checkpoints that outlive an interrupted `train`, resumed only by a run of the same training inputs: each
set of inputs has its own folder, named by their digest and holding them in `fingerprint.json` (docs/reliability.md)."""

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medgemma_breakhis.core.files import atomic_write_json, main_repo_root, sha256
from medgemma_breakhis.core.logs import progress
from medgemma_breakhis.core.params import Params

logger = logging.getLogger(__name__)

MANIFEST = "fingerprint.json"
FOLDER_PREFIX = "train-"
CORRUPT_FOLDER = "corrupt"  # under the root: checkpoints found corrupt, kept for inspection, never resumed
NO_STEP = -1  # the step of a checkpoint whose trainer state parses but holds none: corrupt, not an interrupted save
TRAINING_SECTIONS = ("model", "lora", "train")  # what is trained; data and split params act through the data
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate")  # decide what a checkpoint holds and how it loads


@dataclass(frozen=True)
class Fingerprint:
    """The inputs a training run depends on; two runs with equal fingerprints train the same adapter."""

    params: dict[str, Any]
    model: dict[str, str]
    data: dict[str, str]
    libraries: dict[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, checkpoint: "Fingerprint") -> list[str]:
        """What a checkpoint was made under that this run does not have, one line per input."""
        theirs = asdict(checkpoint)
        return [
            f"{part} {key}: {_short(theirs[part].get(key))} in the checkpoint, {_short(ours.get(key))} now"
            for part, ours in asdict(self).items()
            for key in sorted(set(ours) | set(theirs[part]))
            if ours.get(key) != theirs[part].get(key)
        ]

    @classmethod
    def load(cls, path: Path) -> "Fingerprint":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _short(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return "absent" if value is None else repr(value)


def training_fingerprint(
    params: Params, resolved_revision: str, prompt: str, train_csv: Path, image_root: Path, filenames: Iterable[str]
) -> Fingerprint:
    """The `model`, `lora` and `train` params, the base model's revision, the training data (the split, every image's
    bytes, the templated `prompt`) and the library versions; no code of this repository."""
    listed = progress(list(filenames), desc="fingerprinting training images", unit="img", leave=False)
    images = hashlib.sha256("".join(sha256(image_root / filename) for filename in listed).encode())
    return Fingerprint(
        params={key: value for key, value in params.flat().items() if key.split(".")[0] in TRAINING_SECTIONS},
        model={"resolved_revision": resolved_revision},
        data={
            "train_split": sha256(train_csv),
            "images": "sha256:" + images.hexdigest(),
            "prompt": "sha256:" + hashlib.sha256(prompt.encode()).hexdigest(),
        },
        libraries={name: importlib.metadata.version(name) for name in LIBRARIES},
    )


def completed_step(checkpoint: Path) -> int | None:
    """The optimizer step a checkpoint holds; None if it was not saved completely (trainer_state.json, written last,
    missing or truncated); NO_STEP for a state that parses but holds no step."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else NO_STEP


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed: a state without a step, or a truncated or corrupt file (none unpickled)."""
    if completed_step(checkpoint) == NO_STEP:
        state = (checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8")
        return f"{TRAINER_STATE_NAME} holds no optimizer step: {state[:60]!r}"
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{path.name}: {bad} does not match its checksum"
        except Exception as err:  # noqa: BLE001 - any way a file fails to read makes the checkpoint unusable
            return f"{path.name}: {type(err).__name__}: {err}"
    return None


def checkpoint_folder(root: Path, fingerprint: Fingerprint) -> Path:
    return root / f"{FOLDER_PREFIX}{fingerprint.digest}"


def adapter_in_dvc_cache(folder: Path) -> bool:
    """Whether the main repository's DVC cache holds a checkpoint's weights in `folder`: a finished run's adapter."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if "DVC_ROOT" not in os.environ:  # a stage run by hand, not by DVC: nothing of it goes into a DVC cache
        return False
    weights = [path.read_bytes() for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*/adapter_model.safetensors")]
    try:
        with Repo(str(main_repo_root())) as repo:
            return any(repo.cache.local.exists(hashlib.md5(data).hexdigest()) for data in weights)
    except DvcException:  # DVC_ROOT is no DVC repository
        return False


def prepare_checkpoint_folder(root: Path, fingerprint: Fingerprint) -> Path:
    """This run's checkpoint folder, created with its manifest if new. A finished run's folder, this run's too, is
    removed once the DVC cache holds its adapter; every other one is reported (with why it is not resumed), never used."""
    folder = checkpoint_folder(root, fingerprint)
    for other in sorted(path for path in root.glob(f"{FOLDER_PREFIX}*") if path.is_dir()):
        if adapter_in_dvc_cache(other):
            logger.info("removing %s: its run finished, and the DVC cache holds its adapter", other)
            shutil.rmtree(other)
        elif other != folder:
            try:
                differences = fingerprint.differences(Fingerprint.load(other / MANIFEST))
                reason = "made under different inputs:\n    " + "\n    ".join(differences)
            except (FileNotFoundError, json.JSONDecodeError, TypeError) as err:
                reason = f"its {MANIFEST} cannot be read ({err}), so what it was made under is unknown"
            logger.warning(
                "not resuming the checkpoints in %s: %s\n  (delete the folder if no experiment needs it)", other, reason
            )
    if not (folder / MANIFEST).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / MANIFEST, asdict(fingerprint))
    return folder


def last_complete_checkpoint(folder: Path, clean: bool) -> Path | None:
    """The highest-step complete checkpoint in `folder`; `clean` deletes interrupted saves, moves corrupt ones aside."""
    complete: dict[int, Path] = {}
    for checkpoint in sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        step = completed_step(checkpoint)
        if step is None:
            if clean:
                logger.warning("deleting %s: it was interrupted while being saved", checkpoint)
                shutil.rmtree(checkpoint)
        elif clean and (problem := checkpoint_problem(checkpoint)) is not None:
            aside = checkpoint.parents[1] / CORRUPT_FOLDER / f"{checkpoint.parent.name}-{checkpoint.name}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            checkpoint.rename(aside)  # kept for inspection where no run looks
            logger.warning("%s is corrupt (%s): moved to %s, never loaded", checkpoint, problem, aside)
        else:  # checked sound, or not `clean`: the main process has cleaned the folder already, no NO_STEP is left
            complete[step] = checkpoint
    return complete[max(complete)] if complete else None
