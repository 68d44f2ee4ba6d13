"""`make setup` and tools/install_requirements.py for real, in scratch environments with wheels built here: an install
cut short is repaired by the next one, a file changed in uv's cache is fetched again, and a clone at a path with a
space installs and checks."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.prefix) / "uv-0.13.8"  # the uv make setup bootstrapped for this environment, if it did
INSTALLERS = ["pip", pytest.param("uv", marks=pytest.mark.skipif(not UV.is_dir(), reason="no bootstrapped uv here"))]
TINY_FILES = {"tiny_pkg/__init__.py": b"VALUE = 1\n", "tiny_pkg/data.bin": bytes(range(256)) * 64}


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A wheel of `files` (their .dist-info's METADATA and WHEEL, or minimal ones) and a RECORD of their sha256."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        **files,
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def _wheels(folder: Path) -> str:
    """tiny-pkg 1.0 and this environment's packaging (which tools/check_pins.py imports) as wheels in `folder`;
    returns the requirements file's text that pins both."""
    folder.mkdir()
    _wheel(folder, "tiny_pkg", "1.0", TINY_FILES)
    packaging = importlib.metadata.distribution("packaging")
    kept = {}  # its modules, METADATA and WHEEL: what the installer wrote beside them (RECORD, uv_cache.json) left out
    for file in packaging.files or []:
        if file.suffix != ".pyc" and (not file.parts[0].endswith(".dist-info") or file.name in {"METADATA", "WHEEL"}):
            kept[str(file)] = file.locate().read_bytes()
    _wheel(folder, "packaging", packaging.version, kept)
    return f"packaging=={packaging.version}\ntiny-pkg==1.0\n"


def _offline_environment(wheels: Path) -> dict[str, str]:
    """This environment's variables, but pip's configuration (and so uv's) only: no index, find-links `wheels`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_")) or k == "UV_CACHE_DIR"}
    return kept | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}


def _run(command: list[str], cwd: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # a new venv and two installs
@pytest.mark.parametrize("installer", INSTALLERS)
def test_a_package_an_install_cut_short_left_damaged_is_installed_again(tmp_path: Path, installer: str) -> None:
    """Finding: after a SIGKILL mid-install the next `make setup` found torch "already installed" (its METADATA was
    there, thousands of its files not) and certified it. The installer now installs afresh each package whose files
    are missing or differ from its RECORD."""
    environment = _offline_environment(tmp_path / "wheels")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(_wheels(tmp_path / "wheels"))
    scratch = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(scratch)
    if installer == "uv":
        (scratch / UV.name).symlink_to(UV)  # bootstrapped already: no index needed for it
    command = [str(scratch / "bin" / "python"), "-m", "tools.install_requirements", str(requirements)]
    command += ["--uv-version", "0.13.8"] if installer == "uv" else []
    assert (first := _run(command, REPO, environment)).returncode == 0, first.stderr
    assert f"with {installer}" in first.stderr
    (data,) = scratch.glob("lib/python3*/site-packages/tiny_pkg/data.bin")

    data.unlink()  # what an install killed half-way through leaves: the package's METADATA, not all its files
    second = _run(command, REPO, environment)

    assert second.returncode == 0, second.stderr
    assert data.is_file(), second.stderr
    assert data.read_bytes() == TINY_FILES["tiny_pkg/data.bin"]
    expected = "tiny_pkg-1.0.dist-info is damaged (tiny_pkg/data.bin is missing)"
    assert f"{expected}: installing it again" in second.stderr


@pytest.mark.slow  # two new venvs, three installs
@pytest.mark.skipif(not UV.is_dir(), reason="no bootstrapped uv here")
def test_a_file_changed_in_uvs_cache_is_fetched_again_by_the_next_new_environment(tmp_path: Path) -> None:
    """Finding: a CA bundle appended to in one environment (certifi's cacert.pem, a hard link into uv's cache) was in
    every new one, and `make setup` failed in each: its repair installed the same file from the cache. The installer
    now checks what it installed and installs a damaged package again with uv's cache of it refreshed."""
    environment = _offline_environment(tmp_path / "wheels") | {"UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(_wheels(tmp_path / "wheels"))
    installed = []
    for name in ("first", "second"):
        venv.EnvBuilder(with_pip=True).create(tmp_path / name)
        (tmp_path / name / UV.name).symlink_to(UV)
        command = [str(tmp_path / name / "bin" / "python"), "-m", "tools.install_requirements", str(requirements)]
        installed.append(_run([*command, "--uv-version", "0.13.8"], REPO, environment))
        assert installed[-1].returncode == 0, installed[-1].stderr
        (data,) = (tmp_path / name).glob("lib/python3*/site-packages/tiny_pkg/data.bin")
        if name == "first":
            assert data.stat().st_nlink > 1  # a hard link into uv's cache
            with data.open("r+b") as changed:  # in place, as a CA is appended to a bundle
                changed.write(b"changed")

    assert data.read_bytes() == TINY_FILES["tiny_pkg/data.bin"]
    expected = "tiny_pkg-1.0.dist-info is damaged (tiny_pkg/data.bin differs from its RECORD): installing it again"
    assert expected in installed[-1].stderr


@pytest.mark.slow  # make, a new venv and three installs
def test_make_setup_in_a_clone_at_a_path_with_a_space_installs_checks_and_repairs(tmp_path: Path) -> None:
    """Finding: a space in the repository's path broke every make target (`$(BIN)/python` unquoted). And the finding
    above through make: with .installed gone (a setup killed never writes it), `make setup` repairs what it left."""
    clone = tmp_path / "a clone with spaces"
    (clone / "tools").mkdir(parents=True)
    for name in ("Makefile", "tools/__init__.py", "tools/install_requirements.py", "tools/check_pins.py"):
        shutil.copy(REPO / name, clone / name)
    (clone / "requirements.txt").write_text(_wheels(tmp_path / "wheels"))
    environment = _offline_environment(tmp_path / "wheels")
    make = ["make", f"PYTHON={sys.executable}"]
    if UV.is_dir():
        (clone / ".venv").mkdir()
        (clone / ".venv" / UV.name).symlink_to(UV)
    else:
        make.append("INSTALLER=pip")

    assert (shown := _run([*make, "help"], clone, environment)).returncode == 0, shown.stderr
    assert "setup" in shown.stdout
    assert (setup := _run([*make, "setup"], clone, environment)).returncode == 0, setup.stdout + setup.stderr
    assert f"{clone}/.venv matches requirements.txt: every package pinned and at its pinned version" in setup.stderr
    assert (dry_run := _run([*make, "-n", "demo"], clone, environment)).returncode == 0, dry_run.stderr
    assert f'"{clone}/.venv/bin/dvc" exp run --temp' in dry_run.stdout

    (data,) = clone.glob(".venv/lib/python3*/site-packages/tiny_pkg/data.bin")
    data.unlink()
    (clone / ".venv" / ".installed").unlink()
    again = _run([*make, "setup"], clone, environment)

    assert again.returncode == 0, again.stdout + again.stderr
    assert data.is_file(), again.stderr
    assert data.read_bytes() == TINY_FILES["tiny_pkg/data.bin"]
    assert "tiny_pkg-1.0.dist-info is damaged (tiny_pkg/data.bin is missing" in again.stderr
    assert (clone / ".venv" / ".installed").is_file()
