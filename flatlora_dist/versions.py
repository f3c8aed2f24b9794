"""The dependency versions this project is tested with, and one warning for an untested major version.

``pyproject.toml``'s lower bounds are the versions CI installs (``TESTED``); pip enforces those.  A
*newer* major version (for 0.x packages: a newer minor, which semver treats as breaking) installs
fine but has never run our tests, so ``import flatlora_dist`` warns once per such package.  Nothing
is imported to find a version: the installed distributions' metadata is read.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata

TESTED = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
    "deepspeed": "0.19.8",
    "bitsandbytes": "0.50.2",
    "triton": "3.9.0",
    "trl": "1.16.0",
    "datasets": "5.2.0",
}
"""Package -> version the test suite runs with (keep in step with pyproject.toml's lower bounds)."""


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release components: '2.13.0+cpu' -> (2, 13, 0), '5.0.0rc1' -> (5, 0, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else (0,)


def breaking_series(version: str) -> tuple[int, ...]:
    """The part of a version that changes on a breaking release: (major,) or, for 0.x, (0, minor)."""
    rel = _release(version) + (0, 0)
    return rel[:2] if rel[0] == 0 else rel[:1]


def untested(installed: dict[str, str]) -> dict[str, str]:
    """Of ``{package: installed version}``, those in a newer breaking series than the tested one."""
    return {
        name: version
        for name, version in installed.items()
        if name in TESTED and breaking_series(version) > breaking_series(TESTED[name])
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
    """Warn once (one ``UserWarning``) naming every installed package of an untested major version."""
    newer = untested(installed_versions() if installed is None else installed)
    if not newer:
        return []
    names = ", ".join(f"{n} {v} (tested: {TESTED[n]})" for n, v in sorted(newer.items()))
    warnings.warn(
        f"flatlora_dist has not been tested with {names}; if something breaks, install the tested "
        "version (pip install 'NAME==VERSION') and report the issue",
        UserWarning,
        stacklevel=2,
    )
    return sorted(newer)
