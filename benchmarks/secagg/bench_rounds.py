"""(b) client and server time vs n and d, complete vs Harary; (c) n = 1000, d = 100k.

Whole SecAgg rounds in one process (protocol.secagg.simulate, real MessagePack encoding of
every message), 10 % of the clients crashing after ShareKeys (before MaskedInput, the costly
case: the server must rebuild their mask keys and remove their pairwise masks). Inputs are
generated before the clock starts. Reported per round:

  total_s / total_cpu_s   wall / CPU time of the whole round (clients + server + encoding)
  client_mean_cpu_s       mean over clients of the CPU time inside its state machine
  client_max_cpu_s        the slowest client
  server_cpu_s            CPU time inside the server's state machine
  wire_cpu_s              MessagePack encode + decode of every message (each broadcast once)

Per-party figures are CPU seconds (time.process_time): the machine is shared, and other
users' load would otherwise be charged to whichever party happened to be running.

Parameters come from protocol.secagg.params.find_parameters(n, dropout_fraction=0.1,
corrupt_fraction=0.1, malicious=...), corrupt_fraction 0.1 being the project default since
issue #11 (the envoys' policy); "large" adds the rows of the earlier defaults (0.05, and 0.0
for malicious) to price the stricter one; "complete" forces the complete graph. Every client
runs its own policy (protocol.secagg.policy) with the same fractions, so the checks an envoy
makes are in the cost.

Run: .venv/bin/python benchmarks/secagg/bench_rounds.py scaling
     .venv/bin/python benchmarks/secagg/bench_rounds.py large
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet, write

from protocol.secagg.params import find_parameters
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.simulate import node_names, simulate_round

DROPOUT = 0.1
CORRUPT = 0.1


def one_round(
    n: int, d: int, *, graph: str, malicious: bool, seed: int = 0, corrupt: float = CORRUPT
) -> dict:
    params = find_parameters(
        n,
        dropout_fraction=DROPOUT,
        corrupt_fraction=corrupt,
        malicious=malicious,
        graph="complete" if graph == "complete" else "auto",
    )
    gen = np.random.default_rng(seed)
    names = node_names(n)
    inputs = {u: gen.integers(0, 2**32, d, dtype=np.uint32) for u in names}
    drop = {u: "masked_input" for u in gen.choice(names, int(DROPOUT * n), replace=False)}
    t0, c0 = time.perf_counter(), time.process_time()
    sim = simulate_round(
        n=n,
        params=params,
        vector_length=d,
        inputs=inputs,
        dropouts=drop,
        record_view=False,
        clock=time.process_time,
        policy=ClientPolicy(
            corrupt_fraction=corrupt, dropout_fraction=DROPOUT, insecure_semi_honest=not malicious
        ),
    )
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = (not sim.aborted) and bool(np.array_equal(sim.result, sim.expected))
    per_client = list(sim.client_seconds.values())
    return {
        "n": n,
        "d": d,
        "graph": params.graph,
        "k": params.k,
        "t": params.t,
        "malicious": malicious,
        "corrupt_fraction": corrupt,
        "dropouts": len(drop),
        "correct": ok,
        "total_s": total,
        "total_cpu_s": total_cpu,
        "client_mean_cpu_s": float(np.mean(per_client)),
        "client_max_cpu_s": float(np.max(per_client)),
        "server_cpu_s": sim.server_seconds,
        "wire_cpu_s": sim.wire_seconds,
    }


def show(row: dict) -> None:
    print(
        f"n={row['n']:>5} d={row['d']:>8,} {row['graph']:>8} k={row['k']:>4} t={row['t']:>4} "
        f"{'mal ' if row['malicious'] else 'semi'}: total {row['total_s']:7.2f} s wall "
        f"{row['total_cpu_s']:7.2f} s cpu  client mean {row['client_mean_cpu_s'] * 1e3:8.1f} ms  "
        f"server {row['server_cpu_s']:6.2f} s  wire {row['wire_cpu_s']:5.2f} s  "
        f"{'OK' if row['correct'] else 'WRONG'}",
        flush=True,
    )


def scaling(args: argparse.Namespace) -> int:
    rows = []
    for d in (10_000, 100_000):
        for n in (10, 50, 100, 200):
            for graph in ("complete", "harary"):
                row = one_round(n, d, graph=graph, malicious=False)
                show(row)
                rows.append(row)
    path = write(args.out or "scaling", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")
    return 0 if all(r["correct"] for r in rows) else 1


def large(args: argparse.Namespace) -> int:
    rows = []
    # n = 1000: semi-honest and malicious with the default corrupt_fraction 0.1, then the
    # earlier settings (0.05, the benchmark's before issue #11; 0.0, the old project default)
    # to price the stricter default; n = 100 the same, malicious only.
    cases = [(1000, False, CORRUPT), (1000, True, CORRUPT), (1000, True, 0.05), (1000, True, 0.0)]
    cases += [(100, True, CORRUPT), (100, True, 0.05), (100, True, 0.0)]
    for n, malicious, corrupt in cases:
        row = one_round(n, 100_000, graph="harary", malicious=malicious, corrupt=corrupt)
        row["target_s"] = (60.0 if malicious else 20.0) if n == 1000 else None
        show(row)
        rows.append(row)
    path = write(args.out or "large", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")
    return 0 if all(r["correct"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["scaling", "large"])
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    quiet()
    return scaling(args) if args.what == "scaling" else large(args)


if __name__ == "__main__":
    raise SystemExit(main())
