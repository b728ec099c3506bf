"""Which array task a row belongs to: a stable 64-bit hash of the row's identity, modulo the
number of tasks. A hash (not shard ranges) makes every task's partition a uniform sample of the
corpus whatever the shards' order or sizes, and the same row lands in the same task on any
machine, in any run, with any other rows around it.

The identity is the row's uid when it has one, else its part name and key. The hash is a
word-wise splitmix64 over the identity's bytes (little-endian 8-byte words, zero-padded, then the
byte length), vectorised over rows; `PARTITION_HASH` names it in selection summaries so a later
change of function is a visible change of identity, never a silent reshuffle.
"""

from __future__ import annotations

import numpy as np

PARTITION_HASH = "splitmix64-words-v1"
PARTITION_BY = "uid, else part name and key"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_hash(identity: np.ndarray) -> np.ndarray:
    """uint64 hash of each row of a fixed-width bytes array (dtype S). Rows are hashed up to
    their own length, so the result does not depend on the array's width; trailing NUL bytes
    are not part of an identity (numpy's S type drops them anyway)."""
    n = len(identity)
    width = max(8, -(-identity.dtype.itemsize // 8) * 8)
    words = np.ascontiguousarray(identity, dtype=f"S{width}").view("<u8").reshape(n, width // 8)
    lengths = np.char.str_len(identity).astype(np.uint64) if n else np.zeros(0, np.uint64)
    used = -(-lengths.astype(np.int64) // 8)  # words each row really has
    h = np.full(n, _GOLDEN, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = np.where(j < used, _mix(h ^ words[:, j]), h)
        return _mix(h ^ lengths)


def task_of(identity: np.ndarray, num_tasks: int) -> np.ndarray:
    """Each row's task, 0..num_tasks-1."""
    return (row_hash(identity) % np.uint64(num_tasks)).astype(np.int64)


def interleave(steps: list[int]) -> list[tuple[int, int]]:
    """One step order for the tasks' batches: (task, local step) pairs, each task's steps spread
    evenly over the whole run (step s of a task with S steps sits at (s + 1/2) / S), ties by
    task. Training on a prefix of the merged manifest thus sees every partition in proportion."""
    order = [((2 * s + 1) / (2 * count), task, s) for task, count in enumerate(steps)
             for s in range(count)]  # fmt: skip
    order.sort()
    return [(task, s) for _, task, s in order]
