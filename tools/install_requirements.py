"""Install a pinned requirements file into this virtual environment (`make setup`'s first step: standard library and
pip only), with uv as pip's configuration directs, or with pip where uv cannot; a damaged package is installed afresh.
"""

import argparse
import collections
import csv
import functools
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# pip settings that change nothing installed: how pip talks, logs and caches (uv keeps a cache of its own).
_NO_EFFECT_ON_WHAT_IS_INSTALLED = (  # noqa: SIM905 - names, read as a sentence
    "cache_dir debug_mode disable_pip_version_check exists_action log no_clean no_color no_input "
    "no_python_version_warning progress_bar quiet require_venv root_user_action src_dir verbose warn_about_conflicts "
    "warn_script_location"
).split()
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
_UV_SWITCHES = {"no_index": ["--no-index"], "pre": ["--prerelease", "allow"], "require_hashes": ["--require-hashes"]}
# The variables uv reads pip's other settings from, and how each value is written there (a list joined by the separator
# uv splits it at). What may be a URL goes this way, never on uv's command line: `ps` shows a password there to anyone.
_UV_VARIABLES = {
    "UV_DEFAULT_INDEX": ("index_url", str),
    "UV_INDEX": ("extra_index_urls", " ".join),
    "UV_FIND_LINKS": ("find_links", ",".join),
    "UV_CONSTRAINT": ("constraints", " ".join),
    "UV_INSECURE_HOST": ("trusted_hosts", " ".join),
    "SSL_CERT_FILE": ("cert", str),
    "SSL_CLIENT_CERT": ("client_cert", str),
    "HTTP_PROXY": ("proxy", str),
    "HTTPS_PROXY": ("proxy", str),
    "UV_HTTP_TIMEOUT": ("timeout", lambda seconds: str(round(seconds))),
    "UV_HTTP_RETRIES": ("retries", str),
}


def uv_arguments() -> tuple[list[str], dict[str, str]] | None:
    """The `uv pip install` flags and variables that mean what pip's configuration means, as pip reads it; or None."""
    from pip._internal.commands import create_command

    command = create_command("install")
    options, defaults = vars(command.parse_args([])[0]), command.parser.defaults
    changed = {key for key, value in options.items() if key in defaults and value != defaults[key]}
    arguments = ["--index-strategy", "unsafe-best-match"]  # pip's: the best version across every index
    if options["compile"]:
        arguments.append("--compile-bytecode")
    arguments += [flag for key, flags in _UV_SWITCHES.items() if options[key] for flag in flags]
    formats = options["format_control"]  # the one option pip fills by mutating its default: read, never compared
    for flag, packages in (("--no-binary", formats.no_binary), ("--only-binary", formats.only_binary)):
        arguments += [part for package in sorted(packages) for part in (flag, package)]
    environment = {name: write(options[key]) for name, (key, write) in _UV_VARIABLES.items() if key in changed}
    translated = {*_UV_SWITCHES, *(key for key, _ in _UV_VARIABLES.values()), "compile", "format_control"}
    # and a list with an item that holds a space or a comma: uv splits its variables there (UV_FIND_LINKS at commas)
    split = {k for k in translated if isinstance(options[k], list) and any(set(" ,") & set(i) for i in options[k])}
    if untranslatable := sorted(changed - translated - set(_NO_EFFECT_ON_WHAT_IS_INSTALLED) | split):
        settings = ", ".join(untranslatable)
        logger.warning("uv cannot take the pip configuration's %s as pip does, so pip installs instead", settings)
        return None
    return arguments, environment


def damaged(distribution: importlib.metadata.Distribution) -> str | None:
    """How an installed distribution differs from its RECORD: the first file missing, or of a sha256 that no installed
    distribution's RECORD gives it (two distributions may ship the same file: the one installed last wins)."""
    from pip._internal.operations.install.wheel import rehash  # a file's sha256 as RECORD writes it

    if (record := distribution.read_text("RECORD")) is None:
        return "its RECORD is missing"
    for name, digest, _ in csv.reader(record.splitlines()):
        if not (path := Path(distribution.locate_file(name))).is_file():
            return f"{name} is missing"
        if digest and (found := rehash(str(path))[0]) != digest and found not in recorded_digests()[path]:
            return f"{name} differs from its RECORD"
    return None


