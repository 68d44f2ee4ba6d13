"""Where the repository is, also from inside DVC's experiment copies, and content digests of files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_DVC_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def main_repo_root() -> Path:
    """The repository's own root, also from inside `dvc exp run --temp/--queue` (which runs in .dvc/tmp/exps/…)."""
    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    parts = root.parts
    for index in range(len(parts) - len(_DVC_EXPERIMENT_COPIES) + 1):
        if parts[index : index + len(_DVC_EXPERIMENT_COPIES)] == _DVC_EXPERIMENT_COPIES:
            return Path(*parts[:index])
    return root


def in_main_repo(path: Path) -> Path:
    """`path` as is when absolute, else under the main repository's root: shared by the workspace and every
    DVC experiment copy, and untouched when DVC cleans a copy away."""
    return path if path.is_absolute() else main_repo_root() / path


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:  # in chunks: a file may be gigabytes
        return "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
