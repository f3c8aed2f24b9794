"""The application's command: ``flatlora-train`` (the console script a ``pip install`` brings),
``python -m flatlora_dist.train`` and a checkout's ``launch/train.py`` all run :func:`cli`.

    flatlora-train --model tiny --max_steps 20
    python -m flatlora_dist.train --ds_config zero3 --model tiny
    deepspeed launch/train.py --ds_config ds_configs/zero3.json

Invariant: the three behave the same (same warning filters, same exit codes as :func:`.run.main`); only
``--help``'s usage line differs, naming the command that was typed.
"""

from __future__ import annotations

import logging
import sys
import warnings


def quiet_dependencies() -> None:
    """Dependencies' deprecation chatter (transformers v6 renames, bitsandbytes' optional CPU kernels) is
    not actionable for a user of the command; real warnings still show."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cli() -> None:
    """Run the app on ``sys.argv`` and exit with its code (0, 2 user error, 143 stopped: see
    :func:`.run.main`)."""
    quiet_dependencies()
    from .run import main  # after the filters: importing the app's dependencies is what warns

    sys.exit(main())


if __name__ == "__main__":
    cli()
