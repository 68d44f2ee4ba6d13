"""One optimizer step of `train` with its real set-up, timed after a warm-up, and the reference run's training projected
from it (docs/gpu.md#time-make-bench-train). Without the gated weights: --synthetic -S model.id=medgemma-4b-random.
Run: make bench-train [OFFLINE=1]   (or: python -m tools.bench_train [--synthetic] [-S key=value ...] [--steps N])"""

import argparse
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import Params, add_override_argument, load_params
from medgemma_breakhis.model.load import device, load_base_model
from medgemma_breakhis.track.runs import peak_memory_gib
from medgemma_breakhis.train.callbacks import GuardedSFTTrainer, SkippedStepCounter, StepTimes
from medgemma_breakhis.train.trainer import build_trainer
from tools.bench import split_rows
from tools.gpu_memory import decoder_tokens_per_example

# Images in the reference run's training and test splits (fold 1, 100x, benign/malignant balanced, the Kaggle data).
REFERENCE_TRAIN_IMAGES = 766
REFERENCE_TEST_IMAGES = 522
# Dense 16-bit peak FLOP/s by a pattern over torch's device name, most specific first ("NVIDIA H100 80GB HBM3": SXM).
PEAK_FLOPS = (
    (r"H100 NVL", "H100 NVL", 835.5e12),
    (r"H100 PCIe", "H100 PCIe", 756.5e12),
    (r"H100", "H100 SXM", 989.5e12),
    (r"H200 NVL", "H200 NVL", 835.5e12),
    (r"H200", "H200 SXM", 989.5e12),
    (r"A100", "A100", 312e12),
    (r"\bL4\b", "L4", 121e12),  # not the L40 or L40S
)


def peak_flops(device_name: str) -> tuple[str, float] | None:
    """The GPU's name and dense 16-bit peak FLOP/s; None for a CPU or a GPU not listed."""
    return next(((name, flops) for pattern, name, flops in PEAK_FLOPS if re.search(pattern, device_name)), None)


def _addmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # trl's chunked LM head passes addmm an extra positional argument that breaks the counter's own formula.
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


class ProfileStep(TrainerCallback):
    """torch.profiler over one optimizer step: operator calls, and on a GPU the kernels it launched."""

    def __init__(self, step: int) -> None:
        self.step, self.profiler = step, None

    def on_step_begin(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
        if self.profiler is not None and state.global_step == self.step:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)

    def counts(self) -> dict[str, int]:
        # the raw events: building the event tree takes minutes for a MedGemma step's 100,000 operators
        events = self.profiler.profiler.kineto_results.events()
        counts = {"operators": sum(1 for e in events if e.name().startswith("aten::"))}
        if torch.cuda.is_available():
            counts["kernels"] = sum(1 for e in events if e.device_type() == torch.autograd.DeviceType.CUDA)
        return counts


@dataclass(frozen=True)
class Measurement:
    step_seconds: list[float]  # of each timed step
    warmup_steps: int
    measured_seconds: float  # from the start of training to the end of the last timed step, warm-up included
    examples_per_step: int
    data_examples_per_second: float
    flops_per_example: float
    flops_micro_batch: int
    flops_recomputation: bool
    launches_per_example: dict[str, float]
    peak_memory_gib: dict[str, float]
    skipped_steps: list[int]

    @property
    def median_seconds(self) -> float:
        return float(np.median(self.step_seconds))


def flops_per_example(trainer: GuardedSFTTrainer) -> float:
    """FLOPs per example of one micro-batch's forward and backward pass as the trainer runs it (docs/gpu.md)."""
    micro_batch = trainer.args.per_device_train_batch_size
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(micro_batch)])
    trainer.model.train()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm: _addmm_flop})
    with counter, trainer.autocast_smart_context_manager():
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / micro_batch


def data_examples_per_second(trainer: GuardedSFTTrainer) -> float:
    """Examples/s of the data pipeline alone over one epoch, its first batch (workers starting) not timed."""
    loader = iter(trainer.get_train_dataloader())
    next(loader)
    start = time.perf_counter()
    examples = sum(len(batch["input_ids"]) for batch in loader)  # to the end: the workers then stop by themselves
    return examples / (time.perf_counter() - start)


