"""The five stages at real size on a CUDA GPU, `medgemma-4b-random` on synthetic images in a scratch folder, timed,
and the reference run projected from them (docs/gpu.md#rehearse-the-run-make-rehearse).
Run: make rehearse   (`make tokenizer` first)   (or: python -m tools.rehearse [--no-bench] [--keep DIR] [-S ...])"""

import argparse
import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import mlflow
import pandas as pd
from ruamel.yaml import YAML

from medgemma_breakhis.core.files import pipeline_paths
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import RANDOM_MEDGEMMA_ID, Params, add_override_argument, load_params
from medgemma_breakhis.core.stage import stage_entry
from medgemma_breakhis.model.builtin import TOKENIZER_FOLDER
from medgemma_breakhis.model.load import check_model
from medgemma_breakhis.track.store import EXPERIMENT_NAME
from tools.bench_train import REFERENCE_TEST_IMAGES, REFERENCE_TRAIN_IMAGES, reference_steps

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "split_balance", "baseline", "train", "evaluate")
SCORING = ("baseline", "evaluate")
# At 2 images per patient and magnification: 40 optimizer steps in 5 epochs, a checkpoint every 10: 4 saves to time.
REHEARSAL = {"data.source": "synthetic", "model.id": RANDOM_MEDGEMMA_ID, "execution.checkpoint_steps": 10}
LOG_TAIL_LINES = 30


class StageFailed(RuntimeError):
    """A stage of the rehearsal exited non-zero; its log's last lines are printed."""


def stage_commands(overrides: list[str]) -> dict[str, list[str]]:
    """Each stage's dvc.yaml command, its `${...}` vars filled in, run by this interpreter with the overrides."""
    paths = pipeline_paths(REPO / "dvc.yaml")
    stages = YAML(typ="safe").load(REPO / "dvc.yaml")["stages"]
    commands = {}
    for name in STAGES:
        words = shlex.split(string.Template(stages[name]["cmd"]).substitute(paths))
        assert words[0] == "python", stages[name]["cmd"]
        commands[name] = [sys.executable, *words[1:], *(arg for override in overrides for arg in ("-S", override))]
    return commands


def run_stages(commands: dict[str, list[str]], scratch: Path) -> dict[str, float]:
    """Run every stage in `scratch`, as DVC would from a repository root; returns each one's wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MEDGEMMA_"))}
    env |= {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    (scratch / "logs").mkdir()
    wall = {}
    for name, command in commands.items():
        log = scratch / "logs" / f"{name}.log"
        print(f"{name}: running (log: {log})", flush=True)
        started = time.perf_counter()
        with log.open("w") as stream:
            result = subprocess.run(command, cwd=scratch, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
        wall[name] = time.perf_counter() - started
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            raise StageFailed(f"{name} exited with status {result.returncode} after {wall[name]:.0f} s:\n{tail}")
        print(f"{name}: {wall[name]:.1f} s", flush=True)
    return wall


@dataclass(frozen=True)
class TrainShape:
    steps: int
    epochs: int
    saves: int

    @classmethod
    def of(cls, steps: int, epochs: int, checkpoint_steps: int) -> Self:
        return cls(steps, epochs, steps // checkpoint_steps + (1 if steps % checkpoint_steps else 0))

    def seconds(self, times: dict[str, float]) -> float:
        """The time of `trainer.train` by the `time_*` figures of a run (`training.StepTimes`)."""
        between = self.steps - self.epochs  # the gaps between steps that are not epoch boundaries
        return (
            times["time_first_step_s"]
            + (self.steps - 1) * times["time_step_median_s"]
            + between * times.get("time_between_steps_median_s", 0.0)
            + (self.epochs - 1) * times.get("time_epoch_boundary_mean_s", 0.0)
            + self.saves * times.get("time_checkpoint_save_mean_s", 0.0)
        )


def projected_train_seconds(wall: float, times: dict[str, float], ran: TrainShape, reference: TrainShape) -> float:
    """The reference run's `train` stage: this one's time outside training as it was, training at the reference's."""
    return wall - ran.seconds(times) + reference.seconds(times)


def _shown(figures: dict[str, float], key: str, spec: str) -> str:
    return format(figures[key], spec) if key in figures else ""


