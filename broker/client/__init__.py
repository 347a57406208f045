"""The client side of the bus: what a node needs to talk to a broker.

`connect(url, ...)` picks the transport from the URL (`zmq+tcp://` -> `ZmqBus`, `mqtt://` and
`mqtts://` -> `MqttBus`) and returns a started `Bus`; `Credentials` carry what the node proves
itself with. Everything a node imports from the bus comes from here.
"""

from broker.client.bus import Bus, BusError, Will
from broker.client.connect import connect
from broker.client.credentials import Credentials
from broker.client.subscription import Subscription

__all__ = ["Bus", "BusError", "Credentials", "Subscription", "Will", "connect"]
