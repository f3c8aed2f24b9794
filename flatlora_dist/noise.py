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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

NOISE_BLOCK = 1 << 18
"""Elements per noise block.  Part of the noise's definition: changing it changes every draw."""

_GENERATORS: dict[str, torch.Generator] = {}


def block_seed(seed: int, step: int, name: str, block: int) -> int:
    """A 63-bit generator seed for one block, from a cryptographic hash (no collisions in practice)."""
    digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{name}\x1f{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device) -> torch.Generator:
    key = str(device)
    gen = _GENERATORS.get(key)
    if gen is None:
        gen = _GENERATORS[key] = torch.Generator(device=device)
    return gen


def draw_block(seed: int, step: int, name: str, block: int, numel: int, device: torch.device) -> torch.Tensor:
    """Block ``block`` of a weight with ``numel`` elements: float32, shape (block_len,), on ``device``."""
    lo = block * NOISE_BLOCK
    length = min(NOISE_BLOCK, numel - lo)
    if length <= 0:
        raise ValueError(f"block {block} lies past the end of a weight of {numel} elements")
    gen = _generator(device)
    gen.manual_seed(block_seed(seed, step, name, block))
    return torch.randn(length, generator=gen, device=device, dtype=torch.float32)


def noise_chunks(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(chunk_start, values)`` covering global flat range ``[start, stop)`` of a weight with
    ``numel`` elements, one chunk per overlapped block (float32, at most ``NOISE_BLOCK`` long)."""
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) is outside a weight of {numel} elements")
    device = torch.device(device)
    pos = start
    while pos < stop:
        block = pos // NOISE_BLOCK
        block_lo = block * NOISE_BLOCK
        end = min(stop, block_lo + NOISE_BLOCK)
        values = draw_block(seed, step, name, block, numel, device)
        yield pos, values[pos - block_lo : end - block_lo]
        pos = end


def noise_range(
    seed: int, step: int, name: str, numel: int, start: int, stop: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard-normal noise for global flat range ``[start, stop)``, float32 (concatenated chunks;
    for tests and small ranges — the perturbation code streams ``noise_chunks`` instead)."""
    parts = [v for _, v in noise_chunks(seed, step, name, numel, start, stop, torch.device(device))]
    if not parts:
        return torch.empty(0, dtype=torch.float32, device=device)
    return torch.cat(parts)
