"""score's CPU policy: how many decoding workers, how many torch threads beside them, whether
OpenMP's threads sleep when idle and whether the workers run niced.

On a CPU the model and the decoding workers share the cores. With OpenMP threads that sleep
when idle the model keeps all of torch's threads and the workers run niced, so the model has the
cores whenever it has data and the workers fill every gap. With spinning threads
(OMP_WAIT_POLICY=ACTIVE, or `run` called from a Python process that loaded torch first) a worker
sharing a core with a spinning thread starves, and which split is best depends on the model, so
CpuThreads tries both. The measurements behind these choices: docs/benchmarks.md, "Score
throughput vs the model-only ceiling".

Importable without torch: the CLI calls sleeping_openmp before torch loads.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Samples per forward pass. On a CPU, shorter passes leave the niced decoding workers more gaps
# to run in (docs/benchmarks.md); the embeddings do not depend on it.
DEFAULT_BATCH = {"cuda": 256, "cpu": 64}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what Slurm or taskset gave us, not the whole host
    except AttributeError:
        return os.cpu_count() or 2


def default_workers(device_type: str = "cpu") -> int:
    """Decoding processes. With a GPU the CPU only decodes, so use all cores but one; on a CPU
    the model needs cores too, so decoding gets half."""
    n = cores()
    if device_type == "cuda":
        return max(1, min(32, n - 1))
    return max(1, n // 2)


def sleeping_openmp(device: str = "cpu", workers: int | None = None) -> None:
    """Make torch's OpenMP threads sleep when idle rather than spin, where decoding workers share
    the CPUs with the model (not on CUDA, not with --workers 0): the workers then get every
    moment the model's threads are not computing. Read once, when torch loads, so call this
    before; a user's own OMP_WAIT_POLICY stands."""
    if device != "cuda" and workers != 0 and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def openmp_sleeps() -> bool:
    """Whether torch's OpenMP threads sleep when idle instead of spinning (sleeping_openmp, unless
    the user chose otherwise)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def nice_workers(device_type: str) -> bool:
    """Whether the decoding workers yield the cores to the model: on a CPU whose OpenMP threads
    sleep (with spinning threads CpuThreads splits the cores instead)."""
    return device_type == "cpu" and openmp_sleeps()


def lower_priority() -> None:
    """In a decoding worker (nice_workers): run only when the model leaves a core idle."""
    os.nice(19)


def _threads(n: int | None = None) -> int:
    """torch's threads, set to `n` first when given. (torch is imported here, not at the top:
    see the module's docstring.)"""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class CpuThreads:
    """With spinning OpenMP threads on a CPU, run a few chunks with all of torch's threads, then
    with the cores the workers leave, and keep the faster. Otherwise (sleeping threads, a GPU, no
    workers) leave torch's threads alone."""

    WARMUP, WINDOW = 2, 4  # chunks

    def __init__(self, device_type: str, workers: int) -> None:
        self.before = _threads()
        self.options = [self.before, max(1, cores() - workers)]
        self.deciding = (
            device_type == "cpu"
            and workers > 0
            and self.options[1] < self.before
            and not openmp_sleeps()
        )
        self.chunks = 0
        self.rates: list[float] = []
        self.samples = 0
        self.seconds = 0.0

    def record(self, samples: int, seconds: float) -> None:
        if not self.deciding:
            return
        self.chunks += 1
        if self.chunks <= self.WARMUP:  # workers are still starting
            return
        self.samples += samples
        self.seconds += seconds
        if (self.chunks - self.WARMUP) % self.WINDOW:
            return
        self.rates.append(self.samples / max(self.seconds, 1e-9))
        self.samples, self.seconds = 0, 0.0
        if len(self.rates) < len(self.options):
            _threads(self.options[len(self.rates)])
            return
        self.deciding = False
        best = self.options[self.rates.index(max(self.rates))]
        log.debug("torch threads: %s samples/s with %s; keeping %d", self.rates, self.options, best)
        _threads(best)

    def restore(self) -> None:
        _threads(self.before)
