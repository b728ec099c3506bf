"""score's CPU policy: how many decoding workers, torch's threads beside them."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what Slurm or taskset gave us, not the whole host
    except AttributeError:
        return os.cpu_count() or 2


# Samples per forward pass. On a CPU, shorter passes leave the niced decoding workers more gaps
# to run in: jc-tiny on 2 cores scored 1,069 samples/s at 64 against 747 at 256
# (docs/benchmarks.md); the embeddings do not depend on it.
DEFAULT_BATCH = {"cuda": 256, "cpu": 64}


def default_workers(device_type: str = "cpu") -> int:
    """Decoding processes. With a GPU the CPU only decodes, so use all cores but one; on a CPU
    the model needs cores too, so decoding gets half."""
    cores = _cores()
    if device_type == "cuda":
        return max(1, min(32, cores - 1))
    return max(1, cores // 2)


def openmp_sleeps() -> bool:
    """Whether torch's OpenMP threads sleep when idle instead of spinning: the CLI sets
    OMP_WAIT_POLICY=PASSIVE before torch loads (jestcurate.cli.sleeping_openmp), unless the
    user chose otherwise."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


class _CpuThreads:
    """On a CPU the model and the decoding workers share the cores. With OpenMP threads that
    sleep when idle (openmp_sleeps) the model keeps all of torch's threads and the workers run
    niced, so the model has the cores whenever it has data and the workers fill every gap:
    jc-tiny then scores faster than with any fixed split, and a ViT-B/32 at its two-thread
    speed (docs/benchmarks.md). With spinning threads (OMP_WAIT_POLICY=ACTIVE, or `run` called
    from a Python process that loaded torch first) a worker sharing a core with a spinning
    thread starves, and which split is best depends on the model: a ViT-B/32 on 2 cores scores
    10 samples/s with 2 torch threads and 5.7 with 1, the tiny model 405 with 2 and 600 with 1.
    So then run a few chunks with all of torch's threads, then with the cores the workers
    leave, and keep the faster."""

    WARMUP, WINDOW = 2, 4  # chunks

    def __init__(self, device_type: str, workers: int) -> None:
        self.before = torch.get_num_threads()
        self.options = [self.before, max(1, _cores() - workers)]
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
            torch.set_num_threads(self.options[len(self.rates)])
            return
        self.deciding = False
        best = self.options[self.rates.index(max(self.rates))]
        log.debug("torch threads: %s samples/s with %s; keeping %d", self.rates, self.options, best)
        torch.set_num_threads(best)

    def restore(self) -> None:
        torch.set_num_threads(self.before)
