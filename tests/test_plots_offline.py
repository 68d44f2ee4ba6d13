"""`dvc plots show/diff` pages that draw without a network (Vega inlined through the repository's html_template),
and PNG images of the plots rendered offline."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tools import plots_offline

REPO = Path(__file__).resolve().parents[1]
# A <script> element that loads its code from somewhere: what a page without network access cannot run.
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)


def test_the_committed_template_is_the_pinned_bundle_and_dvc_uses_it() -> None:
    committed = (REPO / plots_offline.TEMPLATE).read_text(encoding="utf-8")
    assert committed == plots_offline.offline_template(), "run `python -m tools.plots_offline template`"
    assert not REMOTE_SCRIPT.search(committed) and "{plot_divs}" in committed and "{scripts}" not in committed
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")  # DVC takes a relative html_template from .dvc/
    assert (REPO / ".dvc" / config["plots"]["html_template"]).resolve() == REPO / plots_offline.TEMPLATE


def write_plot_data(root: Path, seed: int) -> None:
    """The files dvc.yaml's plots read, as the pipeline writes them (a few rows)."""
    rng = np.random.default_rng(seed)
    (root / "predictions").mkdir(exist_ok=True)
    (root / "plots").mkdir(exist_ok=True)
    for name in ("baseline", "probe", "finetuned"):
        truth, predicted = rng.integers(0, 8, 12), rng.integers(0, 8, 12)
        pd.DataFrame(
            {
                "true_class": truth,
                "predicted_class": predicted,
                "true_binary": np.where(truth > 3, "malignant", "benign"),
                "predicted_binary": np.where(predicted > 3, "malignant", "benign"),
            }
        ).to_csv(root / "predictions" / f"{name}.csv", index=False)
        rates = np.sort(rng.random((2, 6)), axis=1)
        pd.DataFrame({"false_positive_rate": rates[0], "true_positive_rate": rates[1]}).to_csv(
            root / "plots" / f"roc_{name}.csv", index=False
        )
    pd.DataFrame({"step": range(1, 9), "loss": np.linspace(2.0, 0.5, 8)}).to_csv(
        root / "plots" / "train_loss.csv", index=False
    )


@pytest.mark.slow  # the dvc CLI in a repository of its own
def test_plots_diff_draws_offline_and_each_plot_renders_to_png(tmp_path: Path, stage_env: dict[str, str]) -> None:
    env = stage_env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{stage_env['PATH']}"}  # dvc, as under make

    def run(*command: str) -> None:
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)

    for name in ("dvc.yaml", "params.yaml", ".dvc/config", str(plots_offline.TEMPLATE)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    run("git", "init", "-q")
    write_plot_data(tmp_path, seed=0)
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    write_plot_data(tmp_path, seed=1)
    run("dvc", "plots", "diff", "HEAD", "--out", "dvc_plots")  # as make demo and the pull-request workflow run it
    page = (tmp_path / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert not REMOTE_SCRIPT.search(page), "the page loads a script from the network"
    assert page.count("vegaEmbed('#") == 4 and "window.vegaEmbed=" in page
    run("python", "-m", "tools.plots_offline", "png", "HEAD", "--out", "png")
    images = sorted((tmp_path / "png").glob("*.png"))
    assert {path.stem for path in images} == {
        "confusion_eight_class",
        "confusion_binary",
        "roc_malignant",
        "training_loss",
    }
    for path in images:
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200
