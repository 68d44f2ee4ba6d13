"""`make bench-train OFFLINE=1`: the real train set-up timed on the CPU, every figure printed."""

from __future__ import annotations

import pytest

from tools import bench_train

FIELDS = (
    "model",
    "execution",
    "decoder tokens per example",
    "warm-up (first calls, compilation)",
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
def test_bench_train_without_warmup_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    bench_train.main(
        [
            *("--synthetic", "--warmup", "0", "--steps", "3"),
            *("-S", "data.source=synthetic", "-S", "model.id=tiny-gemma3"),
            *("-S", "data.synthetic.images_per_patient=1"),
        ]
    )
    report = capsys.readouterr().out.splitlines()[-len(FIELDS) :]  # after the trainer's own log lines
    rows = {name.strip(): value.strip() for name, value in (line.split("  ", 1) for line in report)}
    assert tuple(rows) == FIELDS
    assert rows["model"] == "tiny-gemma3 on cpu, train.precision=bf16"
    assert rows["execution"].startswith(
        "micro-batch 8 x 1 accumulation steps, gradient checkpointing off, 0 dataloader workers, torch.compile off"
    )
    assert rows["warm-up (first calls, compilation)"] == "0 steps"
    median, spread = rows["seconds per optimizer step"].removeprefix("median ").split(" ", 1)
    assert float(median) > 0 and spread.startswith("(interquartile ") and spread.endswith(", 3 steps)")
    assert float(rows["examples/s"]) == pytest.approx(8 / float(median), rel=0.01)
    assert float(rows["data pipeline alone, examples/s"]) > 0
    assert rows["peak memory (GiB)"].startswith("process rss ")
    operators = float(rows["launches per example"].split()[0].replace(",", ""))
    assert 100 < operators < 5000  # per example; a MedGemma step at micro-batch 1 makes some 100,000
    flops, counted = rows["FLOPs per example"].split(" TFLOP ")
    assert float(flops) > 0 and counted.startswith("(over a micro-batch of 8: forward + activation gradients")
    assert rows["MFU"].startswith("n/a")
    assert rows["optimizer steps skipped (fp16 loss scaler)"] == "none"
    assert rows["reference run (766 images x 5 epochs = 480 steps)"].endswith(" min projected (training steps only)")


def test_projection_takes_the_measured_steps_as_they_ran_and_the_rest_at_the_median() -> None:
    measured = bench_train.Measurement(
        step_seconds=[1.0, 3.0, 1.0, 2.0],
        warmup_steps=2,
        measured_seconds=20.0,  # a slow warm-up (compilation) of 13 s, then the four timed steps
        examples_per_step=8,
        data_examples_per_second=1.0,
        flops_per_example=1.0,
        flops_micro_batch=8,
        flops_recomputation=False,
        launches_per_example={},
        peak_memory_gib={},
        skipped_steps=[],
    )
    assert measured.median_seconds == 1.5
    assert bench_train.projected_seconds(measured, 10) == 20.0 + 4 * 1.5


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.5e12)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756.5e12)),
        ("NVIDIA H100 NVL", ("H100 NVL", 835.5e12)),
        ("NVIDIA H200", ("H200 SXM", 989.5e12)),
        ("NVIDIA H200 NVL", ("H200 NVL", 835.5e12)),
        ("NVIDIA A100-SXM4-80GB", ("A100", 312e12)),
        ("NVIDIA L4", ("L4", 121e12)),
        ("NVIDIA L40S", None),
        ("cpu", None),
    ],
)
def test_peak_flops_tells_the_gpus_apart(device_name: str, expected) -> None:
    assert bench_train.peak_flops(device_name) == expected
