"""Progress in a log file: a line per tenth of the work, and no library bar writing a line per update."""

from __future__ import annotations

import os
import re
import warnings

import datasets
import huggingface_hub.utils
import pytest
import transformers

from medgemma_breakhis.core import logs
from medgemma_breakhis.core.logs import configure_logging, progress


def bar_lines(stderr: str) -> list[str]:
    """tqdm's updates, one per carriage return or newline (as CI logs show them)."""
    return [line for line in re.split(r"[\r\n]", stderr) if "%|" in line]


def test_a_bar_in_a_log_file_reports_each_tenth_of_long_work_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in progress(range(800), desc="quick"):
        pass
    assert not bar_lines(capsys.readouterr().err)  # over within LOG_FILE_DELAY_S: nothing to report
    monkeypatch.setattr(logs, "LOG_FILE_DELAY_S", 0.0)  # as if each loop had lasted longer
    for _ in progress(range(800), desc="images"):
        pass
    for _ in progress(range(4), desc="batches"):
        pass
    percents = [int(re.search(r"(\d+)%\|", line)[1]) for line in bar_lines(capsys.readouterr().err)]
    # each tenth once (the last twice: tqdm draws the finished bar again as it closes); a 4-step bar, each step
    assert percents == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 25, 50, 75, 100, 100]


def test_the_libraries_bars_are_off_in_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    ):
        monkeypatch.delenv(name, raising=False)
    try:
        configure_logging()  # under pytest, stderr is captured: not a terminal
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for a process that imports the hub later
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()


def test_the_libraries_deprecation_of_a_name_they_read_is_not_shown() -> None:
    """peft and trl read `is_gradient_checkpointing`, which transformers deprecates: four warnings a pipeline."""
    configure_logging()
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in shown] == ["another deprecation"]
