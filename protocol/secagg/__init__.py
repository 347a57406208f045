"""Bonawitz et al. (2017) secure aggregation with the SecAgg+ graph of Bell et al. (2020).

Sans-IO state machines: `client.SecAggClient`, `server.SecAggServer` (messages in, messages
out, no sockets or clocks), `params.find_parameters`, `graph` (complete or random Harary), and
`simulate.simulate_round` to run a whole round in memory.
"""