def measure(trainer: GuardedSFTTrainer, warmup: int, steps: int, batch_size: int) -> Measurement:
    """`warmup` untimed steps, `steps` timed ones, one profiled; then the FLOPs and the data pipeline alone."""
    clock, profiled, skipped = StepTimes(), ProfileStep(warmup + steps + 1), SkippedStepCounter(trainer)
    for callback in (clock, profiled, skipped):
        trainer.add_callback(callback)
    trainer.train()
    marks = [clock.started, *clock.ends]  # marks[k]: the end of optimizer step k
    memory = peak_memory_gib()  # before the FLOP count
    return Measurement(
        step_seconds=np.diff(marks[warmup : warmup + steps + 1]).tolist(),
        warmup_steps=warmup,
        measured_seconds=marks[warmup + steps] - marks[0],
        examples_per_step=batch_size,
        data_examples_per_second=data_examples_per_second(trainer),
        flops_per_example=flops_per_example(trainer),
        flops_micro_batch=trainer.args.per_device_train_batch_size,
        flops_recomputation=trainer.model.is_gradient_checkpointing,
        launches_per_example={name: count / batch_size for name, count in profiled.counts().items()},
        peak_memory_gib=memory,
        skipped_steps=skipped.steps,
    )


def reference_steps(params: Params) -> int:
    """Optimizer steps of the reference run at these params, counted as the trainer counts them."""
    return params.train.epochs * math.ceil(REFERENCE_TRAIN_IMAGES / params.train.batch_size)


def projected_seconds(m: Measurement, steps: int) -> float:
    """Seconds of `steps` optimizer steps: the measured ones as they ran, the rest at the median."""
    return m.measured_seconds + (steps - m.warmup_steps - len(m.step_seconds)) * m.median_seconds


def report(m: Measurement, params: Params, plan: str, device_name: str, decoder_tokens: int) -> str:
    examples_per_second = m.examples_per_step / m.median_seconds
    q1, q3 = np.percentile(m.step_seconds, [25, 75])
    spread = f"interquartile {q1:.3f}-{q3:.3f}, min {min(m.step_seconds):.3f}, max {max(m.step_seconds):.3f}"
    counted = (
        f"a micro-batch of {m.flops_micro_batch}: forward + activation gradients, weight gradients for LoRA only"
        + (", + the forward recomputed by gradient checkpointing" if m.flops_recomputation else "")
    )
    mfu = "n/a (peak FLOP/s not known here)"
    if peak := peak_flops(device_name):
        utilization = m.flops_per_example * examples_per_second / peak[1]
        mfu = f"{utilization:.1%} of {peak[1] / 1e12:.1f} TFLOP/s ({peak[0]}, dense 16-bit)"
    steps = reference_steps(params)
    launches = ", ".join(f"{count:,.0f} {name}" for name, count in m.launches_per_example.items())
    memory = ", ".join(
        f"{name.removeprefix('peak_').removesuffix('_gib').replace('_', ' ')} {gib:.2f}"
        for name, gib in m.peak_memory_gib.items()
    )
    rows = [
        ("model", f"{params.model.id} on {device_name}, train.precision={params.train.precision}"),
        ("execution", plan),
        ("decoder tokens per example", f"{decoder_tokens}"),
        ("warm-up (first calls, compilation)", f"{m.warmup_steps} steps"),
        ("seconds per optimizer step", f"median {m.median_seconds:.3f} ({spread}, {len(m.step_seconds)} steps)"),
        ("examples/s", f"{examples_per_second:.2f}"),
        ("data pipeline alone, examples/s", f"{m.data_examples_per_second:.1f}"),
        ("peak memory (GiB)", memory),
        ("launches per example", launches),
        ("FLOPs per example", f"{m.flops_per_example / 1e12:.4g} TFLOP (over {counted})"),
        ("HFU (recomputation counted)" if m.flops_recomputation else "MFU", mfu),
        ("optimizer steps skipped (fp16 loss scaler)", ", ".join(map(str, m.skipped_steps)) or "none"),
        (
            f"reference run ({REFERENCE_TRAIN_IMAGES} images x {params.train.epochs} epochs = {steps} steps)",
            f"{projected_seconds(m, steps) / 60:.1f} min projected (training steps only)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)
    parser.add_argument("--synthetic", action="store_true", help="synthetic images instead of data/ (offline)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be 0 or more and --steps 1 or more")
    configure_logging()
    params = load_params(overrides=args.overrides)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        rows, image_root = split_rows(params, "train", args.synthetic, Path(scratch) / "data")
        model, processor, info = load_base_model(params.model, params.train.precision)
        # the steps measured, one more profiled; nothing saved or tracked
        overrides = {"max_steps": args.warmup + args.steps + 1, "save_strategy": "no", "report_to": []}
        trainer = build_trainer(
            model, processor, info, params, rows, image_root, Path(scratch) / "out", config_overrides=overrides
        )
        measurement = measure(trainer, args.warmup, args.steps, params.train.batch_size)
    device_name = torch.cuda.get_device_name() if device().type == "cuda" else "cpu"
    print(report(measurement, params, trainer.plan.describe(), device_name, decoder_tokens_per_example(processor)))


if __name__ == "__main__":
    main()