def report(params: Params, scratch: Path, wall: dict[str, float]) -> str:
    client = mlflow.MlflowClient(f"sqlite:///{scratch / 'mlflow.db'}")  # the rehearsal's own store
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = client.search_runs([experiment.experiment_id], "tags.run_kind = 'stage'")
    metrics = {run.data.tags["stage"]: run.data.metrics for run in runs}  # each model stage's
    train_summary = json.loads((scratch / "metrics" / "train.json").read_text())
    test_images = int(json.loads((scratch / "metrics" / "baseline.json").read_text())["n_images"])
    images = pd.read_csv(scratch / "data" / "raw" / "Folds.csv")["filename"].nunique()
    ran = TrainShape.of(train_summary["global_steps"], params.train.epochs, params.execution.checkpoint_steps)
    reference_checkpoints = load_params(REPO / "params.yaml").execution.checkpoint_steps
    reference = TrainShape.of(reference_steps(params), params.train.epochs, reference_checkpoints)
    throughput = {
        "download": f"{images / wall['download']:.1f} images/s",
        "train": f"{ran.steps / metrics['train'].get('train_runtime', float('nan')):.2f} steps/s",
        **{name: f"{metrics[name].get('images_per_second', float('nan')):.1f} images/s" for name in SCORING},
    }
    rows = [
        {
            "stage": name,
            "wall time (s)": f"{wall[name]:.1f}",
            "model load (s)": _shown(metrics.get(name, {}), "time_model_load_s", ".1f"),
            "peak CUDA allocated (GiB)": _shown(metrics.get(name, {}), "peak_cuda_memory_allocated_gib", ".2f"),
            "throughput": throughput.get(name, ""),
        }
        for name in STAGES
    ]
    train = projected_train_seconds(wall["train"], metrics["train"], ran, reference)
    # a scoring stage over the reference test set: the same time outside scoring, the other images at the same rate
    extra = REFERENCE_TEST_IMAGES - test_images
    scoring = {name: wall[name] + extra / metrics[name]["images_per_second"] for name in SCORING}
    times = ", ".join(
        f"{key.removeprefix('time_')} {value:.2f}" for key, value in metrics["train"].items() if key.startswith("time_")
    )
    return (
        f"Rehearsal: {params.model.id}, {images} images ({test_images} test), train: {ran.steps} optimizer steps in "
        f"{ran.epochs} epochs, {ran.saves} checkpoint saves\n"
        f"{pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)}\n"
        f"train, where the time went (s): {times}\n"
        f"Reference run projected ({REFERENCE_TRAIN_IMAGES} training images: {reference.steps} steps, "
        f"{reference.epochs} epochs, {reference.saves} checkpoint saves; {REFERENCE_TEST_IMAGES} test images): "
        f"train stage {train / 60:.1f} min, baseline {scoring['baseline'] / 60:.1f} min, evaluate "
        f"{scoring['evaluate'] / 60:.1f} min; the three {(train + sum(scoring.values())) / 60:.1f} min"
    )


def bench_train(overrides: list[str]) -> str:
    """`make bench-train` on the same model and params: its printout."""
    command = [sys.executable, "-m", "tools.bench_train", "--synthetic"]
    command += [arg for override in overrides for arg in ("-S", override)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StageFailed(f"bench-train exited with status {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)
    parser.add_argument("--images-per-patient", type=int, default=2, help="synthetic images per patient (default 2)")
    parser.add_argument("--no-bench", action="store_true", help="leave out make bench-train's projection")
    parser.add_argument("--keep", type=Path, help="run in this new folder and keep it, logs and MLflow store included")
    args = parser.parse_args(argv)
    configure_logging()
    defaults = {**REHEARSAL, "data.synthetic.images_per_patient": args.images_per_patient}
    overrides = [f"{key}={value}" for key, value in defaults.items()] + args.overrides
    params = load_params(REPO / "params.yaml", overrides)
    check_model(params.model)  # on a CPU, medgemma-4b-random refuses here, in one line
    scratch = Path(args.keep or tempfile.mkdtemp(prefix="rehearsal-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy(REPO / "params.yaml", scratch / "params.yaml")
        (scratch / TOKENIZER_FOLDER).parent.mkdir(parents=True)
        (scratch / TOKENIZER_FOLDER).symlink_to(REPO / TOKENIZER_FOLDER)
        wall = run_stages(stage_commands(overrides), scratch)
        print(report(params, scratch, wall))
        if not args.no_bench:
            print(f"make bench-train, same model and params:\n{bench_train(overrides)}")
    except StageFailed as failed:
        sys.exit(f"rehearsal: {failed}")
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    stage_entry(main)
