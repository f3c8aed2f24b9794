"""The dependency versions this project is tested with, and one warning for a version outside that range.

CI runs the suite on two stacks: the floor (``pyproject.toml``'s lower bounds, which pip enforces) and
the newest (the lock ``make install`` installs).  A version of a *newer* breaking series than the newest
tested (a newer major; for 0.x packages a newer minor, which semver treats as breaking) installs fine
but has never run our tests, and neither has one below the floor (pip refuses those unless forced), so
``import flatlora_dist`` warns once, naming every such package.  Nothing is imported to find a
version: the installed distributions' metadata is read.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata

TESTED = {
    "torch": ("2.11.0", "2.13.0"),
    "transformers": ("5.6.0", "5.25.0"),
    "peft": ("0.18.1", "0.22.0"),
    "accelerate": ("1.11.0", "1.16.0"),
    "deepspeed": ("0.19.8", "0.19.8"),
    "bitsandbytes": ("0.50.2", "0.50.2"),
    "triton": ("3.6.0", "3.9.0"),
    "trl": ("0.24.0", "1.16.0"),
    "datasets": ("4.0.0", "5.2.0"),
}
"""Package -> (floor, newest): the versions of the two stacks CI runs the suite on.  The floors are
``pyproject.toml``'s lower bounds and ``requirements/floor.txt``'s pins; the newest are
``requirements/newest.txt``'s (the lock ``make install`` installs).  Every release in between is supported."""


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release components: '2.13.0+cpu' -> (2, 13, 0), '5.0.0rc1' -> (5, 0, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else (0,)


def breaking_series(version: str) -> tuple[int, ...]:
    """The part of a version that changes on a breaking release: (major,) or, for 0.x, (0, minor)."""
    rel = _release(version) + (0, 0)
    return rel[:2] if rel[0] == 0 else rel[:1]


def untested(installed: dict[str, str]) -> dict[str, str]:
    """Of ``{package: installed version}``, those outside the tested range: older than the floor release,
    or of a newer breaking series than the newest tested one (a newer release in that series is fine)."""
    return {
        name: version
        for name, version in installed.items()
        if name in TESTED
        and (
            _release(version) < _release(TESTED[name][0])
            or breaking_series(version) > breaking_series(TESTED[name][1])
        )
    }


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages in ``TESTED`` (absent ones are left out)."""
    found = {}
    for name in TESTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def warn_untested(installed: dict[str, str] | None = None) -> list[str]:
    """Warn once (one ``UserWarning``) naming every installed package outside the tested range."""
    newer = untested(installed_versions() if installed is None else installed)
    if not newer:
        return []
    names = ", ".join(f"{n} {v} (tested: {TESTED[n][0]} to {TESTED[n][1]})" for n, v in sorted(newer.items()))
    warnings.warn(
        f"flatlora_dist has not been tested with {names}; if something breaks, install the tested "
        "version (pip install 'NAME==VERSION') and report the issue",
        UserWarning,
        stacklevel=2,
    )
    return sorted(newer)
