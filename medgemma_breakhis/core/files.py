"""Files: atomic outputs, content digests, and where the repository and its pipeline paths are."""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`, renamed onto it on success (after removing abandoned ones)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for abandoned in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(abandoned)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # what mkdir would have given; mkdtemp makes folders private
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have given; mkstemp makes files private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()


def main_repo_root() -> Path:
    """The repository's own root, also from inside `dvc exp run --temp/--queue` (which runs in .dvc/tmp/exps/…)."""
    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    return Path(str(root).partition(os.sep + os.path.join(".dvc", "tmp", "exps"))[0])


def in_main_repo(path: Path) -> Path:
    return path if path.is_absolute() else main_repo_root() / path


def pipeline_paths(pipeline: Path = Path("dvc.yaml")) -> dict[str, str]:
    return YAML(typ="safe").load(pipeline)["vars"][0]
