"""MQTT packet sizes that the client and the Mosquitto config must agree on.

fedbus's frame limit (`protocol.codec.DEFAULT_MAX_FRAME_BYTES` or a config's max_frame_bytes)
bounds the payload; an MQTT packet adds its fixed header, the topic name (up to 65535 + 2
bytes), a packet id and v5 properties. The broker's packet limit and the client's announced
maximum both leave that much room, or a frame exactly at the limit would be accepted by the
codec and refused by the broker.
"""

from __future__ import annotations

__all__ = ["PACKET_OVERHEAD_BYTES", "publish_packet_size"]

PACKET_OVERHEAD_BYTES = 70 * 1024


def publish_packet_size(topic: str, payload: int) -> int:
    """An upper bound of the PUBLISH packet size (QoS 1, MQTT 5, no properties)."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload  # topic, packet id, properties
    return 1 + 4 + remaining  # fixed header + at most 4 bytes of remaining length
