"""The root of every error the protocol package raises.

Callers that only need "this input was not acceptable to the protocol layer" catch
`ProtocolError`; the typed subclasses (codec, tensors, config documents, SecAgg parameters and
machines) say which rule was broken. Each subclass also derives from ValueError, because every
one of them is a value that failed validation.
"""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """Base class of the protocol package's errors."""
