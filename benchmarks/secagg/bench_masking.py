"""(a) The masking bound: client masking time vs the bare AES-256-CTR keystream, same bytes.

A client with k neighbours expands k + 1 masks (its self mask and one per neighbour) of d
uint32 each: (k + 1) * 4d keystream bytes. The bound (docs/architecture.md, "Targets"): masking <= 1.5 x the time
of producing that keystream bare, i.e. `encryptor.update_into` into one reused ~1 MiB
buffer, no arithmetic. Measured side by side, interleaved; the ratio is the median over R repetitions of
(time / bare time of the same repetition):

  bare      (k + 1) AES-256-CTR keystreams of 4d bytes into a reused 1 MiB buffer
  apply     crypto.prg.MaskAccumulator(initial=x).apply(add=..., subtract=...): the masks
            added to / subtracted from the input, what the bound is about
  step      SecAggClient's whole MaskedInput step: k X25519 agreements + HKDF, the masks,
            and packing the result as a wire Tensor (includes the per-neighbour constant cost)

Run: .venv/bin/python benchmarks/secagg/bench_masking.py [--reps 11]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, quiet, write

from crypto.prg import MaskAccumulator
from protocol.events import BROADCAST
from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import SecAggParams
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.server import SecAggServer
from protocol.secagg.simulate import SERVER, node_names
from protocol.stages import Stage

BUF = 1 << 20


def bare_keystream(seeds: list[bytes], nbytes: int, buf: bytearray, zeros: memoryview) -> None:
    for seed in seeds:
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        left = nbytes
        while left > 0:
            n = min(BUF, left)
            enc.update_into(zeros[:n], buf)
            left -= n


def client_at_masked_input(k: int, d: int) -> SecAggClient:
    """Client envoy-1 of a complete graph on k + 1 nodes, shares received, input not yet set."""
    names = node_names(k + 1)
    params = SecAggParams(graph="complete", k=k, t=k // 2 + 1, clip=1.0, malicious=False)
    server = SecAggServer(1, params, names, d)
    # The masking cost does not depend on the policy: any semi-honest threshold will do.
    policy = ClientPolicy(insecure_semi_honest=True, insecure_any_threshold=True)
    clients = {u: SecAggClient(u, 1, params, names, server_id=SERVER, policy=policy) for u in names}
    replies = []
    for u, c in clients.items():
        for out in c.start():
            replies += server.receive(u, out.body)
    outs = []
    for r in replies:
        for u in names:
            outs += [(u, o) for o in clients[u].receive(SERVER, r.body)]
    replies = []
    for u, o in outs:
        replies += server.receive(u, o.body)
    for r in replies:
        targets = names if r.recipient == BROADCAST else [r.recipient]
        if "envoy-1" in targets:
            clients["envoy-1"].receive(SERVER, r.body)
    c = clients["envoy-1"]
    assert c.stage == Stage.MASKED_INPUT and len(c._partners) == k
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default="masking")
    args = ap.parse_args(argv)
    quiet()
    buf = bytearray(BUF + 16)
    zeros = memoryview(bytes(BUF))
    rows = []
    for d, k in [(100_000, 10), (100_000, 36), (1_000_000, 10), (1_000_000, 36), (1_000_000, 78)]:
        client = client_at_masked_input(k, d)
        x = np.random.default_rng(0).integers(0, 2**32, d, dtype=np.uint32)
        seeds = [os.urandom(32) for _ in range(k + 1)]
        times: dict[str, list[float]] = {"bare": [], "apply": [], "step": []}
        for _ in range(args.reps):
            t0 = time.perf_counter()
            bare_keystream(seeds, 4 * d, buf, zeros)
            times["bare"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            acc = MaskAccumulator(d, initial=x)
            acc.apply(add=seeds[: k // 2 + 1], subtract=seeds[k // 2 + 1 :])
            times["apply"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client._masked_input(x)  # the masking step alone: it leaves the client's state as is
            times["step"].append(time.perf_counter() - t0)
        row = {
            "d": d,
            "k": k,
            "keystream_bytes": (k + 1) * 4 * d,
            "bare_s": median(times["bare"]),
            "apply_s": median(times["apply"]),
            "step_s": median(times["step"]),
            "all": times,
        }
        # Ratios per repetition (neighbouring runs share the machine's load), then the median:
        # more robust on a shared machine than a ratio of medians.
        row["apply_over_bare"] = median(
            [a / b for a, b in zip(times["apply"], times["bare"], strict=True)]
        )
        row["step_over_bare"] = median(
            [a / b for a, b in zip(times["step"], times["bare"], strict=True)]
        )
        row["apply_over_bare_min"] = min(times["apply"]) / min(times["bare"])
        row["bare_GBps"] = row["keystream_bytes"] / row["bare_s"] / 1e9
        rows.append(row)
        print(
            f"d={d:>9,} k={k:>3}: bare {row['bare_s'] * 1e3:8.2f} ms ({row['bare_GBps']:.2f} GB/s)  "
            f"apply {row['apply_s'] * 1e3:8.2f} ms (x{row['apply_over_bare']:.2f})  "
            f"step {row['step_s'] * 1e3:8.2f} ms (x{row['step_over_bare']:.2f})",
            flush=True,
        )
    path = write(args.out, {"machine": machine(), "reps": args.reps, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
