"""The KV pool: a fixed byte budget for every KV entry the scheduler holds, and the decode batch's buffers.

Choice: **per-row buffers in one slab per layer**, not paged blocks. Layer l of the running batch is
one key and one value buffer (B, H_kv, C_l, D) float32 whose row r holds request r's entries of that
layer (its kept prompt entries, then its generated tokens) in its first ``lengths[r]`` places. This is
the layout ONNX Runtime's fused ``GroupQueryAttention`` reads with a length per row, so a decode step
runs on the buffers as they are (no gather, no copy per step). Paged blocks would need a paged
attention kernel, which ONNX Runtime does not have for float on the CPU.

Capacities are per layer: ``C_l = max_r need[r][l]``, where ``need[r][l]`` is what row r will ever
hold in layer l (its entries now plus the tokens it may still feed). VL-Cache's budgets differ per
layer and per prompt, so a layer's capacity is set by the row that kept most there, and rows that
kept less pad up to it; similar prompts keep similar per-layer shares, so the padding is small.
The buffers are rebuilt, exactly sized, whenever a row joins or leaves (one copy of the batch's
valid entries per membership change, never per decode step): finished and cancelled requests give
their memory back at once.

:class:`KVPool` is the accounting: the batch's buffers (padding included: what is really allocated)
plus what is *staged* — the buffers of the prefill in flight and of a prefilled request waiting to
join. The scheduler admits only what fits, so the pool's ``used`` never exceeds its ``capacity``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlcache.runtime.base import LayerKV

#: the default pool: this fraction of the memory available when the pool is made
DEFAULT_POOL_FRACTION = 0.25


def _cgroup_room() -> int | None:
    """What the cgroup (v2) memory limit leaves, when one is set: a container sees the host's
    ``/proc/meminfo``, not its own limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """Memory available now: ``MemAvailable`` (else free pages), or less where a cgroup limit leaves less."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    room = _cgroup_room()
    return available if room is None else min(available, room)


def pool_bytes(megabytes: float | None = None, fraction: float = DEFAULT_POOL_FRACTION) -> int:
    """The pool's capacity: ``megabytes`` MiB when given, else ``fraction`` of the available memory."""
    if megabytes is not None:
        if not megabytes > 0:
            raise ValueError(f"the KV pool size must be > 0 MiB, got {megabytes!r}")
        return int(megabytes * 2**20)
    if not 0 < fraction <= 1:
        raise ValueError(f"the KV pool fraction must lie in (0, 1], got {fraction!r}")
    return int(available_memory_bytes() * fraction)


class KVPool:
    """The byte budget: ``used = batch + staged <= capacity`` (module docstring).

    Attributes:
        capacity: bytes the pool may hold.
        batch: bytes of the decode batch's buffers (padding included).
        staged: bytes of the prefill in flight and of prefilled requests waiting to join.
        peak: the largest ``used`` seen.
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"the KV pool's capacity must be a positive number of bytes, got {capacity!r}")
        self.capacity = capacity
        self.batch = 0
        self.staged = 0
        self.peak = 0

    @property
    def used(self) -> int:
        return self.batch + self.staged

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def occupancy(self) -> float:
        """used / capacity."""
        return self.used / self.capacity

    @property
    def peak_occupancy(self) -> float:
        return self.peak / self.capacity

    def _changed(self) -> None:
        self.peak = max(self.peak, self.used)

    def set_batch(self, nbytes: int) -> None:
        self.batch = int(nbytes)
        self._changed()

    def stage(self, nbytes: int) -> None:
        self.staged += int(nbytes)
        self._changed()

    def unstage(self, nbytes: int) -> None:
        self.staged -= int(nbytes)
        if self.staged < 0:
            raise RuntimeError("the KV pool released more staged bytes than it held")


@dataclass
class RowSource:
    """One row to place in rebuilt buffers: per layer its (H_kv, C, D) key and value arrays (a row of
    the old slab, or a prefilled request's batch-1 buffers) with ``lengths[l]`` valid entries."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    lengths: list[int]


class BatchKV:
    """The running batch's cache: one :class:`~vlcache.runtime.base.LayerKV` per layer over B rows.

    ``layers`` is what the decoder step takes (and gives back, written in place); ``layers[l].lengths[r]``
    is row r's valid entries. :meth:`rebuild` makes exactly sized buffers for a new set of rows.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        #: bytes of one entry (a key and a value) in one layer
        self.entry_bytes = 2 * num_kv_heads * head_dim * np.dtype(np.float32).itemsize
        self.layers: list[LayerKV] = []

    @property
    def rows(self) -> int:
        return 0 if not self.layers else int(self.layers[0].lengths.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.layers)

    def bytes_for(self, needs: Sequence[Sequence[int]]) -> int:
        """Bytes of buffers for rows needing ``needs[r][l]`` entries in layer l (padding included)."""
        if not needs:
            return 0
        capacities = np.max(np.asarray(needs, dtype=np.int64), axis=0)
        return int(len(needs) * int(capacities.sum()) * self.entry_bytes)

    def row(self, r: int) -> RowSource:
        """Row r of the current buffers (views)."""
        return RowSource(
            [kv.keys[r] for kv in self.layers],
            [kv.values[r] for kv in self.layers],
            [int(kv.lengths[r]) for kv in self.layers],
        )

    def rebuild(self, rows: Sequence[RowSource], needs: Sequence[Sequence[int]]) -> None:
        """New buffers holding ``rows`` in this order, layer l sized ``max_r needs[r][l]``; the old
        buffers are dropped (so the memory of rows left out is freed)."""
        if len(rows) != len(needs):
            raise ValueError(f"{len(rows)} rows but {len(needs)} needs")
        if not rows:
            self.layers = []
            return
        capacities = np.max(np.asarray(needs, dtype=np.int64), axis=0)
        layers = []
        for layer in range(self.num_layers):
            cap = int(capacities[layer])
            keys = np.zeros((len(rows), self.num_kv_heads, cap, self.head_dim), np.float32)
            values = np.zeros_like(keys)
            lengths = np.zeros(len(rows), np.int64)
            for r, src in enumerate(rows):
                n = src.lengths[layer]
                if n > cap:
                    raise ValueError(f"row {r} holds {n} entries in layer {layer}, above its need {cap}")
                keys[r, :, :n] = src.keys[layer][:, :n]
                values[r, :, :n] = src.values[layer][:, :n]
                lengths[r] = n
            layers.append(LayerKV(keys, values, lengths))
        self.layers = layers

    def evict(self, r: int, layer: int, index: int) -> None:
        """Remove entry ``index`` of row r in ``layer``: the entries after it move one place down."""
        kv = self.layers[layer]
        n = int(kv.lengths[r])
        if not 0 <= index < n:
            raise ValueError(f"cannot evict entry {index} of a row holding {n}")
        for buffer in (kv.keys, kv.values):
            buffer[r, :, index : n - 1] = buffer[r, :, index + 1 : n]
        kv.lengths[r] = n - 1
