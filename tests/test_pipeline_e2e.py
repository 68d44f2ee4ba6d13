"""The whole offline pipeline through the real `dvc` CLI, in a temporary git repository: the reproduction, what it
records, and the experiments and remotes a team works with.

One repository is reproduced once for the test run (conftest's `repo`). Tests that only read it share it, across
parallel workers too; a test that changes it (an experiment, a kill, a sweep, a remote) or runs a command that could
write in it works on its own copy (`workspace`), so the tests hold in any order and alone. No command may print a
secret, and no repository, the shared one or a copy, may keep one. The other end-to-end tests sit with the tests of
what they check: the cross-validation, the queued sweep, a killed training, the precision comparison, a cloud job.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from dvc_cli import (
    SECRET_VALUES,
    assert_no_secret_kept,
    clean_in_a_fresh_clone,
    command_env,
    copy_of,
    locked_md5,
    mlflow_client,
    pipeline_group,
    read_json,
    run,
    run_json,
    search,
    stages_run,
)

from medgemma_breakhis.core.params import load_params
from medgemma_breakhis.evaluate.metrics import ON_SCREEN, headline

pytestmark = pytest.mark.e2e


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def generate_experiment(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the repository after `dvc exp run --temp` of `eval.method=generate`, and that command's output."""
    copy = copy_of(repo, tmp_path_factory.mktemp("generate") / "workspace")
    output = run(
        copy,
        "dvc",
        "exp",
        "run",
        "--temp",
        "--name",
        "eval-generate",
        "-S",
        "eval.method=generate",
        "-S",
        "eval.max_new_tokens=4",
    )
    return copy, output


def test_full_repro_fine_tunes_well_beyond_the_baseline(repo: Path) -> None:
    baseline = read_json(repo / "metrics" / "baseline.json")
    finetuned = read_json(repo / "metrics" / "finetuned.json")
    assert set(finetuned) == {"eight_class", "binary", "patient_level", "n_images", "n_unparseable"}
    assert set(finetuned["eight_class"]) == {
        "accuracy",
        "accuracy_ci95_low",
        "accuracy_ci95_high",
        "f1_weighted",
        "per_class",
        "expected_calibration_error",
    }
    assert set(finetuned["binary"]) == {
        "accuracy",
        "accuracy_ci95_low",
        "accuracy_ci95_high",
        "f1_malignant",
        "roc_auc",
    }
    assert set(finetuned["patient_level"]) == {"accuracy", "eight_class_accuracy", "n_patients"}
    assert finetuned["n_images"] == baseline["n_images"] > 0
    assert finetuned["n_unparseable"] == 0
    for metrics in (baseline, finetuned):
        for kind in ("eight_class", "binary"):
            figures = metrics[kind]
            assert figures["accuracy_ci95_low"] <= figures["accuracy"] <= figures["accuracy_ci95_high"]
    assert finetuned["eight_class"]["accuracy"] >= baseline["eight_class"]["accuracy"] + 0.4
    assert finetuned["eight_class"]["accuracy"] >= 0.7
    assert finetuned["binary"]["roc_auc"] > baseline["binary"]["roc_auc"]
    probe = read_json(repo / "metrics" / "probe.json")  # the linear probe, fitted on the training split
    assert probe["n_images"] == finetuned["n_images"] and probe["eight_class"]["accuracy"] >= 0.5  # chance: 0.125
    shown = {key: value for key, value in headline(probe).items() if key in ON_SCREEN}
    assert read_json(repo / "metrics" / "headline" / "probe.json") == {"probe": shown}
    for name in ("baseline", "probe", "finetuned"):
        predictions = pd.read_csv(repo / "predictions" / f"{name}.csv")
        assert len(predictions) == finetuned["n_images"]
        assert (predictions["predicted_class"] == predictions["true_class"]).mean() == pytest.approx(
            read_json(repo / "metrics" / f"{name}.json")["eight_class"]["accuracy"]
        )
    assert (repo / "models" / "adapter" / "adapter_config.json").is_file()
    assert (repo / "mlflow.db").is_file()


def test_plots_render_confusion_matrices_roc_and_loss(repo: Path) -> None:
    plots = run_json(repo, "dvc", "plots", "show", "--json")["data"]
    expected = {"confusion_eight_class", "confusion_binary"}  # baseline, probe and fine-tuned side by side
    assert expected | {"roc_malignant", "training_loss"} <= set(plots)
    for plot_id in expected | {"roc_malignant", "training_loss"}:
        assert plots[plot_id][0]["content"]["data"]["values"], plot_id
    steps = read_json(repo / "metrics" / "train.json")["global_steps"]
    assert len(plots["training_loss"][0]["content"]["data"]["values"]) == steps


