"""The repository's layout keeps its promises: each stage's code deps in dvc.yaml and cv/dvc.yaml are exactly the
code it imports (a folder where it imports all of it), `train` re-runs only for params that change what is trained,
no stage imports a tool, the package has no import cycle, and no file points outside the repository."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from medgemma_breakhis.core.files import pipeline_paths
from medgemma_breakhis.train.checkpoints import TRAINING_SECTIONS

REPO = Path(__file__).resolve().parents[1]
# Packages of this repository; an import of anything else is a library's.
PACKAGES = ("medgemma_breakhis", "stages", "tools")


def module_file(name: str) -> Path | None:
    """The repository file of module `name`, or None if it is not one of this repository's modules (a package's
    `__init__.py`, empty, counts as none)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO.joinpath(*name.split(".")).with_suffix(".py")
    return path if path.is_file() else None


def imported_files(path: Path) -> set[Path]:
    """This repository's modules that `path` imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from package import module` names a module too
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {file for file in map(module_file, names) if file}
    return found


def import_closure(script: Path) -> set[str]:
    """`script` and every repository module it imports, directly or through another one, relative to the repo."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path))
    return {path.relative_to(REPO).as_posix() for path in seen}


# The pipeline files, read in a bare DVC project of their own: the repository's .dvcignore keeps cv/dvc.yaml out of
# its project until the cross-validation first runs.
PIPELINE_FILES = ("dvc.yaml", "cv/dvc.yaml", "params.yaml")


@dataclass(frozen=True)
class Stage:
    """What these tests read of a stage, as DVC resolves it (vars and matrix entries expanded)."""

    address: str  # how `dvc` names it from the repository root: `train`, `cv/dvc.yaml:train@fold1-100`
    cmd: str
    deps: tuple[str, ...]
    code_deps: frozenset[str]  # modules and folders of this repository's code
    params: frozenset[str]  # params deps, a whole section by its name


def pipeline_stages() -> list[Stage]:
    """Every stage of dvc.yaml and cv/dvc.yaml, read by DVC in a temporary project removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pipelines-") as folder:
        root = Path(folder)
        Repo.init(str(root), no_scm=True)
        for name in PIPELINE_FILES:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, root / name)
        with Repo(str(root)) as repo:
            stages = []
            for stage in repo.index.stages:
                dvcfile = Path(stage.dvcfile.path).relative_to(root).as_posix()
                deps = [Path(dep.fs_path).relative_to(root).as_posix() for dep in stage.deps]
                stages.append(
                    Stage(
                        address=stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}",
                        cmd=stage.cmd,
                        deps=tuple(path for path in deps if not path.endswith(".yaml")),
                        code_deps=frozenset(path for path in deps if path.split("/")[0] in PACKAGES),
                        params=frozenset(
                            key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params
                        ),
                    )
                )
            return stages


def stage_script(stage: Stage) -> Path:
    """The `stages/<name>.py` script a stage's command runs (`python -m stages.<name> ...`)."""
    words = stage.cmd.split()
    assert words[:2] == ["python", "-m"] and words[2].startswith("stages."), stage.cmd
    return REPO / "stages" / f"{words[2].removeprefix('stages.')}.py"


STAGES = pipeline_stages()


def address(stage: Stage) -> str:
    return stage.address


def test_both_pipelines_are_read() -> None:
    names = {address(stage) for stage in STAGES}
    assert {"download", "split_balance", "baseline", "train", "evaluate", "cv/dvc.yaml:summary"} <= names
    assert any(name.startswith("cv/dvc.yaml:train@") for name in names)


def modules_in(dep: str) -> set[str]:
    """The modules a code dep stands for: the file, or every module of the folder."""
    path = REPO / dep
    files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.name != "__init__.py"]
    return {p.relative_to(REPO).as_posix() for p in files}


