"""Memory in GiB, and the peak this process reached: what every stage logs and `make bench-train` prints."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def peak_memory_gib() -> dict[str, float]:
    """This process's peak resident set size and, on GPUs, the peak CUDA memory torch allocated and reserved (summed
    over the devices), by the names they are logged under in MLflow."""
    # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peaks = {"peak_process_rss_gib": rss / GIB}
    if torch.cuda.is_available():
        devices = range(torch.cuda.device_count())
        peaks["peak_cuda_memory_allocated_gib"] = sum(map(torch.cuda.max_memory_allocated, devices)) / GIB
        peaks["peak_cuda_memory_reserved_gib"] = sum(map(torch.cuda.max_memory_reserved, devices)) / GIB
    return peaks
