"""A real ``mosquitto`` process on the files `broker.server.mosquitto_files` writes.

The one way fedbus starts Mosquitto: the tests, the benchmarks and `fedbus demo` use
`MosquittoProcess`; deployments run the same config under systemd.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from broker.errors import BrokerError
from broker.server.mosquitto_files import Listener, generate_password, write_broker_files
from broker.server.ports import ADDRESS_IN_USE, accepts, free_port
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

__all__ = ["MosquittoError", "MosquittoProcess", "mosquitto_binary", "start_on_loopback"]

log = structlog.get_logger(__name__)

_STARTUP_POLL_S = 0.05


class MosquittoError(BrokerError, RuntimeError):
    """Mosquitto could not be found or started; the message says why (with its log)."""

    @property
    def address_in_use(self) -> bool:
        """Did it fail because another process holds the port (pick another, retry)?"""
        return ADDRESS_IN_USE in str(self)


def mosquitto_binary() -> str:
    """Path of the mosquitto executable (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoError(
            "the mosquitto binary was not found: install it with `make system-deps` "
            "(apt-get install mosquitto)"
        )
    return found


class MosquittoProcess:
    """A real `mosquitto -c CONF` child process, up once it accepts TCP connections.

    Use as a context manager (`with MosquittoProcess(conf, ports) as broker:`). `restart()`
    keeps the data dir, so persistent sessions and retained messages survive, as they would a
    broker restart in production. `prefix` runs the binary through a wrapper command (for
    example one that drops privileges or restricts memory as a systemd unit would).
    """

    def __init__(
        self,
        conf: Path,
        ports: tuple[int, ...],
        *,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        startup_timeout_s: float = 10.0,
        prefix: Sequence[str] = (),
    ) -> None:
        self.conf = Path(conf)
        self.ports = ports
        self.host = host
        self.log_path = Path(log_path) if log_path else self.conf.with_name("mosquitto.log")
        self._startup_timeout_s = startup_timeout_s
        self._prefix = tuple(prefix)
        self._proc: subprocess.Popen[bytes] | None = None
        self.passwords: dict[str, str] = {}
        self.federation: str | None = None

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        """The running child (for supervisors that watch several processes)."""
        return self._proc

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MosquittoProcess:
        if self.running():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [*self._prefix, mosquitto_binary(), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log_file.close()
        self._wait_listening()
        log.info("mosquitto started", pid=self._proc.pid, ports=self.ports, conf=str(self.conf))
        return self

    def _wait_listening(self) -> None:
        assert self._proc is not None
        pending = list(self.ports)
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MosquittoError(
                    f"mosquitto exited with status {self._proc.returncode} at startup; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            pending = [p for p in pending if not accepts(self.host, p)]
            if not pending:
                return
            time.sleep(_STARTUP_POLL_S)
        self.stop()
        raise MosquittoError(
            f"mosquitto did not listen on port(s) {pending}; log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (it saves its persistence file), or SIGKILL as a crash."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _current_user() -> str | None:
    # Only needed when running as root, where Mosquitto would otherwise drop to "mosquitto".
    return getpass.getuser() if os.geteuid() == 0 else None


def start_on_loopback(
    workdir: Path,
    nodes: Mapping[str, str],
    *,
    federation: str,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    passwords: Mapping[str, str] | None = None,
) -> MosquittoProcess:
    """Configure and start a local Mosquitto for {node_id: role} on a free loopback port.

    Returns the started process; `proc.url` is the bus URL and `proc.passwords[node_id]` each
    node's MQTT password (username = node id). Stop it with `proc.stop()` or a `with` block.
    The files live in `workdir` (created), the broker's log in `workdir/mosquitto.log`.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    chosen = dict(passwords) if passwords else {node: generate_password() for node in nodes}
    last_error: MosquittoError | None = None
    for _ in range(5):  # another process may grab the free port before mosquitto binds it
        port = free_port()
        files = write_broker_files(
            workdir,
            federation=federation,
            nodes=nodes,
            passwords=chosen,
            listeners=(Listener(port=port),),
            max_frame_bytes=max_frame_bytes,
            run_as_user=_current_user(),
        )
        proc = MosquittoProcess(files.conf, (port,), log_path=workdir / "mosquitto.log")
        proc.passwords = chosen
        proc.federation = federation
        try:
            return proc.start()
        except MosquittoError as exc:
            last_error = exc
            if not exc.address_in_use:
                raise
    assert last_error is not None
    raise last_error
