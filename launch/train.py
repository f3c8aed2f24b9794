"""Entry point for every launcher: deepspeed, torchrun, accelerate launch, or plain python.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json
    torchrun --nproc_per_node 2 launch/train.py --fsdp fsdp2 --model tiny
    python launch/train.py --model tiny --max_steps 20

The application lives in ``flatlora_dist.train``; this file only makes it runnable from a checkout.  An
installed package has the same command as ``flatlora-train`` and ``python -m flatlora_dist.train``
(all three run ``flatlora_dist.train.__main__.cli``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flatlora_dist.train.__main__ import cli  # noqa: E402

if __name__ == "__main__":
    cli()
