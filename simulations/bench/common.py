"""Helpers shared by the benchmarks: resource figures and packaged scenario configs."""

from __future__ import annotations

import resource
import statistics
import sys
from importlib import resources
from pathlib import Path

from fedface.common.config import TrainConfig


def peak_rss_mb() -> float:
    """Peak resident memory, in MiB, of this process or of any finished child process (the
    larger: a benchmark's worker processes each hold their own copy of the model and data)."""
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def process_peak_mb() -> float:
    """Peak resident memory, in MiB, of this process alone.

    Linux's ``VmHWM`` (high-water mark of this address space) where available: ``ru_maxrss``
    survives ``exec`` and so reports the parent's size in a freshly spawned worker.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def scenario_config(name: str) -> TrainConfig:
    """A config shipped in ``fedface/simulations/scenarios/``."""
    ref = resources.files("fedface.simulations").joinpath("scenarios", name)
    with resources.as_file(ref) as path:
        return TrainConfig.from_toml(Path(path))


def mean(values: list[float]) -> float:
    """Arithmetic mean (NaN-free input)."""
    return float(statistics.fmean(values))


__all__ = ["mean", "peak_rss_mb", "process_peak_mb", "scenario_config"]
