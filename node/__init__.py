"""fedbus's node layer: director, envoy, training, the `fedbus` command line.

`node.__version__` is the installed distribution's version (pyproject.toml is its one
source), looked up on first use so that importing a node module stays cheap.
"""

from __future__ import annotations

from typing import Any

DISTRIBUTION = "fedbus"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:  # a checkout on sys.path that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
