"""``python -m flatlora_dist.native``: build the CPU native kernels ahead of use (``make install``)."""

from . import build

print(build())
