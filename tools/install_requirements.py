"""Install a pinned requirements file into the running virtual environment: with uv (pinned) where it can be had,
with pip otherwise, and either way from the same indexes, find-links and constraints as `pip install` would use
(pip's own parser reads its configuration for uv; a setting uv has no equivalent for means pip installs).

Run (what `make setup` does; it needs only the standard library and the environment's own pip: a fresh venv has them):
    .venv/bin/python -m tools.install_requirements requirements.txt --uv-version 0.13.8
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# pip settings that change nothing installed: how pip talks, logs and caches (uv keeps a cache of its own).
_NO_EFFECT_ON_WHAT_IS_INSTALLED = (  # noqa: SIM905 - names, read as a sentence
    "cache_dir debug_mode disable_pip_version_check exists_action log no_clean no_color no_input "
    "no_python_version_warning progress_bar quiet require_venv root_user_action src_dir verbose warn_about_conflicts "
    "warn_script_location"
).split()
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
# pip's list settings with the uv flag given once per item, and its switches with the uv flags they become.
_UV_LIST_FLAGS = {
    "extra_index_urls": "--index",
    "find_links": "--find-links",
    "constraints": "--constraints",
    "trusted_hosts": "--allow-insecure-host",
}
_UV_SWITCHES = {"no_index": ["--no-index"], "pre": ["--prerelease", "allow"], "require_hashes": ["--require-hashes"]}
# pip's certificate and proxy settings, and the environment variables uv reads them from.
_UV_VARIABLES = {"cert": ["SSL_CERT_FILE"], "client_cert": ["SSL_CLIENT_CERT"], "proxy": ["HTTP_PROXY", "HTTPS_PROXY"]}
# The other pip settings uv_arguments translates.
_TRANSLATED_OTHERWISE = {"compile", "index_url", "format_control", "timeout", "retries"}


class UntranslatableSettingError(Exception):
    """A pip setting uv has no equivalent for: pip must install, or the result could differ."""


def pip_install_options() -> tuple[dict[str, Any], dict[str, Any]]:
    """`pip install`'s options as this machine's pip configuration sets them, and pip's built-in defaults."""
    from pip._internal.commands import create_command  # pip's parser, so pip's precedence of files and variables

    command = create_command("install")
    options, _ = command.parse_args([])
    return vars(options), dict(command.parser.defaults)


def uv_arguments(options: dict[str, Any], defaults: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The `uv pip install` flags and environment variables that mean what the pip settings mean."""
    arguments = ["--index-strategy", "unsafe-best-match"]  # pip's: the best version across every index
    changed = {key for key, value in options.items() if key in defaults and value != defaults[key]}
    if options["compile"]:
        arguments.append("--compile-bytecode")
    if options["index_url"] != defaults["index_url"]:
        arguments += ["--default-index", options["index_url"]]
    for key, flag in _UV_LIST_FLAGS.items():
        arguments += [part for value in options[key] for part in (flag, value)]
    for key, flags in _UV_SWITCHES.items():
        if options[key]:
            arguments += flags
    # the one option pip fills by mutating its default in place: read it, never compare it
    formats = options["format_control"]
    for flag, packages in (("--no-binary", formats.no_binary), ("--only-binary", formats.only_binary)):
        arguments += [part for package in sorted(packages) for part in (flag, package)]
    environment = {name: options[key] for key, names in _UV_VARIABLES.items() if options[key] for name in names}
    if "timeout" in changed:
        environment["UV_HTTP_TIMEOUT"] = str(round(options["timeout"]))
    if "retries" in changed:
        environment["UV_HTTP_RETRIES"] = str(options["retries"])
    translated = {*_UV_LIST_FLAGS, *_UV_SWITCHES, *_UV_VARIABLES, *_TRANSLATED_OTHERWISE}
    if untranslatable := sorted(changed - translated - set(_NO_EFFECT_ON_WHAT_IS_INSTALLED)):
        settings = ", ".join(f"{key}={options[key]!r}" for key in untranslatable)
        raise UntranslatableSettingError(f"the pip configuration sets {settings}, which uv has no equivalent for")
    return arguments, environment


def bootstrap_uv(version: str) -> Path | None:
    """uv `version`, installed by pip beside (not among) the environment's packages; None, and why, if it cannot be."""
    target = Path(sys.prefix) / f"uv-{version}"
    binary = target / "bin" / "uv"
    if not binary.is_file():
        if target.exists():  # what an interrupted bootstrap left
            shutil.rmtree(target)
        command = [*PIP_INSTALL, "--target", str(target), f"uv=={version}"]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0 or not binary.is_file():
            logger.warning("uv %s cannot be installed here, so pip installs instead:\n%s", version, done.stderr.strip())
            return None
    return binary


def install(requirements: Path, uv_version: str | None) -> str:
    """Install `requirements` into this environment; returns which installer did."""
    if uv_version:
        try:
            arguments, environment = uv_arguments(*pip_install_options())
        except UntranslatableSettingError as err:
            logger.warning("%s, so pip installs instead of uv", err)
        else:
            if (uv := bootstrap_uv(uv_version)) is not None:
                logger.info("installing %s with uv %s %s", requirements, uv_version, " ".join(arguments))
                # uv's own configuration would make it differ from pip: only where its cache lives is kept
                child = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k == "UV_CACHE_DIR"}
                command = [str(uv), "pip", "install", "--no-config", "--quiet", "--python", sys.executable]
                subprocess.run([*command, *arguments, "-r", str(requirements)], env=child | environment, check=True)
                return f"uv {uv_version}"
    logger.info("installing %s with pip", requirements)
    subprocess.run([*PIP_INSTALL, "-r", str(requirements)], check=True)
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
        installer = install(args.requirements, args.uv_version)
    except subprocess.CalledProcessError as err:
        fix = ". `make setup INSTALLER=pip` installs with pip instead of uv" if Path(err.cmd[0]).name == "uv" else ""
        sys.exit(f"installing {args.requirements} failed (exit status {err.returncode}); its output is above{fix}")
    elapsed = time.monotonic() - started
    logger.info("installed %s into %s with %s in %.0f s", args.requirements, sys.prefix, installer, elapsed)


if __name__ == "__main__":
    main()
