"""MqttBus vs bare aiomqtt through the same real Mosquitto, side by side in one run.

    .venv/bin/python benchmarks/deploy/mqtt_bus.py [--out benchmarks/deploy/results/mqtt_bus.json]

One publisher, one subscriber, QoS 1, frames of 64 KiB and 4 MiB, on loopback. The bare
client is the floor of what MQTT costs here; the difference is MqttBus's own work (ACL check,
size checks, SHA-256 dedupe, dispatch to subscriptions). Each case runs `repeats` times,
alternating, and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker.client.credentials import Credentials
from broker.client.mqtt_bus import MqttBus
from broker.server.mosquitto_process import start_on_loopback
from broker.topics import Topics

FED = "bench"
MAX = 64 * 1024 * 1024


async def bare(url_port: int, passwords: dict[str, str], frame: bytes, count: int) -> float:
    topic = Topics(FED).director
    sub = aiomqtt.Client(
        "127.0.0.1", url_port, username="director", password=passwords["director"],
        identifier="director", protocol=aiomqtt.ProtocolVersion.V5,
    )  # fmt: skip
    pub = aiomqtt.Client(
        "127.0.0.1", url_port, username="e1", password=passwords["e1"],
        identifier="e1", protocol=aiomqtt.ProtocolVersion.V5,
    )  # fmt: skip
    async with sub, pub:
        await sub.subscribe(topic, qos=1)
        start = time.perf_counter()

        async def receive() -> None:
            got = 0
            async for _ in sub.messages:
                got += 1
                if got == count:
                    return

        receiving = asyncio.ensure_future(receive())
        for _ in range(count):
            await pub.publish(topic, frame, qos=1)
        await receiving
        return time.perf_counter() - start


async def ours(url: str, passwords: dict[str, str], frame: bytes, count: int) -> float:
    topic = Topics(FED).director
    director = await MqttBus(
        url, node_id="director", role="director",
        credentials=Credentials(username="director", password=passwords["director"]),
        max_frame_bytes=MAX,
    ).start()  # fmt: skip
    e1 = await MqttBus(
        url, node_id="e1", role="envoy",
        credentials=Credentials(username="e1", password=passwords["e1"]),
        max_frame_bytes=MAX,
    ).start()  # fmt: skip
    try:
        inbox = director.subscribe(topic)
        await inbox.ready()
        # Distinct frames, as fedbus envelopes always are (a random message id), built
        # before the clock starts.
        frames = [i.to_bytes(8, "big") + frame[8:] for i in range(count)]
        start = time.perf_counter()

        async def receive() -> None:
            for _ in range(count):
                await anext(inbox)

        receiving = asyncio.ensure_future(receive())
        for distinct in frames:
            await e1.publish(topic, distinct)
        await receiving
        return time.perf_counter() - start
    finally:
        await e1.close()
        await director.close()


async def main_async(out: Path, repeats: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    proc = start_on_loopback(
        work, {"director": "director", "e1": "envoy"}, federation=FED, max_frame_bytes=MAX
    )
    results = []
    try:
        for size, count in ((64 * 1024, 400), (4 * 1024 * 1024, 40)):
            frame = os.urandom(size)
            times: dict[str, list[float]] = {"aiomqtt": [], "MqttBus": []}
            for _ in range(repeats):
                times["aiomqtt"].append(await bare(proc.port, proc.passwords, frame, count))
                times["MqttBus"].append(await ours(proc.url, proc.passwords, frame, count))
            row = {"frame_bytes": size, "frames": count}
            for name, values in times.items():
                median = statistics.median(values)
                row[name] = {
                    "median_s": round(median, 4),
                    "all_s": [round(v, 4) for v in values],
                    "GB_per_s": round(size * count / median / 1e9, 3),
                    "frames_per_s": round(count / median, 1),
                }
            row["MqttBus_over_aiomqtt"] = round(
                row["MqttBus"]["median_s"] / row["aiomqtt"]["median_s"], 3
            )
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.stop()
    report = {
        "benchmark": "MqttBus vs bare aiomqtt, QoS 1, one publisher -> Mosquitto -> one subscriber, loopback",
        "command": "python benchmarks/deploy/mqtt_bus.py",
        "mosquitto": proc.log_tail(200).split("mosquitto version ")[1].split()[0]
        if "mosquitto version" in proc.log_tail(200)
        else "?",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        # The build machine is shared: a high load makes every number here noisier.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "repeats": repeats,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mqtt_bus.json")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    asyncio.run(main_async(args.out, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
