"""Hypothesis strategies derived from the msgspec schema itself.

Deriving them from `msgspec.inspect` means every message added later, secure-aggregation stages
included, is covered by the round-trip and fuzz tests without anyone writing a new strategy.
"""

from __future__ import annotations

import math

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from protocol.messages import ALL_MESSAGES, PROTOCOL_VERSION, Envelope

_SMALL = 4  # keep collections small: the point is shape coverage, not volume


def _bounded_int(t: mi.IntType) -> st.SearchStrategy[int]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**63))
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 2**64 - 1)
    return st.integers(min_value=lo, max_value=hi)


def _bounded_float(t: mi.FloatType) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=t.ge if t.ge is not None else t.gt,
        max_value=t.le if t.le is not None else t.lt,
        exclude_min=t.gt is not None,
        exclude_max=t.lt is not None,
        allow_nan=False,
        width=64,
    )


def _text(t: mi.StrType) -> st.SearchStrategy[str]:
    lo, hi = t.min_length or 0, t.max_length if t.max_length is not None else 40
    if t.pattern:
        return st.from_regex(t.pattern, fullmatch=True).filter(lambda s: lo <= len(s) <= hi)
    return st.text(min_size=lo, max_size=min(hi, 40))


def _binary(t: mi.BytesType) -> st.SearchStrategy[bytes]:
    lo = t.min_length or 0
    hi = t.max_length if t.max_length is not None else 64
    return st.binary(min_size=lo, max_size=min(hi, max(lo, 64)))


def _tensor_data(dtype: str, shape: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    import numpy as np

    size = math.prod(shape) * np.dtype(dtype).itemsize
    return st.binary(min_size=size, max_size=size)


def from_type(t: mi.Type) -> st.SearchStrategy:
    if isinstance(t, mi.IntType):
        return _bounded_int(t)
    if isinstance(t, mi.FloatType):
        return _bounded_float(t)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StrType):
        return _text(t)
    if isinstance(t, mi.BytesType):
        return _binary(t)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.ListType):
        return st.lists(from_type(t.item_type), min_size=t.min_length or 0, max_size=_SMALL)
    if isinstance(t, mi.VarTupleType):
        return st.lists(from_type(t.item_type), max_size=_SMALL).map(tuple)
    if isinstance(t, mi.TupleType):
        return st.tuples(*(from_type(item) for item in t.item_types))
    if isinstance(t, mi.DictType):
        return st.dictionaries(from_type(t.key_type), from_type(t.value_type), max_size=_SMALL)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(from_type(member) for member in t.types))
    if isinstance(t, mi.StructType):
        return struct_strategy(t.cls)
    if isinstance(t, mi.Metadata):
        return from_type(t.type)
    raise NotImplementedError(f"no strategy for schema type {t!r}")


def _tensor_strategy() -> st.SearchStrategy:
    from protocol.tensors import ALLOWED_DTYPES, Tensor

    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    return st.tuples(st.sampled_from(sorted(ALLOWED_DTYPES)), shapes).flatmap(
        lambda ds: _tensor_data(*ds).map(lambda data: Tensor(dtype=ds[0], shape=ds[1], data=data))
    )


def struct_strategy(cls: type) -> st.SearchStrategy:
    from protocol.tensors import Tensor

    if cls is Tensor:
        return _tensor_strategy()
    info = mi.type_info(cls)
    fields = {f.name: from_type(f.type) for f in info.fields}
    return st.fixed_dictionaries(fields).map(lambda kwargs: cls(**kwargs))


message_bodies = st.one_of(*(struct_strategy(cls) for cls in ALL_MESSAGES))


@st.composite
def envelopes(draw: st.DrawFn, bodies: st.SearchStrategy = message_bodies) -> Envelope:
    info = {f.name: f for f in mi.type_info(Envelope).fields}
    return Envelope(
        version=PROTOCOL_VERSION,
        federation=draw(from_type(info["federation"].type)),
        round=draw(from_type(info["round"].type)),
        sender=draw(from_type(info["sender"].type)),
        recipient=draw(from_type(info["recipient"].type)),
        msg_id=draw(from_type(info["msg_id"].type)),
        body=draw(bodies),
        signature=draw(st.binary(max_size=64)),
    )


def encode(envelope: Envelope) -> bytes:
    return msgspec.msgpack.encode(envelope)
