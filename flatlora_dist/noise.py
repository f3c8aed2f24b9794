"""Deterministic, shard-addressable Gaussian noise.

Invariant: the standard-normal value at global flat index ``k`` of the weight named ``name`` at
optimizer step ``step`` is a pure function of ``(seed, step, name, k)``.  Any rank can therefore make
exactly the elements it owns, with no communication, and the result does not depend on world size,
sharding backend or resume point.

How: the flattened weight is cut into fixed blocks of ``NOISE_BLOCK`` elements.  Block ``b`` is drawn
with the device's native generator seeded from a hash of ``(seed, step, name, b)``; a sub-range is the
slice of the blocks it overlaps.  Blocks are always drawn whole (torch's samplers are not
prefix-stable), so a range costs at most two partially used blocks.  The global RNG is never touched.
Values match across runs on the same device type; CPU and CUDA generators differ from each other.

This is the ``blocks`` scheme.  The ``fused`` scheme (``kernels/``; the default on CUDA) keeps the same
invariant with no blocks: ``z_k = randn(Philox(key_seed(seed, step, name), counter=k))``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import TypeVar

import torch

from .kernels import load_ops, scheme_for

T = TypeVar("T")

NOISE_BLOCK = 1 << 18
"""Elements per noise block.  Part of the noise's definition: changing it changes every draw."""

_LOCAL = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()
CPU_DRAW_THREADS = int(os.environ.get("FLATLORA_NOISE_THREADS", "2"))
"""Worker threads drawing CPU noise blocks ahead of their use (torch's CPU sampler is serial per call)."""


