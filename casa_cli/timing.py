"""Clocks for every timing casa reports (decoding's own timings, `casa profile`, the
benchmarks): wall time after the device's queued work, medians with their range, and the
name of the device a result row is labelled with."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field

import torch


def sync_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work, so GPU timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Timer:
    """Wall time of a block, after the device's queued work (`sync_clock`)."""
    device: torch.device
    started: float = field(default=0.0, init=False)
    ms: float = field(default=0.0, init=False)

    def __enter__(self):
        self.started = sync_clock(self.device)
        return self

    def __exit__(self, *exc):
        self.ms = (sync_clock(self.device) - self.started) * 1000


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name: what a result row is labelled with."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
