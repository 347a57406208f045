"""The one place frames become envelopes: a size check, then a single validating decode."""

from __future__ import annotations

import msgspec

from protocol.errors import ProtocolError
from protocol.messages import PROTOCOL_VERSION, Envelope

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class CodecError(ProtocolError):
    """A frame that is not a valid fedbus envelope. The only error decoding ever raises."""


class Codec:
    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Envelope)

    def encode(self, envelope: Envelope) -> bytes:
        frame = self._encoder.encode(envelope)
        if len(frame) > self.max_frame_bytes:
            raise CodecError(
                f"encoded {envelope.type} frame is {len(frame)} bytes, over the limit of "
                f"{self.max_frame_bytes}"
            )
        return frame

    def decode(self, frame: bytes | bytearray | memoryview) -> Envelope:
        size = memoryview(frame).nbytes
        # Refuse before decoding: a huge frame must not cost memory or time to reject.
        if size > self.max_frame_bytes:
            raise CodecError(f"frame of {size} bytes is over the limit of {self.max_frame_bytes}")
        try:
            envelope = self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CodecError(f"invalid frame: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise CodecError(f"invalid frame: {type(exc).__name__}: {exc}") from None
        if envelope.version != PROTOCOL_VERSION:
            raise CodecError(
                f"protocol version {envelope.version} is not supported (this node speaks "
                f"{PROTOCOL_VERSION})"
            )
        return envelope

    def signing_payload(self, envelope: Envelope) -> bytes:
        """The bytes a signature covers: the whole envelope with an empty signature field."""
        return self._encoder.encode(msgspec.structs.replace(envelope, signature=b""))
