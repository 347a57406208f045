"""Tensors on the wire: dtype, shape and raw little-endian bytes. Never pickled."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Annotated

import msgspec
import numpy as np

from protocol.errors import ProtocolError

# Only plain numeric dtypes travel; anything else (objects, strings, big-endian) is refused.
ALLOWED_DTYPES = frozenset({"<f4", "<f8", "<f2", "<u4", "<i4", "<i8", "<u8", "|u1", "|i1"})
MAX_DIMS = 8
# Bounded in the type, so the decoder refuses a long shape before building it: an unbounded
# tuple of small ints decodes to ~36 bytes of Python objects per byte of frame.
Dim = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
Shape = Annotated[tuple[Dim, ...], msgspec.Meta(max_length=MAX_DIMS)]
DType = Annotated[str, msgspec.Meta(max_length=8)]


class TensorError(ProtocolError):
    """A wire tensor whose dtype, shape and byte length do not agree."""


class Tensor(msgspec.Struct, frozen=True, array_like=True):
    dtype: DType
    shape: Shape
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


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a model state: names, dtypes, shapes and bytes, in order. What an envoy
    compares to recognise the model it trained on or evaluated."""
    h = hashlib.sha256(b"fedbus/state/v1")
    for name, value in state.items():
        array = np.ascontiguousarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        header = f"{name}|{array.dtype.str}|{array.shape}".encode()
        h.update(struct.pack(">I", len(header)) + header)
        h.update(struct.pack(">Q", array.nbytes))
        h.update(array.tobytes())
    return h.hexdigest()
