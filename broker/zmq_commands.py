"""The command language of the ZeroMQ bus, spoken by ZmqBus (DEALER) and ZmqBroker (ROUTER).

Every ZeroMQ message is multipart: a short command frame, then arguments. Payloads travel
as their own frame so the broker forwards them without copying or parsing.

client -> broker
    HELLO   node_id role will_topic will_flags will_payload   (re)start a session
    PUB     topic flags payload                              flags: RETAIN bit
    SUB     req_id filter
    UNSUB   req_id filter
    PING                                                     application heartbeat
    BYE                                                      clean leave: no last will
broker -> client
    WELCOME node_id role heartbeat_ms max_frame_bytes
    MSG     topic payload [req_id]     req_id only on retained frames for one new subscription
    SUBACK  req_id status reason       status b"ok" or b"err"
    PONG
    RESYNC                             "I do not know your session": send HELLO and SUBs again
    ERR     operation topic reason     a refused publish, will or unknown command
"""

from __future__ import annotations

HELLO = b"HELLO"
PUB = b"PUB"
SUB = b"SUB"
UNSUB = b"UNSUB"
PING = b"PING"
BYE = b"BYE"

WELCOME = b"WELCOME"
MSG = b"MSG"
SUBACK = b"SUBACK"
PONG = b"PONG"
RESYNC = b"RESYNC"
ERR = b"ERR"

OK = b"ok"
REFUSED = b"err"

FLAG_RETAIN = 0x01
NO_FLAGS = b"\x00"
RETAIN_FLAGS = b"\x01"

ZAP_DOMAIN = b"fedbus"
