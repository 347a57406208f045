"""One call that turns a bus URL into a connected `Bus`: the scheme picks the transport."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from broker.client.bus import Bus, Will
from broker.client.credentials import Credentials
from broker.client.subscription import DEFAULT_MAX_QUEUED_BYTES
from protocol.codec import DEFAULT_MAX_FRAME_BYTES


def zmq_endpoint(url: str) -> str:
    """zmq+tcp://host:port -> tcp://host:port, with a clear error for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "zmq+tcp":
        raise ValueError(f"bus url {url!r}: expected zmq+tcp://host:port")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"bus url {url!r}: needs a host and a port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bus url {url!r}: unexpected path or query")
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"tcp://{host}:{parts.port}"


async def connect(
    url: str,
    *,
    node_id: str,
    role: str,
    credentials: Credentials | None,
    will: Will | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    insecure_no_auth: bool = False,
    timeout_s: float = 30.0,
    heartbeat_ivl_s: float = 1.0,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    zmq_context: Any = None,
) -> Bus:
    """Connect `node_id` (a "director" or "envoy") to the bus at `url`.

    `zmq+tcp://` goes to the embedded ZeroMQ broker; `mqtt://` and `mqtts://` to an MQTT
    broker such as Mosquitto. Raises BusError when the broker refuses us or does not answer
    within `timeout_s`, ValueError for a malformed URL or arguments. Each subscription
    queues at most `max_queued_bytes` unread frames (broker.client.subscription).
    `zmq_context`: a zmq.asyncio.Context for zmq+tcp:// buses to share (ZmqBus).
    """
    scheme = urlsplit(url).scheme
    if scheme == "zmq+tcp":
        from broker.client.zmq_bus import ZmqBus

        bus = ZmqBus(
            zmq_endpoint(url),
            node_id=node_id,
            role=role,
            credentials=credentials,
            will=will,
            max_frame_bytes=max_frame_bytes,
            insecure_no_auth=insecure_no_auth,
            heartbeat_ivl_s=heartbeat_ivl_s,
            max_queued_bytes=max_queued_bytes,
            context=zmq_context,
        )
        return await bus.start(timeout_s=timeout_s)
    if scheme in ("mqtt", "mqtts"):
        from broker.client.mqtt_bus import MqttBus

        mqtt_bus = MqttBus(
            url,
            node_id=node_id,
            role=role,
            credentials=credentials,
            will=will,
            max_frame_bytes=max_frame_bytes,
            insecure_no_auth=insecure_no_auth,
            max_queued_bytes=max_queued_bytes,
        )
        return await mqtt_bus.start(timeout_s=timeout_s)
    raise ValueError(f"bus url {url!r}: unknown scheme {scheme!r} (zmq+tcp, mqtt or mqtts)")
