"""``--report_to``: the experiment loggers a run reports to, by transformers' own names and checks.

``'none'`` or a comma list of the integrations transformers knows (``INTEGRATION_TO_CALLBACK``); each one
must be usable here, as transformers decides (``get_available_reporting_integrations``).  For one that
is not, the error quotes transformers' own install instruction, which its callback raises when built
without its package.  ``metrics.jsonl`` (``trainer.MetricsLog``) is written whatever the choice.
"""

from __future__ import annotations

import difflib
import sys

from .runtime import RunError


def report_to_names(text: str) -> list[str]:
    """The names in ``--report_to`` (``[]`` for ``none``), as ``TrainingArguments(report_to=...)`` takes them."""
    names = [n.strip() for n in text.split(",")]
    return [] if names == ["none"] else names


def _install_hint(callback: type) -> str:
    """Why transformers' ``callback`` cannot be built here, in its own words (it raises when its package is
    missing, before touching anything; the half-built object's ``__del__`` noise is kept off stderr)."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        callback()
    except Exception as e:  # transformers raises RuntimeError, ValueError or ImportError by integration
        return " ".join(str(e).split())  # one line
    finally:
        import gc

        gc.collect()
        sys.unraisablehook = previous
    return ""


def check_report_to(text: str) -> list[str]:
    """The loggers of ``--report_to``; raises :class:`RunError` (one line) for an empty or unknown name,
    ``none`` mixed with loggers, or a logger whose package is not installed (naming what to install)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = report_to_names(text)
    known = sorted(INTEGRATION_TO_CALLBACK)
    if "none" in names or "" in names:
        raise RunError(f"--report_to {text!r}: give 'none' alone, or a comma list of loggers from {', '.join(known)}")
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RunError(f"--report_to {name!r} is not a logger transformers supports; {hint}choose from "
                           f"{', '.join(known)}, or none")  # fmt: skip
        if name not in available:
            why = _install_hint(INTEGRATION_TO_CALLBACK[name])
            if why:
                raise RunError(f"--report_to {name}: not usable here: {why} (or leave {name} out of --report_to)")
    return names
