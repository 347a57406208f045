"""One broker hop for large frames: ZmqBroker vs libzmq's own C proxy, side by side.

    .venv/bin/python benchmarks/broker/bench_hop.py [--mib 4] [--frames 200] [--repeats 3]

Topologies (producer and consumer live in this process; every hop runs in its own process,
so the Python broker never shares a GIL with the load generator):

  direct      producer DEALER ------------------------------> consumer DEALER
  c_proxy     producer PUSH --> [PULL zmq.proxy PUSH] --------> consumer PULL
  zmq_broker  producer DEALER --> [ROUTER ZmqBroker ROUTER] --> consumer DEALER (PUB/MSG wire)
  bus_e2e     ZmqBus.publish --> [ZmqBroker] --> ZmqBus.subscribe   (asyncio clients, for scale)

Each one runs with plain TCP and again with CurveZMQ encryption on every link. A window of
at most 8 frames in flight (credits returned over an inproc pipe) keeps every topology in
the same flow regime and bounds memory. The measurements are interleaved per repeat and
the median is reported; results go to benchmarks/broker/results/hop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker import zmq_commands as commands  # noqa: E402
from broker.files import PUBLIC_MODE, atomic_write_text  # noqa: E402
from broker.keys import generate_curve_keypair  # noqa: E402
from broker.topics import Topics  # noqa: E402

WINDOW = 8
FED = "bench"
TOPICS = Topics(FED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curve_server(sock: zmq.Socket, keys: dict[str, Any] | None) -> None:
    if keys:
        sock.curve_server = True
        sock.curve_secretkey = keys["server"].secret.encode()


def curve_client(sock: zmq.Socket, keys: dict[str, Any] | None, who: str) -> None:
    if keys:
        sock.curve_secretkey = keys[who].secret.encode()
        sock.curve_publickey = keys[who].public.encode()
        sock.curve_serverkey = keys["server"].public.encode()


# -- hop processes -----------------------------------------------------------------------


def run_c_proxy(front: int, back: int, keys: dict[str, Any] | None, ready: Any) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock, port in ((pull, front), (push, back)):
        curve_server(sock, keys)
        sock.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    with contextlib.suppress(zmq.ContextTerminated):
        zmq.proxy(pull, push)


def _zmq_broker_class(root: str | None) -> Any:
    """ZmqBroker from this tree, or from another checkout at `root` (an A/B against it)."""
    if root is not None:
        # This child imported this tree's packages with the script: forget them, then load
        # the other checkout's under the same names.
        for name in list(sys.modules):
            if name.split(".")[0] in ("broker", "protocol", "crypto"):
                del sys.modules[name]
        sys.path.insert(0, root)
    try:
        from broker.server.zmq_broker import ZmqBroker
    except ImportError:  # the layout before broker/ was split into client/ and server/
        from broker.zmq_broker import ZmqBroker  # type: ignore[no-redef]
    return ZmqBroker


def run_broker(port: int, keys: dict[str, Any] | None, ready: Any, root: str | None = None) -> None:
    import logging

    import structlog

    ZmqBroker = _zmq_broker_class(root)

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    allow = None
    if keys:
        allow = {
            keys["producer"].public: ("envoy-1", "envoy"),
            keys["consumer"].public: ("director", "director"),
        }
    broker = ZmqBroker(
        f"tcp://127.0.0.1:{port}",
        federation=FED,
        allow=allow,
        secret_key=keys["server"].secret if keys else None,
        insecure_no_auth=keys is None,
        max_frame_bytes=256 << 20,
    )
    broker.start()
    ready.set()
    broker.join()


def start(target: Any, *args: Any, **kwargs: Any) -> mp.Process:
    ready = mp.Event()
    proc = mp.Process(target=target, args=(*args, ready), kwargs=kwargs, daemon=True)
    proc.start()
    ready.wait()
    return proc


# -- load generation ---------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (Linux /proc): CPU the hop itself burnt, whatever else runs."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LAST_HOP_CPU: list[float] = []


def pump(
    ctx: zmq.Context,
    make_tx: Any,
    make_rx: Any,
    send: Any,
    recv: Any,
    payload: bytes,
    frames: int,
    hop_pid: int | None = None,
) -> float:
    """Send `frames` payloads with at most WINDOW in flight; return seconds for the run.

    The CPU time the hop process spent during the timed part goes to LAST_HOP_CPU."""
    credits_ep = f"inproc://credits-{time.monotonic_ns()}"
    credit_rx = ctx.socket(zmq.PULL)
    credit_rx.bind(credits_ep)
    tx, rx = make_tx(), make_rx()
    done = threading.Event()
    span: list[float] = []

    def consume() -> None:
        credit_tx = ctx.socket(zmq.PUSH)
        credit_tx.connect(credits_ep)
        # Warm-up frame, not timed: the connection and any subscription are up after it.
        recv(rx)
        credit_tx.send(b"")
        cpu0 = cpu_seconds(hop_pid)
        t0 = time.perf_counter()
        for _ in range(frames):
            recv(rx)
            credit_tx.send(b"")
        span.append(time.perf_counter() - t0)
        LAST_HOP_CPU[:] = [cpu_seconds(hop_pid) - cpu0]
        credit_tx.close(0)
        done.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    frame = zmq.Frame(payload)
    # Warm-up: resend until the first frame comes through (subscriptions may lag).
    while True:
        send(tx, frame)
        if credit_rx.poll(200):
            credit_rx.recv()
            break
    in_flight = 0
    for _ in range(frames):
        while in_flight >= WINDOW:
            credit_rx.recv()
            in_flight -= 1
        send(tx, frame)
        in_flight += 1
    done.wait()
    consumer.join()
    for s in (tx, rx, credit_rx):
        s.close(0)
    return span[0]


def bench_direct(payload: bytes, frames: int, keys: dict[str, Any] | None) -> float:
    ctx = zmq.Context()
    port = free_port()

    def make_rx() -> zmq.Socket:
        s = ctx.socket(zmq.PULL)
        curve_server(s, keys)
        s.bind(f"tcp://127.0.0.1:{port}")
        return s

    def make_tx() -> zmq.Socket:
        s = ctx.socket(zmq.PUSH)
        curve_client(s, keys, "producer")
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    try:
        return pump(
            ctx,
            make_tx,
            make_rx,
            lambda s, f: s.send(f, copy=False),
            lambda s: s.recv(copy=False),
            payload,
            frames,
        )
    finally:
        ctx.term()


def bench_c_proxy(payload: bytes, frames: int, keys: dict[str, Any] | None) -> float:
    front, back = free_port(), free_port()
    proc = start(run_c_proxy, front, back, keys)
    ctx = zmq.Context()

    def make_tx() -> zmq.Socket:
        s = ctx.socket(zmq.PUSH)
        curve_client(s, keys, "producer")
        s.connect(f"tcp://127.0.0.1:{front}")
        return s

    def make_rx() -> zmq.Socket:
        s = ctx.socket(zmq.PULL)
        curve_client(s, keys, "consumer")
        s.connect(f"tcp://127.0.0.1:{back}")
        return s

    try:
        return pump(
            ctx,
            make_tx,
            make_rx,
            lambda s, f: s.send(f, copy=False),
            lambda s: s.recv(copy=False),
            payload,
            frames,
            proc.pid,
        )
    finally:
        ctx.term()
        proc.terminate()
        proc.join()


BASELINE_ROOT: list[str] = []  # --baseline: another checkout's ZmqBroker, run side by side


def bench_broker(
    payload: bytes, frames: int, keys: dict[str, Any] | None, root: str | None = None
) -> float:
    port = free_port()
    proc = start(run_broker, port, keys, root=root)
    ctx = zmq.Context()
    topic = TOPICS.director.encode()

    def make_tx() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        curve_client(s, keys, "producer")
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send_multipart([commands.HELLO, b"envoy-1", b"envoy", b"", commands.NO_FLAGS, b""])
        return s

    def make_rx() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        curve_client(s, keys, "consumer")
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send_multipart([commands.HELLO, b"director", b"director", b"", commands.NO_FLAGS, b""])
        s.send_multipart([commands.SUB, b"1", topic])
        return s

    def send(s: zmq.Socket, f: zmq.Frame) -> None:
        s.send_multipart([commands.PUB, topic, commands.NO_FLAGS, f], copy=False)

    def recv(s: zmq.Socket) -> None:
        while True:
            parts = s.recv_multipart(copy=False)
            if parts[0].bytes == commands.MSG:
                return

    try:
        return pump(ctx, make_tx, make_rx, send, recv, payload, frames, proc.pid)
    finally:
        ctx.term()
        proc.terminate()
        proc.join()


def bench_bus_e2e(payload: bytes, frames: int, keys: dict[str, Any] | None) -> float:
    """The same hop through the real asyncio clients, with the same credit window."""
    from broker.client.connect import connect
    from broker.client.credentials import Credentials

    port = free_port()
    proc = start(run_broker, port, keys)

    def creds(who: str) -> Credentials | None:
        if not keys:
            return None
        return Credentials.for_curve(
            secret_key=keys[who].secret, broker_public_key=keys["server"].public
        )

    async def main() -> float:
        url = f"zmq+tcp://127.0.0.1:{port}"
        kw = {"insecure_no_auth": keys is None, "max_frame_bytes": 256 << 20}
        prod = await connect(
            url, node_id="envoy-1", role="envoy", credentials=creds("producer"), **kw
        )
        cons = await connect(
            url, node_id="director", role="director", credentials=creds("consumer"), **kw
        )
        sub = cons.subscribe(TOPICS.director)
        await sub.ready()
        credits = asyncio.Semaphore(WINDOW)
        got = asyncio.Event()
        count = 0

        async def consume() -> None:
            nonlocal count
            async for _ in sub:
                count += 1
                credits.release()
                if count == frames + 1:
                    got.set()
                    return

        task = asyncio.create_task(consume())
        await credits.acquire()
        await prod.publish(TOPICS.director, payload)
        while count < 1:
            await asyncio.sleep(0.001)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        for _ in range(frames):
            await credits.acquire()
            await prod.publish(TOPICS.director, payload)
        await got.wait()
        elapsed = time.perf_counter() - t0
        LAST_HOP_CPU[:] = [cpu_seconds(proc.pid) - cpu0]
        await task
        await prod.close()
        await cons.close()
        return elapsed

    try:
        return asyncio.run(main())
    finally:
        proc.terminate()
        proc.join()


def bench_baseline_broker(payload: bytes, frames: int, keys: dict[str, Any] | None) -> float:
    return bench_broker(payload, frames, keys, root=BASELINE_ROOT[0])


BENCHES: dict[str, Any] = {
    "direct": bench_direct,
    "c_proxy": bench_c_proxy,
    "zmq_broker": bench_broker,
    "bus_e2e": bench_bus_e2e,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=float, default=4.0, help="frame size in MiB")
    parser.add_argument("--frames", type=int, default=200, help="timed frames per run")
    parser.add_argument("--curve-frames", type=int, default=40, help="timed frames, CURVE runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "broker" / "results" / "hop.json"
    )
    parser.add_argument("--modes", default="plain,curve")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. main): its ZmqBroker runs as `zmq_broker_baseline`, "
        "interleaved with this tree's",
    )
    args = parser.parse_args(argv)
    if args.baseline is not None:
        BASELINE_ROOT[:] = [str(args.baseline.resolve())]
        BENCHES["zmq_broker_baseline"] = bench_baseline_broker

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load_before = os.getloadavg()
    payload = os.urandom(int(args.mib * (1 << 20)))
    keys = {name: generate_curve_keypair() for name in ("server", "producer", "consumer")}
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        mode_keys = keys if mode == "curve" else None
        runs: dict[str, list[float]] = {name: [] for name in BENCHES}
        cpu: dict[str, list[float]] = {name: [] for name in BENCHES if name != "direct"}
        frames = args.frames if mode == "plain" else args.curve_frames
        gb = len(payload) * frames / 1e9
        for rep in range(args.repeats):
            # Alternate the order so slow drift of the machine's load hits both sides alike.
            order = list(BENCHES) if rep % 2 == 0 else list(reversed(BENCHES))
            for name in order:
                LAST_HOP_CPU[:] = []
                seconds = BENCHES[name](payload, frames, mode_keys)
                gbps = gb / seconds
                runs[name].append(gbps)
                line = f"{mode:5s} rep {rep} {name:10s} {gbps:6.3f} GB/s"
                if name in cpu and LAST_HOP_CPU:
                    cpu[name].append(LAST_HOP_CPU[0] / gb)
                    line += f"  hop CPU {cpu[name][-1]:.3f} s/GB"
                print(line, flush=True)
        med = {name: statistics.median(v) for name, v in runs.items()}
        results[mode] = {
            "frames_per_run": frames,
            "gb_per_s_median": med,
            "gb_per_s_runs": runs,
            "hop_cpu_s_per_gb_median": {k: statistics.median(v) for k, v in cpu.items() if v},
            "hop_cpu_s_per_gb_runs": cpu,
            "broker_vs_c_proxy": med["zmq_broker"] / med["c_proxy"],
            "bus_e2e_vs_c_proxy": med["bus_e2e"] / med["c_proxy"],
        }
        if "zmq_broker_baseline" in med:
            results[mode]["broker_vs_baseline"] = med["zmq_broker"] / med["zmq_broker_baseline"]
    report = {
        "benchmark": "broker hop, one publisher -> one subscriber",
        "frame_bytes": len(payload),
        "repeats": args.repeats,
        "window_frames": WINDOW,
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            # Other work on the machine skews every figure; record how busy it was.
            "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "command": "python benchmarks/broker/bench_hop.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    if BASELINE_ROOT:
        report["baseline"] = BASELINE_ROOT[0]
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n", mode=PUBLIC_MODE)
    print()
    print(
        "| mode | direct | C proxy hop | ZmqBroker hop | broker / C proxy "
        "| ZmqBus end to end | hop CPU s/GB: C proxy / ZmqBroker |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        m = r["gb_per_s_median"]
        c = r["hop_cpu_s_per_gb_median"]
        print(
            f"| {mode} | {m['direct']:.2f} GB/s | {m['c_proxy']:.2f} GB/s | {m['zmq_broker']:.2f} GB/s "
            f"| {r['broker_vs_c_proxy']:.2f}x | {m['bus_e2e']:.2f} GB/s "
            f"| {c.get('c_proxy', float('nan')):.3f} / {c.get('zmq_broker', float('nan')):.3f} |"
        )
        if "broker_vs_baseline" in r:
            print(
                f"{mode}: ZmqBroker vs baseline {r['broker_vs_baseline']:.2f}x throughput, hop CPU "
                f"{c.get('zmq_broker', float('nan')):.3f} vs "
                f"{c.get('zmq_broker_baseline', float('nan')):.3f} s/GB"
            )
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    sys.exit(main())
