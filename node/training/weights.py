"""Model weights as plain float32 numpy: what travels, gets masked, and gets averaged.

`get_weights` returns every state_dict entry that FedAvg averages, float32, in state_dict
order: all parameters and the floating buffers (BatchNorm running_mean / running_var).

BatchNorm's `num_batches_tracked` counters are left out, on purpose. They are int64 step
counters that only matter for BatchNorm with momentum=None (a cumulative average), which
no fedbus model uses; averaging a counter means nothing, and as an update delta (a few
dozen steps a round) it would be clipped by the secure-aggregation quantiser into garbage.
Each node keeps its own counter; `set_weights` leaves it alone. One predicate,
`is_averaged(name, tensor)`, states the rule.

`flatten` / `unflatten` turn such a dict into one float32 vector and back, in dict order,
for the masked vector of secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

WeightSpec = list[tuple[str, tuple[int, ...]]]


def is_averaged(name: str, tensor: torch.Tensor) -> bool:
    """Floating entries are averaged; integer counters (num_batches_tracked) are local."""
    return tensor.is_floating_point()


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Averaged state_dict entries as float32 numpy copies, in state_dict order."""
    return {
        name: t.detach().to("cpu", torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
        if is_averaged(name, t)
    }


def expected_spec(model: nn.Module) -> WeightSpec:
    return [
        (name, tuple(t.shape)) for name, t in model.state_dict().items() if is_averaged(name, t)
    ]


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load a `get_weights`-style dict: exactly the averaged names, matching shapes.

    A missing, unknown or mis-shaped entry raises ValueError naming it, before anything is
    copied, so a bad update never leaves the model half loaded.
    """
    state = model.state_dict()
    spec = dict(expected_spec(model))
    missing = [n for n in spec if n not in weights]
    unknown = [n for n in weights if n not in spec]
    if missing or unknown:
        raise ValueError(f"weights do not fit the model: missing {missing}, unknown {unknown}")
    for name, shape in spec.items():
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != shape:
            raise ValueError(f"weights[{name!r}] has shape {arr.shape}, the model needs {shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"weights[{name!r}] contains NaN or infinity")
    with torch.no_grad():
        for name in spec:
            target = state[name]
            target.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)).to(target))


def weight_spec(weights: Mapping[str, np.ndarray]) -> WeightSpec:
    return [(name, tuple(np.shape(arr))) for name, arr in weights.items()]


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """One contiguous float32 vector, entries in dict order."""
    if not weights:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in weights.values()])


def unflatten(
    vector: np.ndarray, spec: WeightSpec | Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of `flatten`; `spec` is a WeightSpec or a dict of arrays to take shapes from."""
    items: Sequence[tuple[str, tuple[int, ...]]] = (
        weight_spec(spec) if isinstance(spec, Mapping) else spec
    )
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in items]
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.size != sum(sizes):
        raise ValueError(f"vector has {vector.size} entries, the spec needs {sum(sizes)}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for (name, shape), size in zip(items, sizes, strict=True):
        out[name] = vector[offset : offset + size].reshape(shape).copy()
        offset += size
    return out


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], num_samples: Sequence[int]
) -> dict[str, np.ndarray]:
    """FedAvg: sum_k n_k w_k / sum_k n_k, in float64 then float32 (the plain, unmasked path)."""
    if not updates or len(updates) != len(num_samples):
        raise ValueError("need one sample count per update, and at least one update")
    total = float(sum(num_samples))
    if total <= 0:
        raise ValueError("sample counts must sum to > 0")
    return {
        name: (
            sum(
                np.asarray(u[name], np.float64) * n
                for u, n in zip(updates, num_samples, strict=True)
            )
            / total
        ).astype(np.float32)
        for name in updates[0]
    }


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """a - b entry by entry (an update delta = local weights - global weights)."""
    return {name: (np.asarray(a[name], np.float32) - np.asarray(b[name], np.float32)) for name in a}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (np.asarray(a[name], np.float32) + np.asarray(b[name], np.float32)) for name in a}
