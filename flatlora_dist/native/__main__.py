"""``python -m flatlora_dist.native``: build the CPU round-trip kernels ahead of use (``make install``)."""

from . import build

print(build())
