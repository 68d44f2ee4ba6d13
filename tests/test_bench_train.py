"""`make bench-train OFFLINE=1`: the real train set-up timed on the CPU, every figure printed."""

from __future__ import annotations

import pytest

from tools import bench_train

FIELDS = (
    "model",
    "execution",
    "decoder tokens per example",
    "warm-up steps (first calls, compilation)",
    "seconds per optimizer step",
    "examples/s",
    "data pipeline alone, examples/s",
    "peak memory (GiB)",
    "launches per example",
    "FLOPs per example",
    "MFU",
    "optimizer steps skipped (fp16 loss scaler)",
    "reference run (766 images x 5 epochs = 480 steps)",
)


@pytest.mark.slow
def test_bench_train_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    bench_train.main(
        [
            "--synthetic",
            "--warmup",
            "1",
            "--steps",
            "2",
            "-S",
            "data.source=synthetic",
            "-S",
            "model.id=tiny-gemma3",
            "-S",
            "data.synthetic.images_per_patient=1",
        ]
    )
    report = capsys.readouterr().out.splitlines()[-len(FIELDS) :]  # after the trainer's own log lines
    rows = {name.strip(): value.strip() for name, value in (line.split("  ", 1) for line in report)}
    assert tuple(rows) == FIELDS
    assert rows["model"] == "tiny-gemma3 on cpu, train.precision=bf16"
    assert rows["execution"].startswith(
        "micro-batch 8 x 1 accumulation steps, gradient checkpointing off, 0 dataloader workers, torch.compile off"
    )
    assert float(rows["seconds per optimizer step"]) > 0
    assert float(rows["examples/s"]) == pytest.approx(8 / float(rows["seconds per optimizer step"]), rel=0.01)
    assert float(rows["data pipeline alone, examples/s"]) > 0
    assert rows["peak memory (GiB)"].startswith("process RSS ")
    operators = float(rows["launches per example"].split()[0].replace(",", ""))
    assert 100 < operators < 5000  # per example; a MedGemma step at micro-batch 1 makes some 100,000
    assert float(rows["FLOPs per example"].split()[0]) > 0
    assert rows["MFU"].startswith("n/a")
    assert rows["optimizer steps skipped (fp16 loss scaler)"] == "none"
    assert rows["reference run (766 images x 5 epochs = 480 steps)"].endswith(" min projected")


def test_peak_flops_prefers_the_most_specific_gpu_name() -> None:
    assert bench_train.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_train.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_train.peak_flops("cpu") is None