def test_one_repro_is_one_mlflow_parent_run_with_a_child_per_stage(repo: Path) -> None:
    parent, children = pipeline_group(repo, "workspace")
    assert set(children) == {"baseline", "probe", "train", "evaluate"}
    assert parent.info.status == "FINISHED"
    assert all(child.info.status == "FINISHED" for child in children.values())
    assert {child.data.tags["pipeline_key"] for child in children.values()} == {parent.data.tags["pipeline_key"]}
    assert {child.info.run_name for child in children.values()} == {f"{stage} fold1 100x" for stage in children}
    # the experiment's view in MLflow: its headline on the parent run, and what it changed in its description
    finetuned, baseline = (read_json(repo / "metrics" / f"{name}.json") for name in ("finetuned", "baseline"))
    assert parent.data.metrics["finetuned_eight_class_accuracy"] == finetuned["eight_class"]["accuracy"]
    assert parent.data.metrics["baseline_binary_accuracy_ci95_low"] == baseline["binary"]["accuracy_ci95_low"]
    assert parent.data.metrics["train_loss_last"] == read_json(repo / "metrics" / "train.json")["train_loss_last"]
    assert parent.data.params["lora.r"] == "8"
    assert parent.data.tags["mlflow.note.content"].endswith("; changed params: none")


def test_stage_runs_carry_params_metrics_artifacts_and_origin(repo: Path) -> None:
    _, children = pipeline_group(repo, "workspace")
    expected_params = {key: str(value) for key, value in load_params(repo / "params.yaml").flat().items()}
    split = {
        "train": repo / "data" / "split" / "train.csv",
        "baseline": repo / "data" / "split" / "test.csv",
        "probe": repo / "data" / "split" / "test.csv",  # fitted on train.csv, scored on this
        "evaluate": repo / "data" / "split" / "test.csv",
    }
    client = mlflow_client(repo)
    reproduced_commit = run(repo, "git", "rev-parse", "HEAD~1").strip()  # the fixture committed the results after
    for stage, run_ in children.items():
        tags = run_.data.tags
        assert expected_params.items() <= run_.data.params.items(), stage
        assert tags["git_commit"] == reproduced_commit
        assert tags["git_dirty"] == "false"
        assert tags["dvc_exp_name"] == "workspace"
        assert tags["data_split_sha256"] == sha256(split[stage])
        assert (tags["model_id"], tags["model_revision"]) == ("tiny-gemma3", "main")
        assert tags["model_resolved_revision"].startswith("sha256:")
        assert tags["device"] == "cpu"
        assert tags["version.torch"] == torch.__version__
        assert {"version.transformers", "version.peft", "version.trl", "version.dvc", "version.python"} <= set(tags)
        assert run_.data.metrics["peak_process_rss_gib"] > 0
    adapter_md5 = locked_md5(repo, "train", "models/adapter")

    train = children["train"]
    assert train.data.tags["precision_ran"] == "bfloat16 base weights + bf16 autocast"
    assert train.data.tags["adapter_dvc_md5"] == adapter_md5
    steps = json.loads((repo / "metrics" / "train.json").read_text())["global_steps"]
    for key in ("loss", "learning_rate", "grad_norm"):
        assert [m.step for m in client.get_metric_history(train.info.run_id, key)] == list(range(1, steps + 1)), key
    assert {a.path for a in client.list_artifacts(train.info.run_id)} == {
        "metrics",
        "plots",
        "adapter",
        "loss_curve.png",
    }
    assert [a.path for a in client.list_artifacts(train.info.run_id, "adapter")] == ["adapter/adapter_config.json"]

    for stage, metrics_file in (("baseline", "baseline.json"), ("evaluate", "finetuned.json")):
        run_ = children[stage]
        metrics = json.loads((repo / "metrics" / metrics_file).read_text())
        assert run_.data.metrics["eight_class_accuracy"] == metrics["eight_class"]["accuracy"]
        assert run_.data.metrics["binary_f1_malignant"] == metrics["binary"]["f1_malignant"]
        assert run_.data.tags["precision_ran"] == "bfloat16 weights, inference without autocast"
        assert {a.path for a in client.list_artifacts(run_.info.run_id)} == {
            "metrics",
            "predictions",
            "plots",
            "confusion_matrix_eight_class.png",
            "confusion_matrix_binary.png",
            "roc_curve.png",
        }
        assert [a.path for a in client.list_artifacts(run_.info.run_id, "metrics")] == [f"metrics/{metrics_file}"]
        assert run_.data.metrics["eight_class_accuracy_ci95_low"] == metrics["eight_class"]["accuracy_ci95_low"]
    assert children["evaluate"].data.tags["adapter_dvc_md5"] == adapter_md5
    assert (repo / "mlartifacts").is_dir()
    # the adapter as a version of the registered model, traced to the DVC hash and commit it came from
    (version,) = client.search_model_versions("name = 'medgemma-breakhis'")
    assert version.run_id == children["evaluate"].info.run_id
    assert {"adapter_dvc_md5": adapter_md5, "git_commit": reproduced_commit, "dvc_exp_name": "workspace"}.items() <= (
        version.tags.items()
    )