@pytest.mark.parametrize("stage", STAGES, ids=address)
def test_code_deps_are_exactly_the_imports(stage) -> None:
    imports = import_closure(stage_script(stage))
    listed = set().union(*(modules_in(dep) for dep in stage.code_deps))
    assert not imports - listed and not listed - imports, (
        f"{address(stage)}: missing code deps {sorted(imports - listed)}, "
        f"deps it does not import {sorted(listed - imports)}"
    )
    whole = {dep for dep in stage.code_deps if (REPO / dep).is_dir()}
    for folder in {str(Path(path).parent) for path in imports if path.startswith("medgemma_breakhis/")}:
        if modules_in(folder) <= imports:
            assert folder in whole, f"{address(stage)} imports all of {folder}: list the folder, not its files"


@pytest.mark.parametrize("stage", STAGES, ids=address)
def test_at_most_ten_deps_and_never_the_execution_params(stage) -> None:
    assert len(stage.deps) <= 10, f"{address(stage)}: {len(stage.deps)} deps"
    assert "execution" not in {key.split(".")[0] for key in stage.params}, address(stage)


def test_the_package_has_no_import_cycle() -> None:
    """Module by module, lazy imports included."""
    modules = sorted((REPO / "medgemma_breakhis").rglob("*.py"))
    edges = {
        p.relative_to(REPO).as_posix(): {f.relative_to(REPO).as_posix() for f in imported_files(p)} for p in modules
    }
    visiting, done = set(), set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in visiting, "import cycle: " + " -> ".join([*path, module])
        if module in done:
            return
        visiting.add(module)
        for target in edges.get(module, ()):
            visit(target, [*path, module])
        visiting.discard(module)
        done.add(module)

    for module in edges:
        visit(module, [])


def test_package_init_files_are_empty_but_the_stages_one_which_imports_the_standard_library_alone() -> None:
    """The import closure leaves out `__init__.py`: sound only while they hold no code, but `stages/__init__.py`, which
    says how a stage process runs (garbage collection during its imports), not what it computes: no dep, as
    `execution:` is none."""
    stages_init = REPO / "stages" / "__init__.py"
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            assert init == stages_init or init.read_text() == "", init
    tree = ast.parse(stages_init.read_text())
    assert not any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= sys.stdlib_module_names


@pytest.mark.parametrize("script", sorted((REPO / "stages").glob("[!_]*.py")), ids=lambda path: path.stem)
def test_each_stage_runs_through_stage_entry_which_collects_garbage_again(script: Path) -> None:
    """`stages/__init__.py` pauses garbage collection while a stage started as a script imports; `stage_entry`, its
    last line, resumes it: a stage without it would run with no collection at all."""
    assert script.read_text().endswith('if __name__ == "__main__":\n    stage_entry(main)\n')


@pytest.mark.parametrize("script", sorted((REPO / "stages").glob("[!_]*.py")), ids=lambda path: path.stem)
def test_no_stage_imports_a_tool(script: Path) -> None:
    tools = sorted(path for path in import_closure(script) if path.startswith("tools/"))
    assert not tools, f"{script.name} imports {tools}: tools are not pipeline code and DVC does not track them"


def test_train_reruns_for_exactly_the_params_that_decide_what_is_trained() -> None:
    """The sections a checkpoint's fingerprint holds, whole; `execution` changes no checkpoint and re-runs nothing."""
    trains = [stage for stage in STAGES if stage_script(stage).stem == "train"]
    assert len(trains) > 1
    for stage in trains:
        assert stage.params == set(TRAINING_SECTIONS), address(stage)


def test_nothing_refers_outside_the_repository() -> None:
    """A clone has only its own files: no pointer to notes kept beside the repository."""
    # Built, so that this file does not match itself.
    needles = ["REFERENCE" + ".md", ".." + "/shared"]
    found = subprocess.run(
        ["git", "grep", "-n", "-F", *(f"-e{needle}" for needle in needles)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 1, found.stdout  # 1: no match


def test_the_cross_validation_shares_the_pipeline_paths_it_reuses() -> None:
    main, cross_validation = pipeline_paths(REPO / "dvc.yaml"), pipeline_paths(REPO / "cv" / "dvc.yaml")
    shared = main.keys() & cross_validation.keys()
    assert shared == {"raw_dir", "checkpoints_dir"}
    assert {key: cross_validation[key] for key in shared} == {key: main[key] for key in shared}
