"""Bonawitz et al. (2017) secure aggregation with the SecAgg+ graph of Bell et al. (2020).

Sans-IO state machines: `client.SecAggClient`, `server.SecAggServer` (messages in, messages
out, no sockets or clocks), whose allowed steps are the tables of `transitions`;
`update` (the format of the vector an envoy masks, shared by envoy and director),
`params.find_parameters`, `graph` (complete or random Harary), `common` (what gets signed and
the HKDF/AEAD purpose strings), and `simulate.simulate_round` to run a whole round in memory.
"""
