"""The broker daemons: the embedded ZeroMQ broker (`fedbus broker`) and Mosquitto's files and
process. `core` is the ZeroMQ broker's session logic as a sans-IO state machine;
`zmq_broker` only moves bytes between its ROUTER socket and that machine."""
