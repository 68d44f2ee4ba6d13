"""`make test`'s parallel run (pytest-xdist): the tests of an `xdist_group`, which share a module's costly fixture, run
on one worker, so that the fixture is built once; the controller, which runs no test, loads no model library."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPED_TESTS = """
import pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    pass

@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    pass
"""


@pytest.mark.slow  # a parallel pytest run of its own
def test_the_tests_of_an_xdist_group_run_on_one_worker(tmp_path: Path) -> None:
    """pytest 9.2 with pytest-xdist 3.8 ignores the mark without a word (pytest-xdist#1386): each worker then built
    the fixture of every group again."""
    (flags,) = re.findall(r"^PYTEST := .* -m pytest (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    (tmp_path / "test_groups.py").write_text(GROUPED_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *flags.split(), "-n", "2", "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    workers = re.findall(r"^\[(gw\d+)\] .* PASSED test_groups.py::test_grouped\[\d\]", result.stdout, re.MULTILINE)
    assert len(workers) == 6 and len(set(workers)) == 1, result.stdout[-3000:]


def test_the_controller_of_a_parallel_run_imports_no_model_library() -> None:
    """The controller loads conftest.py alone, before any worker starts: a model library there (5 s of CPU) delays
    them all."""
    script = (
        "import json, sys; import conftest; print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO / "tests",
        env={"PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(json.loads(done.stdout.splitlines()[-1]))
    assert not imported & {"torch", "transformers", "peft", "trl", "mlflow", "sklearn"}, imported
