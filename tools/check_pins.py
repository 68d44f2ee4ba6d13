"""Whether the running environment holds exactly what a requirements file pins (`make setup` asks after installing):
every package at its pinned version, its files as its RECORD gives them, and no dependency of theirs left unpinned."""

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from tools.install_requirements import damaged

logger = logging.getLogger(__name__)

# What `python -m venv` puts in an environment, and `pip freeze` leaves out: never reported as unpinned extras.
VENV_SEEDS = frozenset({"pip", "setuptools", "wheel"})


def read_pins(requirements: Path) -> tuple[dict[str, Requirement], list[str]]:
    """The file's pins by normalised name, and its lines that are not one exact `name==version` pin."""
    pins: dict[str, Requirement] = {}
    problems = []
    for number, raw in enumerate(requirements.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{requirements}:{number}: {line!r}"
        try:
            requirement = Requirement(line)
        except InvalidRequirement as err:
            problems.append(f"{where} is not a requirement: {err}")
            continue
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            problems.append(f"{where} is not an exact pin; write {requirement.name}==<version>")
        else:
            pins[canonicalize_name(requirement.name)] = requirement
    return pins, problems


def _needed(pins: dict[str, Requirement], installed: dict[str, importlib.metadata.Distribution]) -> dict[str, str]:
    """Every package the pinned ones need here (extras they ask of each other included), and the first to need it."""
    needed: dict[str, str] = {}
    queue = [(name, frozenset(pin.extras)) for name, pin in pins.items() if name in installed]
    seen = set(queue)
    while queue:
        name, extras = queue.pop()
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
                continue
            dependency = canonicalize_name(requirement.name)
            needed.setdefault(dependency, name)
            item = (dependency, frozenset(requirement.extras))
            if dependency in installed and item not in seen:
                seen.add(item)
                queue.append(item)
    return needed


def pin_problems(requirements: Path) -> tuple[list[str], list[str]]:
    """(problems, notes): problems make the environment differ from the pins; notes name what nothing pinned needs."""
    pins, problems = read_pins(requirements)
    # the first distribution of each name on sys.path, the one Python imports
    installed = {canonicalize_name(d.metadata["Name"]): d for d in reversed(list(importlib.metadata.distributions()))}
    for name, pin in sorted(pins.items()):
        if name not in installed:
            problems.append(f"{pin.name} is pinned ({pin.specifier}) but not installed")
        elif not pin.specifier.contains(version := installed[name].version, prereleases=True):
            problems.append(f"{pin.name} {version} is installed, but {requirements} pins {pin.specifier}")
        elif problem := damaged(installed[name]):
            problems.append(f"{pin.name} {version} is damaged: {problem}; `make setup` installs it again")
    needed = _needed(pins, installed)
    # the venv's own pip, kept at the version the venv's Python brings, serves a package that needs it
    unpinned = sorted(set(needed) - set(pins) - {"pip"})
    problems += [f"{needed[name]} needs {name}, which {requirements} does not pin" for name in unpinned]
    notes = [
        f"{name} {installed[name].version} is installed but neither pinned nor needed by a pinned package"
        for name in sorted(set(installed) - set(pins) - set(needed) - VENV_SEEDS)
    ]
    return problems, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requirements", type=Path, help="a requirements file of exact pins")
    args = parser.parse_args(argv)
    # not logs.configure_logging: this runs before the requirements (tqdm, for one) are installed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.requirements.is_file():
        sys.exit(f"{args.requirements} not found; run from the repository root")
    problems, notes = pin_problems(args.requirements)
    for note in notes:
        logger.warning("%s", note)
    if problems:
        sys.exit(f"{sys.prefix} does not match {args.requirements}:\n  " + "\n  ".join(problems))
    logger.info("%s matches %s: every package pinned and at its pinned version", sys.prefix, args.requirements)


if __name__ == "__main__":
    main()
