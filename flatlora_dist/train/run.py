"""The training application: HF Trainer + FlatLoRACallback, under plain python, DeepSpeed or FSDP.

``launch/train.py`` calls :func:`main`, which runs a :class:`~.recipe.Recipe`.  Order of work: validate everything cheap (config, model
folder, output directory and its writability, DeepSpeed config and its batch sizes, data files and
their records, optional packages, scheduler and attention names) before distributed start-up, model
loading or data tokenization; check the LoRA target modules against the loaded model; touch the output
directory only once model and data have loaded (and undo that if the run fails before its first
step); then evaluate, train, save a complete PEFT adapter, evaluate (a SIGTERM stops this final
evaluation between batches: exit 143, adapter and summary written) and write ``summary.json`` and
``curves.png``.  ``--resume`` of a finished run (``summary.json`` present) does nothing and exits 0.

Reliability (issue 8):

* **Checkpoints** ``checkpoint-N`` get a ``COMPLETE`` marker after every rank has written its part;
  ``--resume`` loads only the newest complete one and sets every other newer or unmarked folder aside
  (``incomplete-checkpoint-N-<time>``: a name neither resume nor HF's rotation looks at).
  ``--save_total_limit`` is applied here, only to complete checkpoints and only once the new one is
  marked (HF's own rotation would delete the last complete checkpoint before the new one is).
  Checkpoints and saves never see perturbed base weights: a save requested while Flat-LoRA noise is
  in the weights restores them first and re-applies the same (deterministic) noise afterwards.
* **SIGTERM** (scheduler pre-emption, ``scancel``, the DeepSpeed launcher forwarding its own
  SIGTERM) **and Ctrl-C** (SIGINT): the handler only sets a flag; at the end of the current optimizer
  step all ranks agree on it (one all-reduce), write a complete checkpoint and stop.  The process then
  exits with **143** (128 + SIGTERM) or **130** (128 + SIGINT) without final evaluation, adapter or
  summary, printing the exact command that continues the run (the same one with ``--resume``; under
  a launcher: rerun the launcher's command with ``--resume``).  A second Ctrl-C aborts at once (exit
  130; a checkpoint it cut short has no ``COMPLETE`` marker and is set aside by the next resume).  Under the ``deepspeed`` launcher, signal the process group (as
  Slurm and ``kill -TERM -<pgid>`` do) or ``deepspeed.launcher.launch`` (which forwards SIGTERM to
  the ranks and waits 30 s): the ``deepspeed`` command itself dies on SIGTERM and leaves the ranks
  running.
* **Non-finite loss or gradients**: the step's update is skipped (no optimizer or LR-scheduler step;
  the step still counts, so the noise schedule and data order go on), with a warning and the step
  listed in ``summary.json`` (``skipped_steps``).  All of it is :class:`flatlora_dist.hf.FlatLoRACallback`'s
  public behaviour (an optimizer step pre-hook: noise out before the real update in every setup, a
  non-finite gradient on any rank drops the update and the LR scheduler is rewound; DeepSpeed's own
  overflow skips are read from accelerate's ``step_was_skipped``); the app only adds the loss value
  to the warning and carries the list across resumes.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TrainConfig, parse_args
from .recipe import Recipe
from .runtime import INTERRUPTED_EXIT_CODE, STOPPED_EXIT_CODE, AlreadyFinished, RunError, StopRequest, is_main

if TYPE_CHECKING:
    from .trainer import TrainerHook

__all__ = ["INTERRUPTED_EXIT_CODE", "STOPPED_EXIT_CODE", "main", "resume_command", "run"]


def run(cfg: TrainConfig, extra_callbacks: Sequence[TrainerHook] = ()) -> dict[str, Any]:
    """One run with SIGTERM and Ctrl-C handled (see the module docstring); its summary (a stopped run's
    has ``stopped`` and ``exit_code``)."""
    stop = StopRequest().install()
    try:
        recipe = Recipe(cfg, stop, extra_callbacks)
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        stop.uninstall()


_OVERWRITE = ("--overwrite", "--overwrite_output_dir", "--overwrite-output-dir")
_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def resume_command(argv: Sequence[str], overwrite: bool) -> list[str]:
    """``argv`` (a command line, program first) with ``--resume`` added, and any ``--overwrite`` flag (which
    contradicts it) dropped; ``overwrite``: the run's setting, which when it came from a ``--config`` file
    gets an explicit ``--overwrite false``.  ``--local_rank`` (the DeepSpeed launcher's) is dropped too."""
    out: list[str] = []
    dropped = False
    args = list(argv)
    i = 0
    while i < len(args):
        a, name = args[i], args[i].partition("=")[0]
        takes_next = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
        if name in _OVERWRITE:
            dropped = True
            i += 2 if takes_next and args[i + 1].lower() in _VALUES else 1
            continue
        if name in ("--local_rank", "--local-rank"):
            i += 2 if takes_next else 1
            continue
        if name in ("--resume", "--resume_from_checkpoint"):
            i += 2 if takes_next and args[i + 1].lower() in _VALUES else 1
            continue
        out.append(a)
        i += 1
    if overwrite and not dropped:
        out += ["--overwrite", "false"]
    return [*out, "--resume"]


def continue_hint(argv: list[str] | None, cfg: TrainConfig) -> str:
    """What to run to continue a stopped run: the exact command, shell-quoted (from the process's own
    command line when ``argv`` is ``None``); under a launcher, its command with ``--resume``."""
    if argv is not None:
        return f"call again with --resume added: {shlex.join(resume_command(argv, cfg.overwrite))}"
    if "LOCAL_RANK" in os.environ:
        script = shlex.join(resume_command(sys.argv, cfg.overwrite))
        return f"rerun the same launcher command with --resume added (its script part: {script})"
    return f"continue with: {shlex.join(resume_command(sys.orig_argv, cfg.overwrite))}"


def main(argv: list[str] | None = None, extra_callbacks: Sequence[TrainerHook] = ()) -> int:
    """Entry point: 0 finished (or ``--resume`` of a finished run: nothing to do); 2 user error (one
    ``error:`` line, never a traceback, the output folder untouched); 143 / 130 stopped on SIGTERM / Ctrl-C:
    during training with a complete checkpoint (the command to continue is printed), or during the final
    evaluation with the adapter and summary written; 130 aborted by a second Ctrl-C.  ``extra_callbacks``:
    see :data:`.trainer.TrainerHook`."""
    from .data import DataError
    from .model_sources import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        summary = run(cfg, extra_callbacks)
        if summary.get("stopped") and summary.get("checkpoint") and is_main():
            print(continue_hint(argv, cfg), file=sys.stderr, flush=True)
        return summary["exit_code"] if summary.get("stopped") else 0
    except (ConfigError, RunError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AlreadyFinished as e:
        if is_main():
            print(f"nothing to do: {e}")
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest), or one before or after its handler's time
        if is_main():
            print("aborted by Ctrl-C: the steps since the last complete checkpoint are lost "
                  "(--resume continues from it)", file=sys.stderr)  # fmt: skip
        return INTERRUPTED_EXIT_CODE
