"""The Makefile takes values from its users (make report BASE=…, ARGS=…, GPUS=…) as data, never as shell code, and
the clone's own path too (tests/test_install_scratch.py runs make setup at a path with a space)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = REPO / "Makefile"
USER_VALUES = {"BASE", "PLOTS_URL", "ARGS", "GPUS"}


def test_user_values_are_exported_and_never_pasted_into_a_recipe() -> None:
    text = MAKEFILE.read_text()
    (exported,) = re.findall(r"^export ([A-Z_ ]+)$", text, flags=re.MULTILINE)
    assert set(exported.split()) == USER_VALUES
    recipes = [line for line in text.splitlines() if line.startswith(("\t", "CLOUD_FLAGS ="))]
    for line in recipes:
        pasted = {name for name in USER_VALUES if f"$({name})" in line or f"${{{name}}}" in line}
        assert not pasted, f"{sorted(pasted)} pasted into: {line.strip()}"


def test_every_environment_path_in_a_recipe_is_quoted_so_a_clone_at_a_path_with_a_space_works() -> None:
    """Finding: `$(BIN)/python` (an absolute path) unquoted split at a space in the clone's path: every target failed
    there with `make: /home/me/my: No such file or directory`."""
    recipes = [line for line in MAKEFILE.read_text().splitlines() if line.startswith(("\t", "PYTEST :="))]
    unquoted = [line.strip() for line in recipes if re.search(r'(?<!")\$\((BIN|CLOUD_BIN)\)', line)]
    assert unquoted == []


@pytest.mark.slow  # make and a tool in subprocesses
def test_a_branch_name_that_is_shell_code_is_refused_not_run(tmp_path: Path) -> None:
    """852abeb: `make report BASE='main";>PWN;"'` (a valid branch name) created the file."""
    planted, clone, venv = tmp_path / "PWN", tmp_path / "clone", REPO / ".venv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)  # DVC reads the repository it runs in
    result = subprocess.run(
        ["make", f"VENV={venv}", "-o", f"{venv}/.installed", "report", f'BASE=main";touch {planted};"'],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert (
        f"""'main";touch {planted};"' is no branch, tag, commit or DVC experiment of this repository""" in result.stderr
    )
    assert not planted.exists()


@pytest.mark.slow  # make and a tool in subprocesses
def test_make_predict_lists_a_refused_path_without_an_error_line_of_make(tmp_path: Path) -> None:
    missing, out = tmp_path / "missing.png", tmp_path / "predicted.csv"
    result = subprocess.run(
        ["make", "-o", ".venv/.installed", "predict", f"IMAGES={missing}", f"OUT={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"refused {missing}: " in result.stderr
    assert "Error" not in result.stderr  # make's `*** [Makefile:…: predict] Error 1`
