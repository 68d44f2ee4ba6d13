"""The whole offline pipeline through the real `dvc` CLI, in a temporary git repository.

One repository is reproduced once for the module; each test then checks one promise of the pipeline against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "split_balance", "baseline", "train", "evaluate")


def run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository of this project's tracked files, set to the offline profile, reproduced and committed."""
    root = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    yaml = YAML()
    params = yaml.load(root / "params.yaml")
    params["data"]["source"], params["model"]["id"] = "synthetic", "tiny-gemma3"
    yaml.dump(params, root / "params.yaml")
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "offline profile")
    output = run(root, "dvc", "repro")
    assert stages_run(output) == list(STAGES)
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "results")
    return root


def test_full_repro_fine_tunes_well_beyond_the_baseline(repo: Path) -> None:
    baseline = read_json(repo / "metrics" / "baseline.json")
    finetuned = read_json(repo / "metrics" / "finetuned.json")
    assert set(finetuned) == {"eight_class", "binary", "n_images"}
    assert set(finetuned["eight_class"]) == {"accuracy", "f1_weighted"}
    assert set(finetuned["binary"]) == {"accuracy", "f1_malignant"}
    assert finetuned["n_images"] == baseline["n_images"] > 0
    assert finetuned["eight_class"]["accuracy"] >= baseline["eight_class"]["accuracy"] + 0.4
    assert finetuned["eight_class"]["accuracy"] >= 0.7
    assert (repo / "models" / "adapter" / "adapter_config.json").is_file()
    assert (repo / "mlflow.db").is_file()


def test_second_repro_runs_nothing(repo: Path) -> None:
    output = run(repo, "dvc", "repro")
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output


def test_eval_setting_rescores_without_retraining_and_temp_run_leaves_workspace(repo: Path) -> None:
    output = run(repo, "dvc", "exp", "run", "--temp", "--name", "eval-batch-3", "-S", "eval.batch_size=3")
    assert stages_run(output) == ["baseline", "evaluate"]
    assert run(repo, "git", "status", "--porcelain").strip() == ""
    assert "eval-batch-3" in run(repo, "dvc", "exp", "show", "--no-pager", "--md")


def test_lora_rank_experiment_retrains_and_metrics_diff_shows_it(repo: Path) -> None:
    output = run(repo, "dvc", "exp", "run", "-S", "lora.r=16")
    assert stages_run(output) == ["train", "evaluate"]
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json"))
    assert "metrics/train.json" in diff
    assert diff["metrics/train.json"]["train_loss_mean"]["diff"] != 0
    params_diff = json.loads(run(repo, "dvc", "params", "diff", "--json"))
    assert (params_diff["params.yaml"]["lora.r"]["old"], params_diff["params.yaml"]["lora.r"]["new"]) == (8, 16)
