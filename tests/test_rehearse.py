"""`make rehearse`: the stages as dvc.yaml runs them, the projection of the reference run, and the refusal on a CPU."""

from __future__ import annotations

import pytest
import torch

from medgemma_breakhis.model.load import ModelLoadError
from tools import rehearse

TIMES = {
    "time_first_step_s": 40.0,
    "time_step_median_s": 1.0,
    "time_between_steps_median_s": 0.1,
    "time_checkpoint_save_mean_s": 2.0,
    "time_epoch_boundary_mean_s": 3.0,
}


def test_each_stage_runs_the_command_dvc_yaml_gives_it() -> None:
    commands = rehearse.stage_commands(["model.id=tiny-gemma3"])
    assert list(commands) == list(rehearse.STAGES)
    train = commands["train"]
    assert train[1:3] == ["-m", "stages.train"] and train[-2:] == ["-S", "model.id=tiny-gemma3"]
    assert "--adapter" in train and train[train.index("--adapter") + 1] == "models/adapter"  # dvc.yaml's var
    assert not any("${" in word for command in commands.values() for word in command)


def test_a_checkpoint_every_n_steps_and_one_at_the_end() -> None:
    assert rehearse.TrainShape.of(480, 5, 25).saves == 20  # 19 on the way, one at the end
    assert rehearse.TrainShape.of(40, 5, 10).saves == 4  # the last step's own


def test_the_reference_run_keeps_what_the_stage_spent_outside_training_and_scales_the_rest() -> None:
    ran, reference = rehearse.TrainShape.of(40, 5, 10), rehearse.TrainShape.of(480, 5, 25)
    training = 40 + 39 * 1.0 + 35 * 0.1 + 4 * 3.0 + 4 * 2.0  # first step, steps, logging, epoch boundaries, saves
    assert ran.seconds(TIMES) == pytest.approx(training)
    outside = 30.0  # process start, model loading, the adapter written, tracking
    projected = rehearse.projected_train_seconds(outside + training, TIMES, ran, reference)
    assert projected == pytest.approx(outside + 40 + 479 * 1.0 + 475 * 0.1 + 4 * 3.0 + 20 * 2.0)


def test_on_a_cpu_the_rehearsal_refuses_in_one_line(gemma3_tokenizer) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the rehearsal would run")
    with pytest.raises(ModelLoadError) as refused:
        rehearse.main([])
    assert "\n" not in str(refused.value) and "no CUDA GPU" in str(refused.value)


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_projects_the_reference_run(capsys: pytest.CaptureFixture[str]) -> None:
    """On a CPU, with the tiny model in place of the 4B one: the machinery, not the figures."""
    rehearse.main(["-S", "model.id=tiny-gemma3", "-S", "train.epochs=1", "--images-per-patient", "1", "--no-bench"])
    out = capsys.readouterr().out
    for stage in rehearse.STAGES:
        assert f"| {stage} " in out
    assert "train, where the time went (s): model_load_s " in out
    assert "Reference run projected (766 training images: 96 steps, 1 epochs" in out
