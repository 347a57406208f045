"""The broker as a real process: config loading, no torch, and surviving a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker.client.bus import Will
from broker.client.connect import connect
from broker.client.zmq_bus import ZmqBus
from broker.keys import write_key_file
from broker.server.config import BrokerConfig
from broker.topics import Topics
from node.cli import main as fedbus
from node.errors import ExitCode
from protocol.configfile import ConfigError
from tests.broker.broker_testkit import FEDERATION, Keys, free_port

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, keys: Keys, port: int, **extra: str) -> Path:
    keydir = tmp / "keys"
    keydir.mkdir(exist_ok=True)
    write_key_file(keydir / "broker.key", keys.broker.secret, encoding="z85", secret=True)
    allow = []
    for node_id, kp in keys.nodes.items():
        (keydir / f"{node_id}.pub").write_text(kp.public + "\n")
        allow.append(
            f'[[allow]]\nnode_id = "{node_id}"\nrole = "{keys.roles[node_id]}"\n'
            f'public_key_file = "keys/{node_id}.pub"\n'
        )
    body = textwrap.dedent(
        f"""
        federation = "{FEDERATION}"
        bind = "tcp://127.0.0.1:{port}"
        secret_key_file = "keys/broker.key"
        max_frame_bytes = 8388608
        {"".join(f"{k} = {v}" for k, v in extra.items())}
        [heartbeat]
        interval_s = 0.2
        timeout_s = 2.0
        """
    )
    path = tmp / "broker.toml"
    path.write_text(body + "\n" + "\n".join(allow))
    return path


def start_daemon(config: Path, ready: Path) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "broker",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc


async def wait_ready(proc: subprocess.Popen[bytes], ready: Path) -> str:
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())  # type: ignore[union-attr]
        await asyncio.sleep(0.02)
    return ready.read_text().strip()


async def test_client_survives_broker_restart(tmp_path: Path, keys: Keys) -> None:
    topics = Topics(FEDERATION)
    config = write_config(tmp_path, keys, free_port())
    ready = tmp_path / "ready"
    first = start_daemon(config, ready)
    buses: list[ZmqBus] = []
    second = None
    try:
        url = await wait_ready(first, ready)
        # The daemon runs without torch: check the live process, not just an import.
        maps = Path(f"/proc/{first.pid}/maps").read_text()
        assert "torch" not in maps

        async def join(node: str, will: Will | None = None) -> ZmqBus:
            bus = await connect(
                url,
                node_id=node,
                role=keys.roles[node],
                credentials=keys.creds(node),
                will=will,
                heartbeat_ivl_s=0.1,
            )
            assert isinstance(bus, ZmqBus)
            buses.append(bus)
            return bus

        director = await join("director")
        envoy = await join("envoy-a", Will(topics.presence("envoy-a"), b"gone"))
        inbox = director.subscribe(topics.director)
        mailbox = envoy.subscribe(topics.envoy("envoy-a"))
        await inbox.ready()
        await mailbox.ready()
        await envoy.publish(topics.presence("envoy-a"), b"online", retain=True)
        await envoy.publish(topics.director, b"before")
        assert await anext(inbox) == b"before"

        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_daemon(config, ready)
        assert await wait_ready(second, ready) == url

        # Neither client is told anything: both must resync by themselves and keep working
        # in both directions. Publish until a frame gets through the new broker.
        seq = 0
        while True:
            seq += 1
            await envoy.publish(topics.director, b"after-%d" % seq)
            await asyncio.sleep(0.05)
            got = inbox.get_nowait()
            while got is not None and not got.startswith(b"after-"):
                got = inbox.get_nowait()
            if got is not None:
                break
        assert envoy.resyncs >= 1 and director.resyncs >= 1
        await director.publish(topics.envoy("envoy-a"), b"to-envoy")
        while (frame := await anext(mailbox)) != b"to-envoy":
            pass
        # The envoy republished its retained presence, so a newcomer still sees it.
        presence = director.subscribe(topics.presence_filter)
        assert await anext(presence) == b"online"
        # And the new broker holds the envoy's will again.
        await envoy.abort()
        while (frame := await anext(presence)) != b"gone":
            assert frame == b"online"
    finally:
        for bus in buses:
            await bus.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()


async def test_daemon_stops_cleanly_on_sigterm(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, 0)
    ready = tmp_path / "ready"
    proc = start_daemon(config, ready)
    url = await wait_ready(proc, ready)
    assert url.startswith("zmq+tcp://127.0.0.1:")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate()[0].decode()
    assert proc.returncode == 0, out
    assert "broker_stopped" in out


def test_config_loads_and_builds(tmp_path: Path, keys: Keys) -> None:
    cfg = BrokerConfig.load(write_config(tmp_path, keys, 5999))
    assert cfg.federation == FEDERATION
    assert cfg.bind == "tcp://127.0.0.1:5999"
    assert cfg.max_frame_bytes == 8388608
    assert cfg.heartbeat_timeout_s == 2.0
    assert {i.node_id for i in cfg.allow.values()} == set(keys.nodes)
    assert cfg.allow[keys.nodes["director"].public].role == "director"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.replace('federation = "fedtest"', 'federation = "a/b"'), "federation"),
        (
            lambda s: s.replace("max_frame_bytes = 8388608", "max_frame_bytes = -1"),
            "max_frame_bytes",
        ),
        (lambda s: s.replace("timeout_s = 2.0", "timeout_s = 0.1"), "heartbeat.timeout_s"),
        (lambda s: s.replace('role = "envoy"', 'role = "admin"', 1), "allow[1].role"),
        (
            lambda s: s.replace('secret_key_file = "keys/broker.key"', 'secret_key_file = "nope"'),
            "secret_key_file",
        ),
        (lambda s: s + "\nbogus = 1\n", "bogus"),
        (
            lambda s: s.replace('public_key_file = "keys/envoy-a.pub"', 'public_key = "short"'),
            "allow[1].public_key",
        ),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, keys: Keys, edit, field: str) -> None:
    path = write_config(tmp_path, keys, 5999)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as info:
        BrokerConfig.load(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)
    # `fedbus broker` turns the same error into exit status 3 (CONFIG) and a message.
    assert fedbus(["broker", "--config", str(path)]) == ExitCode.CONFIG == 3


def test_insecure_mode_prints_a_warning_and_needs_no_keys(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "broker",
            "--insecure-no-auth",
            "--bind",
            "tcp://127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    warning = next(e for e in events if e["event"] == "insecure_no_auth")
    assert warning["level"] == "warning" and warning["node"] == "broker"
    assert "--insecure-no-auth" in warning["warning"]
    # Every line the broker logs is a JSON event with its node bound.
    assert all(e["node"] == "broker" for e in events) and len(events) >= 2


def test_broker_and_daemon_help_load_no_torch() -> None:
    code = (
        "import sys\n"
        "import broker, protocol, crypto\n"
        "from broker import faults, keys\n"
        "from broker.client import bus, connect, zmq_bus\n"
        "from broker.server import config, core, daemon, zmq_broker\n"
        "try:\n"
        "    daemon.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'torchvision' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--insecure-no-auth" in result.stdout
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node.cli", "broker", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0
    assert "torch" not in result.stderr


def test_example_config_loads_once_keys_exist(tmp_path: Path) -> None:
    import shutil

    from broker.keys import generate_curve_keypair

    shutil.copy(ROOT / "configs" / "broker.toml", tmp_path / "broker.toml")
    (tmp_path / "keys").mkdir()
    write_key_file(
        tmp_path / "keys" / "broker.key",
        generate_curve_keypair().secret,
        encoding="z85",
        secret=True,
    )
    for node in ("director", "envoy-1", "envoy-2", "envoy-3"):
        (tmp_path / "keys" / f"{node}.pub").write_text(generate_curve_keypair().public + "\n")
    cfg = BrokerConfig.load(tmp_path / "broker.toml")
    assert cfg.federation == "demo" and len(cfg.allow) == 4
    assert sorted(i.role for i in cfg.allow.values()) == ["director", "envoy", "envoy", "envoy"]
    assert cfg.io_threads == 1
    # Without the key files the error names the file that is missing.
    (tmp_path / "keys" / "envoy-2.pub").unlink()
    with pytest.raises(ConfigError, match=r"allow\[2\]\.public_key_file"):
        BrokerConfig.load(tmp_path / "broker.toml")


def test_fedbus_broker_entry_point_loads_no_torch() -> None:
    # `fedbus broker` goes through node.cli: the CLI must hand over before importing torch.
    code = (
        "import sys\n"
        "from node.cli import main\n"
        "try:\n"
        "    rc = main(['broker', '--help'])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "assert rc in (0, None), rc\n"
        "assert 'torch' not in sys.modules, 'fedbus broker imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fedbus broker" in result.stdout