def test_second_repro_runs_nothing(workspace: Path) -> None:
    output = run(workspace, "dvc", "repro")
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output


def test_a_prompt_edit_reruns_the_model_stages_and_not_the_data_stages(workspace: Path) -> None:
    """The prompt lives beside the conversation it goes into (model/prompt.py), which only the model stages import."""
    prompt = workspace / "medgemma_breakhis" / "model" / "prompt.py"
    prompt.write_text(prompt.read_text().replace("Analyze this breast tissue", "Analyse this breast tissue", 1))
    changed = run_json(workspace, "dvc", "status", "--json")
    assert sorted(changed) == ["baseline", "evaluate", "train"]
    assert all({"changed deps": {"medgemma_breakhis/model": "modified"}} in changed[name] for name in changed)


def test_an_edit_to_download_code_reruns_download_alone_and_one_to_registration_evaluate_alone(
    workspace: Path,
) -> None:
    """The stages depend on the sub-packages they import, a folder where they import all of it."""
    sources = workspace / "medgemma_breakhis" / "download" / "sources.py"
    sources.write_text(sources.read_text() + "\n# an edit\n")
    assert sorted(run_json(workspace, "dvc", "status", "--json")) == ["download"]
    sources.write_text(sources.read_text().removesuffix("\n# an edit\n"))
    registration = workspace / "medgemma_breakhis" / "registry" / "model.py"
    registration.write_text(registration.read_text() + "\n# an edit\n")
    assert sorted(run_json(workspace, "dvc", "status", "--json")) == ["evaluate"]
    registration.write_text(registration.read_text().removesuffix("\n# an edit\n"))


def test_store_failing_right_after_training_fails_neither_the_stage_nor_the_next_repro(
    workspace: Path, lock_store
) -> None:
    repo = workspace
    metrics, record = repo / "metrics" / "train.json", repo / "metrics" / "train.untracked.json"
    before = metrics.stat().st_mtime_ns

    def trained() -> bool:  # DVC deletes the outputs first; the stage writes train.json once training is over
        return metrics.exists() and metrics.stat().st_mtime_ns != before

    with lock_store(repo / "mlflow.db", when=trained) as taken:  # from the end of training until dvc is done
        output = run(repo, "dvc", "repro", "--force", "--single-item", "train")
    assert taken.is_set()
    assert stages_run(output) == ["train"]
    # (MLflow's own logger also prints the SQLAlchemy traceback of each refused query: its log, left as it is)
    assert "could not track" in output and "database is locked" in output
    assert (repo / "models" / "adapter" / "adapter_config.json").is_file()
    assert (
        len(list((repo / "checkpoints").glob("*/checkpoint-*"))) == 1
    )  # the last, until the DVC cache has the adapter
    not_tracked = read_json(record)
    *_, parent = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    (train,) = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert train.info.run_id == not_tracked["run_id"]
    assert train.info.status == "RUNNING" and "tracking_incomplete" not in train.data.tags  # not complete-looking

    output = run(repo, "dvc", "repro")  # DVC recorded the adapter: nothing to train again
    assert stages_run(output) == []
    # read; the record and its hash in dvc.lock back to the fixture's
    run(repo, "git", "checkout", "HEAD", "--", "metrics/train.untracked.json", "dvc.lock")
    assert run(repo, "git", "status", "--porcelain").strip() == ""


