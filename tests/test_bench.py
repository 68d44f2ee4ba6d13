"""`make bench`'s script on the offline profile: both methods timed on the same images, their ratio printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # loads, warms up and times both methods on the tiny model
def test_bench_prints_images_per_second_of_both_methods_and_their_ratio() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.bench",
            "--synthetic",
            "--images",
            "8",
            "-S",
            "model.id=tiny-gemma3",
            "-S",
            "data.synthetic.images_per_patient=1",
            "-S",
            "eval.batch_size=4",
            "-S",
            "eval.max_new_tokens=6",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "tiny-gemma3 on cpu, 8 images, batch size 4, generate max_new_tokens 6"
    rates = {}
    for line in lines[2:4]:
        method, seconds, per_second = line.split()
        assert float(seconds) > 0 and float(per_second) > 0
        rates[method] = float(per_second)
    assert set(rates) == {"score", "generate"}
    ratio = re.search(r"score is ([\d.]+)x the images/s of generate; the two agree on \d+% of images", lines[4])
    assert ratio, lines[4]
    assert float(ratio.group(1)) == pytest.approx(rates["score"] / rates["generate"], rel=0.1)
