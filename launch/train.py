"""Entry point for every launcher: deepspeed, torchrun, accelerate launch, or plain python.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json
    torchrun --nproc_per_node 2 launch/train.py --fsdp fsdp2 --model tiny
    python launch/train.py --model tiny --max_steps 20

The application lives in ``flatlora_dist.train``; this file only makes it runnable from a checkout.
"""

import logging
import os
import sys
import warnings

# Dependencies' deprecation chatter (transformers v6 renames, bitsandbytes' optional CPU kernels) is not
# actionable for a user of this launcher; real warnings still show.
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flatlora_dist.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
