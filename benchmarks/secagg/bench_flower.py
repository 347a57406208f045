"""(d) fedbus SecAgg+ vs Flower's SecAgg+ (flwr 1.42), same machine, same run, interleaved.

Setting (the brief's): n = 100 clients, d = 1,000,000 float32 parameters, 10 clients crash
after ShareKeys, Flower num_shares = 11 / reconstruction_threshold = 6. Flower's num_shares
counts the client itself (a ring of 5 neighbours each side + self), so the same graph here is
the Harary graph with k = 10 neighbours and t = 6: both sides expand 11 masks per client and
share secrets 6-out-of-11.

What is timed, both sides in-process, no network:
* fedbus: protocol.secagg.simulate (real MessagePack encoding of every message), plus the
  envoy-side quantisation (crypto.quantize, float32 -> Z_2^32) and the director-side
  dequantisation, because Flower's client mod and server workflow do theirs inside.
* Flower: its unmodified SecAggPlusWorkflow (server) with an in-memory Grid that hands each
  message, through Flower's protobuf serialisation, to its unmodified secaggplus_mod (client);
  see flower_driver.py. It runs under /work/flwr-venv/bin/python (flwr is not a dependency
  of this project: nothing here imports it).

Per-party times are CPU seconds (time.process_time) so that other users of the shared
machine do not pollute the split; the totals are given as wall and CPU seconds. Each
implementation runs --reps times, alternating, and the median is reported.

Flower's (11 shares, threshold 6) is weaker than an envoy's default policy accepts at
n = 100 (2t n <= (k + 1)(n + C) with C = 10): those rows run the clients with a policy that
lets any threshold through, to compare the same protocol work. "fedbus-default" runs what a
default federation does at n = 100 (find_parameters with dropout 0.1 and the default corrupt
fraction 0.1, malicious mode, default client policy): the cost of the stricter parameters.

Without /work/flwr-venv, `--flower-results results/flower.json` takes Flower's figures from
an earlier run on this machine instead of running it (the output says so).

Run: .venv/bin/python benchmarks/secagg/bench_flower.py [--reps 2] [--flower-results PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet, write

from crypto.quantize import QuantizationRange, dequantize_sum, quantize
from protocol.secagg.messages import SecAggParams
from protocol.secagg.params import find_parameters
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.simulate import node_names, simulate_round

HERE = Path(__file__).resolve().parent
FLOWER_PYTHON = "/work/flwr-venv/bin/python"


# Flower's parameters, on the same protocol work (see the module docstring).
FLOWER_POLICY = ClientPolicy(insecure_semi_honest=True, insecure_any_threshold=True)


def fedbus_round(
    n: int, d: int, params: SecAggParams, *, impl: str, seed: int, policy: ClientPolicy
) -> dict:
    gen = np.random.default_rng(seed)
    names = node_names(n)
    updates = {u: gen.uniform(-1, 1, d).astype(np.float32) for u in names}
    drop = {u: "masked_input" for u in gen.choice(names, int(0.1 * n), replace=False)}
    k, t = params.k, params.t
    qrange = QuantizationRange(clip=8.0, max_summands=n)
    w0, c0 = time.perf_counter(), time.process_time()
    quant_cpu: dict[str, float] = {}
    inputs = {}
    for u in names:
        q0 = time.process_time()
        inputs[u] = quantize(updates[u], qrange, rng=np.random.default_rng(gen.integers(2**63)))
        quant_cpu[u] = time.process_time() - q0
    sim = simulate_round(
        n=n,
        params=params,
        vector_length=d,
        inputs=inputs,
        dropouts=drop,
        record_view=False,
        clock=time.process_time,
        policy=policy,
    )
    q0 = time.process_time()
    mean = dequantize_sum(sim.result, qrange, len(sim.survivors)) / len(sim.survivors)
    dequant_cpu = time.process_time() - q0
    total, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    want = np.mean([updates[u] for u in sim.survivors], axis=0)
    err = float(np.max(np.abs(mean - want)))
    survivors = sorted(sim.survivors)
    client = [sim.client_seconds[u] + quant_cpu[u] for u in survivors]
    return {
        "impl": impl,
        "n": n,
        "d": d,
        "k": k,
        "t": t,
        "dropouts": len(drop),
        "total_s": total,
        "total_cpu_s": total_cpu,
        "client_mean_cpu_s": float(np.mean(client)),
        "client_max_cpu_s": float(np.max(client)),
        "server_cpu_s": sim.server_seconds + dequant_cpu,
        "wire_cpu_s": sim.wire_seconds,
        "max_abs_error": err,
        "correct": (not sim.aborted) and err < 1e-3,
    }


def flower_round(n: int, d: int, shares: int, threshold: int, seed: int) -> dict:
    out = subprocess.run(
        [
            FLOWER_PYTHON,
            str(HERE / "flower_driver.py"),
            f"--n={n}",
            f"--d={d}",
            f"--num-shares={shares}",
            f"--threshold={threshold}",
            f"--seed={seed}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def show(r: dict) -> None:
    print(
        f"{r['impl']:>17}: total {r['total_s']:7.2f} s wall / {r['total_cpu_s']:7.2f} s cpu  "
        f"client mean {r['client_mean_cpu_s'] * 1e3:8.1f} ms  server {r['server_cpu_s']:6.2f} s  "
        f"wire {r['wire_cpu_s']:5.2f} s  err {r['max_abs_error']:.1e}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="flower")
    ap.add_argument(
        "--flower-results",
        type=Path,
        help="take Flower's runs from this earlier results file instead of running Flower",
    )
    args = ap.parse_args(argv)
    quiet()
    flower_params = {
        "fedbus": SecAggParams(graph="harary", k=10, t=6, clip=8.0, malicious=False),
        "fedbus-malicious": SecAggParams(graph="harary", k=10, t=6, clip=8.0, malicious=True),
    }
    default = find_parameters(args.n, dropout_fraction=0.1, corrupt_fraction=0.1, clip=8.0)
    runs: dict[str, list[dict]] = {
        "fedbus": [],
        "flower": [],
        "fedbus-malicious": [],
        "fedbus-default": [],
    }
    if args.flower_results is not None:
        earlier = json.loads(args.flower_results.read_text())
        runs["flower"] = earlier["runs"]["flower"]
        print(f"flower: {len(runs['flower'])} runs from {args.flower_results}, not run now")
    for rep in range(args.reps):
        for impl in runs:
            if impl == "flower":
                if args.flower_results is None:
                    r = flower_round(args.n, args.d, 11, 6, seed=rep)
                    show(r)
                    runs[impl].append(r)
                continue
            if impl == "fedbus-default":
                r = fedbus_round(
                    args.n, args.d, default, impl=impl, seed=rep, policy=ClientPolicy()
                )
            else:
                r = fedbus_round(
                    args.n, args.d, flower_params[impl], impl=impl, seed=rep, policy=FLOWER_POLICY
                )
            show(r)
            runs[impl].append(r)

    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[impl])

    summary: dict[str, dict[str, float]] = {}
    for key in ("total_s", "total_cpu_s", "client_mean_cpu_s", "server_cpu_s"):
        summary[key] = {impl: med(impl, key) for impl in runs}
        summary[key]["flower_over_fedbus"] = med("flower", key) / med("fedbus", key)
        summary[key]["flower_over_fedbus_default"] = med("flower", key) / med("fedbus-default", key)
    print(json.dumps(summary, indent=2))
    ok = all(r["correct"] for rs in runs.values() for r in rs)
    payload = {
        "machine": machine(),
        "runs": runs,
        "summary": summary,
        "default_parameters": {"k": default.k, "t": default.t, "malicious": default.malicious},
        "flower_from": str(args.flower_results) if args.flower_results else "run now",
    }
    path = write(args.out, payload)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