def test_what_a_temp_experiment_could_not_track_is_kept_in_its_commit(workspace: Path, lock_store) -> None:
    """852abeb: DVC warned that metrics/finetuned.untracked.json "will not be included in experiment commits", and
    a `--temp` (or queued, or cloud) experiment lost it with its copy of the workspace."""
    repo = workspace
    assert read_json(repo / "metrics" / "finetuned.untracked.json") == {"not_tracked": []}  # the committed run's

    def evaluated() -> bool:  # the experiment's evaluate has written its metrics, in DVC's temporary copy
        for path in repo.glob(".dvc/tmp/exps/standalone/*/metrics/finetuned.json"):
            try:  # generate's metrics have no calibration: not the committed file, nor one half-written
                if "expected_calibration_error" not in json.loads(path.read_text())["eight_class"]:
                    return True
            except (OSError, ValueError, KeyError):
                continue
        return False

    log = repo.parent / "locked-store.log"
    command = ["dvc", "exp", "run", "--temp", "--name", "locked-store", "-S", "eval.method=generate", "evaluate"]
    # from the end of evaluate until its first write has failed (each locked write waits out sqlite's 20 s)
    with lock_store(repo / "mlflow.db", when=evaluated) as taken, log.open("w") as stream:
        experiment = subprocess.Popen(command, cwd=repo, env=command_env(), stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while "could not track" not in log.read_text() and experiment.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    assert experiment.wait(timeout=900) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert not any(secret in output.encode() for secret in SECRET_VALUES)
    assert taken.is_set() and stages_run(output) == ["evaluate"]
    assert "will not be included in experiment commits" not in output
    refs = run(repo, "git", "for-each-ref", "refs/exps", "--format=%(refname)", stdout_only=True).split()
    (ref,) = [name for name in refs if name.endswith("/locked-store")]
    record = json.loads(run(repo, "git", "show", f"{ref}:metrics/finetuned.untracked.json", stdout_only=True))
    assert record["not_tracked"] and any("database is locked" in item for item in record["not_tracked"])
    assert read_json(repo / "metrics" / "finetuned.untracked.json") == {"not_tracked": []}  # the workspace's own


@pytest.mark.xdist_group("generate_experiment")  # its module-scoped fixture, built once
def test_generate_mode_rescores_without_retraining_and_temp_run_leaves_workspace(
    generate_experiment: tuple[Path, str],
) -> None:
    repo, output = generate_experiment
    assert stages_run(output) == ["baseline", "evaluate"]
    assert run(repo, "git", "status", "--porcelain").strip() == ""
    assert "eval-generate" in run(repo, "dvc", "exp", "show", "--no-pager", "--md")
    # one version (the copy's store starts empty), the evaluation's metrics linked to it
    (version,) = mlflow_client(repo).search_model_versions("name = 'medgemma-breakhis'")
    _, children = pipeline_group(repo, "eval-generate")
    linked = mlflow_client(repo).get_logged_model(version.source.removeprefix("models:/")).metrics
    assert children["evaluate"].info.run_id in {metric.run_id for metric in linked}


@pytest.mark.xdist_group("generate_experiment")  # its module-scoped fixture, built once
def test_temp_experiment_runs_land_in_the_main_store_with_their_artifacts(
    generate_experiment: tuple[Path, str],
) -> None:
    repo, _ = generate_experiment
    assert_no_secret_kept(repo)
    parent, children = pipeline_group(repo, "eval-generate")
    assert set(children) == {"baseline", "probe", "evaluate"}
    assert parent.data.params["eval.method"] == "generate"
    n_images = read_json(repo / "metrics" / "baseline.json")["n_images"]
    for child in children.values():
        # a random tiny model seldom answers with a class number: counted, and never turned into a class
        unparseable = child.data.metrics["n_unparseable"]
        assert child.data.metrics["eight_class_accuracy"] <= 1 - unparseable / n_images
    for child in children.values():
        artifacts = Path(child.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(repo / "mlartifacts")
        assert len(list((artifacts / "predictions").glob("*.csv"))) == 1
    assert list((repo / ".dvc").rglob("mlflow.db")) == []
    assert list((repo / ".dvc").rglob("mlruns")) == []


def test_lora_rank_experiment_retrains_and_metrics_diff_and_exp_show_show_it_on_one_screen(workspace: Path) -> None:
    repo = workspace
    output = run(repo, "dvc", "exp", "run", "-S", "lora.r=16", "-S", "train.epochs=1")
    assert stages_run(output) == ["train", "evaluate"]
    diff = run_json(repo, "dvc", "metrics", "diff", "--json")
    assert set(diff) == {"metrics/headline/finetuned.json"}  # the baseline did not change
    assert any(change["diff"] != 0 for change in diff["metrics/headline/finetuned.json"].values())
    params_diff = run_json(repo, "dvc", "params", "diff", "--json")
    assert (params_diff["params.yaml"]["lora.r"]["old"], params_diff["params.yaml"]["lora.r"]["new"]) == (8, 16)
    experiment_name = next(line.split()[-1] for line in output.splitlines() if line.startswith("Ran experiment(s):"))
    parent, children = pipeline_group(repo, experiment_name)
    assert set(children) == {"train", "evaluate"}
    assert children["train"].data.params["lora.r"] == "16"
    assert parent.data.tags["mlflow.note.content"].endswith("; changed params: lora.r=16, train.epochs=1")
    assert "finetuned_binary_accuracy" in parent.data.metrics and "train_loss_last" in parent.data.metrics
    # (make compare on two experiment names: the queued sweep's test)
    compared = run(repo, "python", "-m", "tools.compare", "HEAD", experiment_name, stdout_only=True)
    assert "| patient-level accuracy |" in compared and "verdict" in compared, compared
    report = run(repo, "python", "-m", "tools.pr_report", experiment_name, stdout_only=True)
    assert "paired over the same test patients" in report and report.count("B - A [95% interval]") == 2, report
    header = run(repo, "dvc", "exp", "show", "--csv", stdout_only=True).splitlines()[0].split(",")
    assert len(header) - len({"rev", "typ", "parent"}) <= 70  # csv's own columns; 214 at feb5c85
    table = run(repo, "dvc", "exp", "show", "--only-changed", "--no-pager", stdout_only=True, env={"COLUMNS": "1000"})
    assert max(map(len, table.splitlines())) <= 200, table  # 4,000 or so at feb5c85
    assert "lora.r" in table.split() and any(word.startswith("finetuned.") for word in table.split()), table


def test_an_experiment_whose_model_cannot_be_had_fails_in_seconds_naming_the_offline_profile(workspace: Path) -> None:
    """No network to the hub: refused at the first stage it runs, before any data or model, and params.yaml is left as
    it was (a workspace `dvc exp run` writes its -S values there first)."""
    params = (workspace / "params.yaml").read_text()
    started = time.monotonic()
    output = run(
        workspace,
        *("dvc", "exp", "run", "-S", "model.id=google/medgemma-4b-it", "-S", "lora.r=16"),
        check=False,
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on port 9
    )
    assert time.monotonic() - started <= 60, output  # dvc and the imports take most of it; the retries took 180 s
    (refusal,) = [line for line in output.splitlines() if "cannot reach model 'google/medgemma-4b-it'" in line]
    assert refusal.endswith("or run offline: -S data.source=synthetic -S model.id=tiny-gemma3"), refusal
    assert "Running stage 'baseline'" in output and "Retrying" not in output
    assert (workspace / "params.yaml").read_text() == params


def test_push_and_pull_round_trip_through_a_remote_without_checkpoints(workspace: Path, tmp_path: Path) -> None:
    """A local folder stands in for the gs:// bucket: the same `dvc push`/`dvc pull`, another storage backend."""
    repo = workspace
    assert "gs (gcsfs" in run(repo, "dvc", "version")  # dvc-gs is installed for the GCS remote of docs/scaling.md
    remote = tmp_path / "remote"
    run(repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))  # --local: .dvc/config.local, not git
    checkpoint = repo / "checkpoints" / "train-0123456789abcdef" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    marker = f"checkpoint {uuid.uuid4()}".encode()
    (checkpoint / "adapter_model.safetensors").write_bytes(marker)
    run(repo, "dvc", "push")
    assert all(marker not in path.read_bytes() for path in remote.rglob("*") if path.is_file())

    # the cross-validation has never run in this history (the commit above was reset away): it is not in the way
    clone = clean_in_a_fresh_clone(repo, tmp_path)
    for out in ("data/raw", "data/split", "models/adapter"):
        files = sorted(p.relative_to(repo) for p in (repo / out).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(clone) for p in (clone / out).rglob("*") if p.is_file()), out
        assert all((repo / f).read_bytes() == (clone / f).read_bytes() for f in files), out
    for metrics in ("metrics/finetuned.json", "metrics/data.json", "predictions/finetuned.csv"):  # git carries these
        assert (clone / metrics).read_bytes() == (repo / metrics).read_bytes()
    assert "Data and pipelines are up to date" in run(clone, "dvc", "repro")
    assert not (clone / "checkpoints").exists()
    assert_no_secret_kept(clone)


def test_no_secret_reaches_mlflow_logs_or_dvc_files(repo: Path) -> None:
    """The reproduction ran with fake HF/Kaggle credentials in its environment; every other test's copy is checked
    the same way when it ends, and every command's output as it runs."""
    assert_no_secret_kept(repo)
    assert (repo / "mlflow.db").is_file() and any((repo / "mlartifacts").rglob("*.csv"))
    for run_ in search(repo, ""):
        # so the file scan covered its artifacts
        assert Path(run_.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlartifacts")
