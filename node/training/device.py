"""Which torch device an envoy trains and evaluates on: `[train] device` of a config.

A spec is one of ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``"auto"`` takes
the first CUDA GPU, else Apple's MPS, else the CPU. An explicit accelerator that this machine
does not have is an error naming what it does have, never a silent fall back to the CPU: a
hospital that asked for its GPU and trains on the CPU instead would only notice by the time a
round takes, and then miss every training deadline.

`DEVICE_SPEC_PATTERN` validates a spec without importing torch (config files are checked on
nodes that never load it); `select_device` resolves it on the machine that runs the model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from node.errors import ExitCode, FedbusError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_SPEC_PATTERN", "DeviceUnavailable", "parse_device_spec", "select_device"]

DEVICE_SPEC_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]{1,3}|mps)$"
_SPEC = re.compile(DEVICE_SPEC_PATTERN)


class DeviceUnavailable(FedbusError):
    """A device spec that is malformed or names hardware this machine lacks."""

    exit_code = ExitCode.CONFIG


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda" | "mps", index or None) of a valid spec; raises otherwise."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise DeviceUnavailable(
            f"device {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    kind, _, index = spec.partition(":")
    return kind, int(index) if index else None


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """What this machine offers, e.g. ['cpu', 'cuda:0', 'cuda:1'] (for error messages)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def select_device(spec: str = "auto") -> torch.device:
    """The torch.device a spec means on this machine; DeviceUnavailable if it has none such."""
    import torch

    kind, index = parse_device_spec(spec)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceUnavailable(
                f"device 'mps' asked for, but this machine has no usable MPS backend "
                f"(available: {', '.join(available_devices())})"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {spec!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
            f"(driver missing, CUDA_VISIBLE_DEVICES empty, a CPU-only torch build, or the "
            f"service's device sandbox; available: {', '.join(available_devices())})"
        )
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"device {spec!r} asked for, but this machine has {count} CUDA GPU(s) "
            f"(available: {', '.join(available_devices())})"
        )
    return torch.device("cuda", index)
