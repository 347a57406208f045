"""Tensors on the wire: dtype, shape and raw little-endian bytes. Never pickled."""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
import numpy as np

from protocol.errors import ProtocolError

# Only plain numeric dtypes travel; anything else (objects, strings, big-endian) is refused.
ALLOWED_DTYPES = frozenset({"<f4", "<f8", "<f2", "<u4", "<i4", "<i8", "<u8", "|u1", "|i1"})
MAX_DIMS = 8


class TensorError(ProtocolError):
    """A wire tensor whose dtype, shape and byte length do not agree."""


class Tensor(msgspec.Struct, frozen=True, array_like=True):
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def from_numpy(array: np.ndarray) -> Tensor:
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    dtype = array.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise TensorError(f"dtype {dtype} cannot travel; allowed: {sorted(ALLOWED_DTYPES)}")
    return Tensor(dtype=dtype, shape=tuple(int(s) for s in array.shape), data=array.tobytes())


def to_numpy(tensor: Tensor) -> np.ndarray:
    """Return a read-only view of the tensor's bytes, after checking they are what they claim."""
    if tensor.dtype not in ALLOWED_DTYPES:
        raise TensorError(f"dtype {tensor.dtype!r} is not allowed")
    if len(tensor.shape) > MAX_DIMS or any(s < 0 for s in tensor.shape):
        raise TensorError(f"shape {tensor.shape} is not a valid shape")
    dtype = np.dtype(tensor.dtype)
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor of shape {tensor.shape} and dtype {tensor.dtype} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def state_from_numpy(state: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    return {name: from_numpy(value) for name, value in state.items()}


def state_to_numpy(state: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {name: to_numpy(value) for name, value in state.items()}