def _hash63(*parts: object) -> int:
    """A 63-bit integer from a cryptographic hash of the parts joined by ``\\x1f``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def block_seed(seed: int, step: int, name: str, block: int) -> int:
    """A 63-bit generator seed for one block (blocks scheme; no collisions in practice)."""
    return _hash63(seed, step, name, block)


def key_seed(seed: int, step: int, name: str) -> int:
    """The 63-bit Philox key of one weight at one step (fused scheme: counter = global flat index)."""
    return _hash63(seed, step, name)


def _generator(device: torch.device) -> torch.Generator:
    """One generator per thread and device (blocks are seeded independently, so any thread may draw any)."""
    gens = getattr(_LOCAL, "gens", None)
    if gens is None:
        gens = _LOCAL.gens = {}
    key = str(device)
    gen = gens.get(key)
    if gen is None:
        gen = gens[key] = torch.Generator(device=device)
    return gen


def _pool() -> ThreadPoolExecutor | None:
    """The draw pool of this process (a forked child, e.g. a DataLoader worker, makes its own)."""
    global _POOL, _POOL_PID
    if CPU_DRAW_THREADS <= 0:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL_PID = os.getpid()
            _POOL = ThreadPoolExecutor(max_workers=CPU_DRAW_THREADS, thread_name_prefix="flatlora-noise")
        return _POOL


class Scratch:
    """Reusable buffers for one stream of chunk tasks, one set per thread, freed with the object.

    Why: a fresh 1 MiB tensor per noise block (and a few MiB of record buffers per chunk) costs page
    faults, since glibc maps blocks this size anew; on CPU that made two draw threads only 1.3x faster
    than one instead of 1.9x.  Scoped to one perturb or restore call, so nothing stays allocated
    between the phases of a step (where activations need the memory).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The calling thread's buffer ``name`` as a tensor of ``numel`` elements (contents undefined)."""
        key = (threading.get_ident(), name, dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:  # distinct keys per thread: no lock needed
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def draw_block(
    seed: int, step: int, name: str, block: int, numel: int, device: torch.device, scratch: Scratch | None = None
) -> torch.Tensor:
    """Block ``block`` of a weight with ``numel`` elements: float32, shape (block_len,), on ``device``.

    ``scratch``: draw into the calling thread's ``noise`` buffer there (same values, no allocation); the
    result is then only valid until the thread's next draw into it."""
    lo = block * NOISE_BLOCK
    length = min(NOISE_BLOCK, numel - lo)
    if length <= 0:
        raise ValueError(f"block {block} lies past the end of a weight of {numel} elements")
    gen = _generator(device)
    gen.manual_seed(block_seed(seed, step, name, block))
    if scratch is not None:  # normal_ on a contiguous float32 tensor is what randn does after allocating
        return scratch.get("noise", NOISE_BLOCK, torch.float32, device)[:length].normal_(generator=gen)
    return torch.randn(length, generator=gen, device=device, dtype=torch.float32)


def _block_ranges(start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """``(block, lo, hi)`` for each block overlapping ``[start, stop)``."""
    pos = start
    while pos < stop:
        block = pos // NOISE_BLOCK
        end = min(stop, (block + 1) * NOISE_BLOCK)
        yield block, pos, end
        pos = end


def noise_chunks(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(chunk_start, values)`` covering global flat range ``[start, stop)`` of a weight with
    ``numel`` elements, one chunk per overlapped block (float32, at most ``NOISE_BLOCK`` long).

    On CPU the next blocks are drawn by worker threads while the caller uses the current one (at most
    ``CPU_DRAW_THREADS + 1`` blocks alive); values are identical to drawing them in order.
    """
    return map_noise_chunks(seed, step, name, numel, start, stop, device, lambda lo, values: (lo, values))


def noise_tasks(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device,
    fn: Callable[[int, torch.Tensor], T], scratch: Scratch | None = None,
) -> list[Callable[[], T]]:  # fmt: skip
    """One zero-argument task per chunk of ``noise_chunks``: draw the block, return ``fn(chunk_start, values)``.

    ``scratch``: ``values`` lives in the running thread's buffer there, so ``fn`` must not keep it (nor
    return a view of it); saves an allocation per block.  Run them with ``run_ordered``.
    """
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) is outside a weight of {numel} elements")
    device = torch.device(device)

    def task(block: int, lo: int, hi: int) -> T:
        off = block * NOISE_BLOCK
        return fn(lo, draw_block(seed, step, name, block, numel, device, scratch)[lo - off : hi - off])

    return [partial(task, *r) for r in _block_ranges(start, stop)]


def threads_pay(numel: int) -> bool:
    """Whether chunk work over ``numel`` elements is worth the draw threads: more than one noise block.
    Below that, handing tasks to threads costs more than it saves (a thousand perturb/restore cycles of
    a tiny model under 2-rank ZeRO-3 took 1.7x as long through the pool)."""
    return numel > NOISE_BLOCK


def run_ordered(tasks: Iterable[Callable[[], T]], parallel: bool) -> Iterator[T]:
    """Yield each task's result in order, the tasks running on the CPU draw threads.

    At most ``CPU_DRAW_THREADS + 1`` tasks are in flight, taken lazily from ``tasks``, so one stream can
    span many weights without the threads draining between them.  Tasks that release the GIL (torch
    ops, the native kernels) run on every draw thread at once; each must only touch its own data.  When
    the caller stops early or a task raises, the tasks already started are finished before this returns.
    ``parallel=False`` (or no draw threads) runs them one by one in the calling thread (see
    ``threads_pay``); the results are the same either way.
    """
    pool = _pool() if parallel else None
    if pool is None:
        for task in tasks:
            yield task()
        return
    pending: deque = deque()
    todo = iter(tasks)
    try:
        for task in todo:
            pending.append(pool.submit(task))
            if len(pending) > CPU_DRAW_THREADS:
                break
        while pending:
            fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(nxt))
            yield fut.result()
    finally:
        for fut in pending:  # early exit: nothing still writes once we return
            fut.cancel()
        wait(pending)


def map_noise_chunks(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device,
    fn: Callable[[int, torch.Tensor], T], scratch: Scratch | None = None,
) -> Iterator[T]:  # fmt: skip
    """Yield ``fn(chunk_start, values)`` for each chunk of ``noise_chunks``, in order.

    On CPU ``fn`` runs in a draw thread right after its block is drawn (``noise_tasks`` run by
    ``run_ordered``).  ``fn`` must only touch its own chunk's data; ``scratch`` as in ``noise_tasks``.
    """
    tasks = noise_tasks(seed, step, name, numel, start, stop, device, fn, scratch)
    return run_ordered(tasks, parallel=torch.device(device).type == "cpu" and threads_pay(stop - start))


def noise_range(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard-normal noise for global flat range ``[start, stop)``, float32, in the scheme
    ``FLATLORA_KERNELS`` selects for ``device`` (blocks: concatenated chunks; fused: one kernel).
    For tests and small ranges — the perturbation code streams the noise itself."""
    if scheme_for(device) == "fused":
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"range [{start}, {stop}) is outside a weight of {numel} elements")
        return load_ops().noise(key_seed(seed, step, name), start, stop, torch.device(device))
    parts = [v for _, v in noise_chunks(seed, step, name, numel, start, stop, torch.device(device))]
    if not parts:
        return torch.empty(0, dtype=torch.float32, device=device)
    return torch.cat(parts)
