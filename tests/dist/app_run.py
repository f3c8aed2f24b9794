"""``python tests/dist/app_run.py <launch/train.py flags>``: the training app with fault injection.

The injection spec (see ``app_inject.py``) comes as JSON in the ``APP_INJECT`` environment variable,
so the script runs unchanged under ``deepspeed --num_gpus N`` (which appends ``--local_rank``).
Exits with ``main``'s code; an injected SIGKILL ends the process with -9.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from app_inject import hook  # noqa: E402

from flatlora_dist.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], extra_callbacks=[hook(json.loads(os.environ.get("APP_INJECT", "{}")))]))
