"""The systemd units: valid for systemd, sandboxed (exposure <= 2.0), consistent with the kits."""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.cli import COMMANDS
from node.provision import main as provision
from tests.deploy.identities import public_keys_of

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "configs" / "systemd").glob("*.service"))
TORCH_UNITS = {"fedbus-director.service", "fedbus-envoy@.service"}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "Restart": "on-failure",
    "User": "fedbus",
}


def settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_units_exist() -> None:
    names = {u.name for u in UNITS}
    assert {
        "fedbus-broker.service",
        "fedbus-director.service",
        "fedbus-envoy@.service",
        "fedbus-mosquitto.service",
    } <= names


def _stubbed(unit: Path, tmp_path: Path) -> Path:
    """A copy whose binaries exist on this machine (verify checks ExecStart's path)."""
    text = unit.read_text()
    text = text.replace("/opt/fedbus/venv/bin/fedbus", "/bin/true")
    text = text.replace("/usr/sbin/mosquitto", "/bin/true")
    name = unit.name.replace("@.service", "@hospital-a.service")
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_passes(unit: Path, tmp_path: Path) -> None:
    stub = _stubbed(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(stub)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # verify only warns about unknown or misspelt settings: any message is a failure here.
    assert stub.name not in result.stderr, result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_is_at_most_two(unit: Path, tmp_path: Path) -> None:
    stub = _stubbed(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(stub)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_hardening_settings(unit: Path) -> None:
    found = settings(unit)
    for key, value in HARDENING.items():
        assert found.get(key) == [value], f"{unit.name}: {key}={found.get(key)}"
    assert found["SystemCallFilter"][0] == "@system-service"
    # MemoryDenyWriteExecute wherever torch does not run (see the test below for why not).
    mdwe = found.get("MemoryDenyWriteExecute") == ["yes"]
    assert mdwe == (unit.name not in TORCH_UNITS), unit.name


def test_units_run_what_provision_writes(tmp_path: Path) -> None:
    """Each ExecStart names a fedbus command and a config file that a kit provides."""
    out = tmp_path / "kits"
    assert (
        provision(
            [
                "--federation",
                "fed",
                "--envoys",
                "hospital-a",
                "--out",
                str(out),
                "--install-root",
                "/etc/fedbus",
                "--transport",
                "mqtt",
                *public_keys_of(out, ["hospital-a"]),
            ]
        )
        == 0
    )
    for unit in UNITS:
        argv = shlex.split(settings(unit)["ExecStart"][0].replace("%i", "hospital-a"))
        if argv[0].endswith("/fedbus"):
            assert argv[1] in COMMANDS
        config = Path(argv[argv.index("--config" if "--config" in argv else "-c") + 1])
        assert config.is_relative_to("/etc/fedbus"), config
        assert (out / config.relative_to("/etc/fedbus")).is_file(), f"{unit.name}: {config}"


def _has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_GET_MDWE (66) exists from Linux 6.3; older kernels answer EINVAL (-1).
    return libc.prctl(66, 0, 0, 0, 0) >= 0


# Run a command under the kernel's per-process equivalent of MemoryDenyWriteExecute= (prctl
# PR_SET_MDWE, refuse exec gain), as systemd's seccomp filter would.
MDWE_EXEC = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        raise SystemExit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


async def test_broker_daemon_serves_without_writable_executable_memory(tmp_path: Path) -> None:
    """`fedbus broker` from a provisioned kit, under MDWE as its unit runs it, serves a node."""
    import asyncio

    from broker.client.connect import connect
    from broker.client.credentials import Credentials
    from broker.keys import read_key_file
    from broker.server.ports import free_port
    from broker.topics import Topics

    assert _has_mdwe(), "this kernel cannot emulate MemoryDenyWriteExecute (needs Linux >= 6.3)"
    out = tmp_path / "kits"
    port = free_port()
    argv = ["--federation", "fed", "--envoys", "a,b", "--out", str(out), "--port", str(port)]
    argv += public_keys_of(out, ["a", "b"])
    assert provision([*argv, "--bind-address", "127.0.0.1"]) == 0
    ready = tmp_path / "ready"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-c",
            MDWE_EXEC,
            sys.executable,
            "-m",
            "node.cli",
            "broker",
            "--config",
            str(out / "broker" / "broker.toml"),
            "--ready-file",
            str(ready),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        while not ready.exists():
            assert daemon.poll() is None, daemon.stdout.read().decode()  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
        kit = out / "a"
        bus = await connect(
            f"zmq+tcp://127.0.0.1:{port}",
            node_id="a",
            role="envoy",
            credentials=Credentials.for_curve(
                secret_key=read_key_file(kit / "curve.key", encoding="z85"),
                broker_public_key=read_key_file(kit / "broker.pub", encoding="z85"),
            ),
        )
        mine = bus.subscribe(Topics("fed").envoy("a"))
        await mine.ready()  # the broker answered: it runs, without W+X memory
        await bus.close()
    finally:
        daemon.terminate()
        daemon.wait()


async def test_mosquitto_serves_without_writable_executable_memory(tmp_path: Path) -> None:
    """Mosquitto from a provisioned kit, under MDWE as its unit runs it, serves a TLS client."""
    from broker.client.connect import connect
    from broker.server.mosquitto_process import MosquittoProcess
    from broker.server.ports import free_port
    from broker.topics import Topics
    from node.cli import _credentials
    from node.config import load_envoy_config

    assert _has_mdwe()
    out = tmp_path / "kits"
    port = free_port()
    argv = ["--federation", "fed", "--envoys", "a,b", "--out", str(out), "--port", str(port)]
    argv += ["--transport", "mqtt", "--bind-address", "127.0.0.1"]
    argv += public_keys_of(out, ["a", "b"])
    if os.geteuid() == 0:
        argv += ["--mosquitto-user", "root"]
    assert provision(argv) == 0
    conf = out / "broker" / "mosquitto.conf"
    # The one Mosquitto starter, run through the MDWE wrapper as the unit runs it.
    with MosquittoProcess(conf, (port,), prefix=[sys.executable, "-c", MDWE_EXEC]):
        cfg = load_envoy_config(out / "a" / "envoy.toml")
        bus = await connect(cfg.bus_url, node_id="a", role="envoy", credentials=_credentials(cfg))
        mine = bus.subscribe(Topics("fed").envoy("a"))
        await mine.ready()  # TLS handshake, password check and SUBACK, all under MDWE
        await bus.close()


@pytest.mark.slow
def test_torch_convolutions_need_writable_executable_memory() -> None:
    """Why the director and envoy units leave MemoryDenyWriteExecute off: oneDNN JIT."""
    assert _has_mdwe()
    code = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        conv = torch.nn.Conv2d(1, 4, 3)
        try:
            conv(torch.randn(2, 1, 28, 28)).sum().backward()
        except RuntimeError as exc:
            print("refused:", exc)
        else:
            print("ran")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert "refused:" in result.stdout, result.stdout + result.stderr[-2000:]