@functools.cache
def recorded_digests() -> dict[Path, set[str]]:
    """Every installed file's sha256s, by path, as the RECORDs of the installed distributions give them."""
    digests = collections.defaultdict(set)
    for distribution in importlib.metadata.distributions():
        for name, digest, _ in csv.reader((distribution.read_text("RECORD") or "").splitlines()):
            digests[Path(distribution.locate_file(name))].add(digest)
    return digests


def bootstrap_uv(version: str) -> Path | None:
    """uv `version`, installed by pip beside (not among) the environment's packages; None, with a warning why."""
    target = Path(sys.prefix) / f"uv-{version}"
    binary = target / "bin" / "uv"
    if not binary.is_file():
        command = [*PIP_INSTALL, "--upgrade", "--target", str(target), f"uv=={version}"]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0 or not binary.is_file():
            logger.warning("uv %s cannot be installed here, so pip installs instead:\n%s", version, done.stderr.strip())
            return None
    return binary


def remove_damaged() -> list[str]:
    """Remove the `.dist-info` of each distribution that differs from its RECORD; returns them as `name==version`."""
    recorded_digests.cache_clear()  # an install since the last call changed them
    removed = []
    for info in Path(sysconfig.get_path("purelib")).glob("*.dist-info"):
        if problem := damaged(distribution := importlib.metadata.Distribution.at(info)):
            logger.warning("%s is damaged (%s): installing it again", info.name, problem)
            removed.append(f"{distribution.metadata['Name']}=={distribution.version}")
            shutil.rmtree(info)  # the installer then has it for not installed
    return removed


def install(requirements: list[str], uv_version: str | None) -> str:
    """Install `requirements` (installer arguments) by uv where it can take pip's configuration, else pip; says which."""
    if uv_version and (settings := uv_arguments()) and (uv := bootstrap_uv(uv_version)):
        arguments, environment = settings
        shown = [*requirements, "with uv", uv_version, *arguments, *(f"{k}={v!r}" for k, v in environment.items())]
        # each URL's user name and password (from `//` to the last `@` before its host) left out of the log
        logger.info("installing %s", re.sub(r"(?<=//)[^/\s]*@", "", " ".join(shown)))
        # uv's own configuration would make it differ from pip: only where its cache lives is kept
        child = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k == "UV_CACHE_DIR"}
        command = [str(uv), "pip", "install", "--no-config", "--quiet", "--python", sys.executable]
        subprocess.run([*command, *arguments, *requirements], env=child | environment, check=True)
        return f"uv {uv_version}"
    logger.info("installing %s with pip", " ".join(requirements))
    subprocess.run([*PIP_INSTALL, *requirements], check=True)
    return "pip"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requirements", type=Path, help="a requirements file of exact pins")
    parser.add_argument("--uv-version", help="the uv release to install with; without it, pip installs")
    args = parser.parse_args(argv)
    # not logs.configure_logging: this runs before the requirements (tqdm, for one) are installed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sys.prefix == sys.base_prefix:
        parser.error(f"{sys.executable} is not a virtual environment's Python; run the one in .venv")
    if not args.requirements.is_file():
        parser.error(f"{args.requirements} not found; run from the repository root")
    started = time.monotonic()
    try:
        remove_damaged()
        installer = install(["-r", str(args.requirements)], args.uv_version)
        if installer != "pip" and (again := remove_damaged()):  # uv links files from its cache: one changed in place
            install(["--no-cache", "--no-deps", *again], args.uv_version)  # in any environment arrives changed here
    except subprocess.CalledProcessError as err:
        fix = ". `make setup INSTALLER=pip` installs with pip instead of uv" if Path(err.cmd[0]).name == "uv" else ""
        sys.exit(f"installing {args.requirements} failed (exit status {err.returncode}); its output is above{fix}")
    elapsed = time.monotonic() - started
    logger.info("installed %s into %s with %s in %.0f s", args.requirements, sys.prefix, installer, elapsed)


if __name__ == "__main__":
    main()
