"""`fedbus demo`: a whole federation on this machine, each node its own OS process.

* `launcher`: the kits (made by `node.provision`, as for a real deployment) and the
  processes (broker, director, envoys): start, watch, kill, stop;
* `report`: after the run, the audit, the final test-split evaluation, report.json and plots;
* `cli`: the command line, the progress display and the exit status;
* `light`: the same kits and processes with light envoys (node.swarm) packed into a few
  processes, for fault-plan tests and the scale and soak benchmarks.
"""
