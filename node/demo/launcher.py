"""The demo's federation: kits from `node.provision`, then processes to start and supervise.

Layout of OUT (every node runs from its kit, as it would on its own machine):

    OUT/kits/                provision's kits: roster, ca/, broker/, director/, envoy-N/
    OUT/director/ OUT/envoy-N/   state dirs (checkpoints, status.json, rounds.jsonl, audit/)
    OUT/broker/              Mosquitto's persistence (--transport mqtt)
    OUT/logs/<name>.log      every process's output
    OUT/pids.json            who is who, for operators and tests (e.g. to kill -9 one envoy)
    OUT/faults.toml          the fault plan the nodes read (--faults)

Each envoy makes its keys in its own folder (`node.identity`, as `fedbus envoy init` on a
hospital's host); configs, the broker's allow-list and Mosquitto's files are made once, by
provisioning from their public halves; the demo then only writes its own settings into the
node configs (`update_config`) and runs the processes on loopback.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.faults import FaultPlan
from broker.files import PUBLIC_MODE, atomic_write_text, read_toml
from broker.server.config import Heartbeat
from broker.server.mosquitto_process import MosquittoError, MosquittoProcess, mosquitto_binary
from broker.server.ports import ADDRESS_IN_USE, free_port
from node.config import BUNDLED_DATA_FIELDS, BUNDLED_MODEL_FIELDS
from node.errors import ExitCode, FedbusError
from node.identity import init_identity
from node.logs import configured_level
from node.provision import SHIPPED_CONFIGS, Plan, provision, update_config
from node.status import read_records
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

FEDERATION = "demo"
DIRECTOR = "director"
LOOPBACK = "127.0.0.1"
# The broker closes a session silent this long: a little more than the daemon's default, as
# envoys that train on two shared cores can be slow to answer.
HEARTBEAT = Heartbeat(interval_s=1.0, timeout_s=6.0)
# Another process may take a free port before our broker binds it: pick again this often.
BIND_ATTEMPTS = 5
BROKER_START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


class DemoError(FedbusError, RuntimeError):
    """The demo federation could not be set up or did not run; the message says why."""

    exit_code = ExitCode.FAILURE


@dataclass
class Options:
    envoys: int = 5
    rounds: int = 20
    data: str | None = None
    transport: str = "zmq"
    faults: str | None = None
    audit: bool = False
    out: str = "runs/demo"
    seed: int = 0
    alpha: float = 0.5
    partition: str = "dirichlet"
    limit: int = 0
    insecure_plain: bool = False
    # Dotted config keys -> values (`--set train.local_epochs=1`).
    director_set: dict[str, Any] = field(default_factory=dict)
    envoy_set: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def flatten_keys(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1} (the inverse of `nested`)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.lr": 0.1} -> {"train": {"lr": 0.1}}."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *tables, last = key.split(".")
        table = out
        for name in tables:
            table = table.setdefault(name, {})
        table[last] = value
    return out


class Federation:
    """Kits and processes of one local federation (reused by the integration tests)."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.out = Path(opts.out).resolve()
        self.names = [f"envoy-{i + 1}" for i in range(opts.envoys)]
        self.procs: dict[str, Proc] = {}
        self.broker_url: str | None = None
        self.plan: FaultPlan | None = None
        self.started_at = time.time()
        self.data_path: Path | None = None
        self._port: int | None = None
        self._restarts_done: set[int] = set()

    # -- places -----------------------------------------------------------------------------

    @property
    def kits(self) -> Path:
        return self.out / "kits"

    def kit(self, name: str) -> Path:
        """The kit folder of `name` ("broker", "director", "envoy-N")."""
        return self.kits / name

    def config(self, name: str) -> Path:
        return self.kit(name) / ("director.toml" if name == DIRECTOR else "envoy.toml")

    @property
    def director_state(self) -> Path:
        return self.out / DIRECTOR

    def envoy_state(self, name: str) -> Path:
        return self.out / name

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def faults_file(self) -> Path:
        return self.out / "faults.toml"

    # -- kits -------------------------------------------------------------------------------

    @property
    def custom_loader(self) -> bool:
        """The envoys read their data with a team's own loader (--set data.loader=...)."""
        return "data.loader" in self.opts.envoy_set

    def resolve_data(self) -> Path | None:
        from node.training.data import DATA_ENV, DataUnavailable, resolve_pneumoniamnist

        if self.custom_loader:
            return None  # the loader knows its data; PneumoniaMNIST is not needed
        path = self.opts.data or os.environ.get(DATA_ENV) or None
        if path is None:
            raise DataUnavailable(
                f"no data: pass --data PATH/pneumoniamnist.npz or set {DATA_ENV}.\n" + _how_to_get()
            )
        self.data_path = resolve_pneumoniamnist(path).resolve()
        return self.data_path

    def prepare(self) -> None:
        """The kits: keys, certificates, broker allow-list and Mosquitto files, node configs
        (by `node.provision`), and the fault plan the nodes read."""
        if self.opts.transport not in ("zmq", "mqtt"):
            raise DemoError(f"--transport {self.opts.transport}: expected zmq or mqtt")
        if self.opts.envoys < 2:
            raise DemoError("--envoys must be at least 2 (secure aggregation needs a crowd)")
        if self.opts.faults:
            self.plan = FaultPlan.load(fault_plan_file(self.opts.faults))
        if (self.director_state / "checkpoint.msgpack").exists():
            raise DemoError(f"{self.out} already holds a run; choose a new --out")
        if self.opts.transport == "mqtt":
            mosquitto_binary()  # a clear error now if it is not installed
        if self.data_path is None and not self.custom_loader:
            self.resolve_data()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._provision(free_port())
        if self.plan is not None:
            self.plan.save(self.faults_file)

    def _provision(self, port: int) -> None:
        # Each envoy makes its own keys in its own folder, as on its own host; provisioning
        # gets their public half only.
        public = {name: init_identity(self.kit(name), name) for name in self.names}
        plan = Plan(
            public_keys=public,
            federation=FEDERATION,
            envoys=list(self.names),
            director_id=DIRECTOR,
            out=self.kits,
            transport=self.opts.transport,
            broker_host=LOOPBACK,
            port=port,
            bind_address=LOOPBACK,
            install_root=self.kits,
            state_root=self.out,
            # Started as root, Mosquitto would switch to a user that cannot read the kit.
            mosquitto_user=getpass.getuser() if os.geteuid() == 0 else None,
            rounds=self.opts.rounds,
            # With a team's own loader the envoys' [data] is theirs (write_configs).
            data_path=str(self.data_path or self.out),
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
            heartbeat=HEARTBEAT,
        )
        provision(plan)
        self._port = port
        self.broker_url = plan.bus_url

    def write_configs(self) -> None:
        """The demo's settings on top of the provisioned node configs (validated, atomic)."""
        update_config(self.config(DIRECTOR), "director", self._director_settings())
        model = dict(read_toml(self.config(DIRECTOR)).get("model", {}))
        model.pop("init_seed", None)  # the envoys take the director's initial weights
        for index, name in enumerate(self.names):
            update_config(self.config(name), "envoy", self._envoy_settings(index, model))

    def _director_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "rounds": self.opts.rounds,
            "min_envoys": 2,
            "target_envoys": self.opts.envoys,
            "wait_for_envoys_s": 600.0,
            "seed": self.opts.seed,
            # --seed draws the initial weights too, so runs over seeds vary everything.
            "model.init_seed": self.opts.seed,
            "audit": self.opts.audit,
            "insecure_plain_aggregation": self.opts.insecure_plain,
        }
        if "model.factory" in self.opts.director_set:
            # The provisioned [model] configures the bundled CNN, which the factory replaces.
            settings["model"] = dict.fromkeys(BUNDLED_MODEL_FIELDS)
        return nested({**flatten_keys(settings), **self.opts.director_set})

    def _envoy_settings(self, index: int, model: dict[str, Any]) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "heartbeat_s": 1.0,
            "threads": 1,
            "seed": self.opts.seed * 1000 + index + 1,
            "audit": self.opts.audit,
            "data": {
                "source": "pneumoniamnist",
                "path": str(self.data_path),
                "limit": self.opts.limit,
                "partition": {
                    "scheme": self.opts.partition,
                    "alpha": self.opts.alpha,
                    "index": index,
                    "count": self.opts.envoys,
                    "seed": self.opts.seed,
                },
            },
            # The director's [model] exactly: what it leaves out, the envoys leave out too.
            "model": {**dict.fromkeys(BUNDLED_MODEL_FIELDS), **model},
            # A plain demo needs each envoy's own opt-in as well as the director's.
            "policy": {"insecure_plain_updates": self.opts.insecure_plain},
        }
        if self.plan is not None:
            settings["faults"] = str(self.faults_file)
        if self.custom_loader:
            # A team's loader reads its own data (data.path only if --set gives one); the
            # demo shares it out between the envoys like the npz (limit, partition).
            settings["data"].update(dict.fromkeys(("path", *BUNDLED_DATA_FIELDS)))
        return nested({**flatten_keys(settings), **self.opts.envoy_set})

    # -- processes --------------------------------------------------------------------------

    def _register(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        pids = {n: p.pid for n, p in self.procs.items()}
        atomic_write_text(self.out / "pids.json", json.dumps(pids), mode=PUBLIC_MODE)
        return proc

    def _spawn(self, name: str, args: list[str], *, module: str = "node.cli") -> Proc:
        log = self.logs / f"{name}.log"
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # The same interpreter and installed fedbus as this process: no PYTHONPATH needed.
        # node.cli takes the level as its global flag; node.swarm is given its own in `args`.
        level = ["--log-level", configured_level()] if module == "node.cli" else []
        command = [sys.executable, "-m", module, *level, *args]
        with open(log, "ab") as fh:  # the child's stdout: a stream, not a saved file
            popen = subprocess.Popen(
                command,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.out),
                env=env,
                start_new_session=True,  # its own process group: we stop it, Ctrl-C does not
            )
        return self._register(Proc(name, popen, log))

    def start_broker(self, timeout_s: float = BROKER_START_TIMEOUT_S) -> str:
        """Start the broker on the provisioned port; before the first node runs, a port
        another process took meanwhile means provisioning again with a fresh one."""
        first_start = "broker" not in self.procs
        for _ in range(BIND_ATTEMPTS):
            try:
                if self.opts.transport == "mqtt":
                    self._start_mosquitto(timeout_s)
                else:
                    self._start_zmq_broker(timeout_s)
            except _PortTaken:
                if not first_start or len(self.procs) > 1:
                    raise DemoError(f"port {self._port} is taken; see {self.logs}") from None
                self._provision(free_port())
                continue
            assert self.broker_url is not None
            return self.broker_url
        raise DemoError(f"no free port for the broker after {BIND_ATTEMPTS} tries")

    def _start_zmq_broker(self, timeout_s: float) -> None:
        ready = self.out / "broker.url"
        ready.unlink(missing_ok=True)
        config = self.kit("broker") / "broker.toml"
        proc = self._spawn(
            "broker", ["broker", "--config", str(config), "--ready-file", str(ready)]
        )
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.popen.poll() is not None:
                if ADDRESS_IN_USE in _tail(proc.log):
                    raise _PortTaken
                raise DemoError(f"the broker exited ({proc.popen.returncode}); see {proc.log}")
            if time.monotonic() > deadline:
                raise DemoError(f"the broker did not come up in {timeout_s} s; see {proc.log}")
            time.sleep(0.05)

    def _start_mosquitto(self, timeout_s: float) -> None:
        assert self._port is not None
        (self.out / "broker").mkdir(mode=0o700, exist_ok=True)  # its persistence folder
        log = self.logs / "broker.log"
        mosquitto = MosquittoProcess(
            self.kit("broker") / "mosquitto.conf",
            (self._port,),
            host=LOOPBACK,
            log_path=log,
            startup_timeout_s=timeout_s,
        )
        try:
            mosquitto.start()
        except MosquittoError as exc:
            if exc.address_in_use:
                raise _PortTaken from None
            raise DemoError(f"mosquitto did not start: {exc}") from None
        assert mosquitto.popen is not None
        self._register(Proc("broker", mosquitto.popen, log))

    def start_director(self, *, resume: bool = False) -> Proc:
        args = ["director", "--config", str(self.config(DIRECTOR))]
        if resume:
            args.append("--resume")
        if self.plan is not None:
            args += ["--faults", str(self.faults_file), "--faults-start", repr(self.started_at)]
        return self._spawn(DIRECTOR, args)

    def start_envoy(self, name: str) -> Proc:
        args = ["envoy", "--config", str(self.config(name))]
        if self.plan is not None:
            args += ["--faults-start", repr(self.started_at)]
        return self._spawn(name, args)

    def start_swarm(
        self,
        name: str,
        envoys: list[str],
        *,
        log_level: str = "info",
        train_seconds: float = 0.0,
        poison: Mapping[str, str] | None = None,
    ) -> Proc:
        """Envoys `envoys` as light envoys in one process (node.swarm: the real envoy, bus
        and SecAgg client each, a synthetic trainer), for scale runs and quick harnesses;
        `poison`: envoy -> poison spec (node.swarm.SyntheticTrainer)."""
        args = [arg for envoy in envoys for arg in ("--config", str(self.config(envoy)))]
        args += ["--log-level", log_level, "--train-seconds", repr(train_seconds)]
        for envoy, spec in (poison or {}).items():
            if envoy in envoys:
                args += ["--poison", f"{envoy}={spec}"]
        if self.opts.audit:
            args.append("--audit")
        if self.plan is not None:
            args += ["--faults", str(self.faults_file), "--faults-start", repr(self.started_at)]
        return self._spawn(name, args, module="node.swarm")

    def start_all(self) -> None:
        self.started_at = time.time()
        self.start_broker()
        self.write_configs()
        self.start_director()
        for name in self.names:
            self.start_envoy(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.popen.wait()

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        alive = [p for p in self.procs.values() if p.popen.poll() is None]
        order = sorted(alive, key=lambda p: p.name == "broker")  # broker last
        for p in order:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in order:
            try:
                p.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.popen.wait()

    # -- while it runs ----------------------------------------------------------------------

    def planned_crash(self, name: str) -> bool:
        return self.plan is not None and self.plan.crashes_of(name)

    def tick(self) -> None:
        """Housekeeping while waiting: scheduled broker restarts of the fault plan."""
        if self.plan is None:
            return
        now = time.time() - self.started_at
        for i, restart in enumerate(self.plan.broker_restarts):
            if i not in self._restarts_done and now >= restart.at_s:
                self._restarts_done.add(i)
                self.kill("broker")
                time.sleep(restart.down_s)
                self.start_broker()

    def records(self) -> list[dict[str, Any]]:
        """The director's completed rounds so far (rounds.jsonl)."""
        return read_records(self.director_state)


def shipped_fault_plans() -> list[str]:
    """Names of the fault plans fedbus ships (configs/faults/NAME.toml)."""
    return sorted(p.stem for p in (SHIPPED_CONFIGS / "faults").glob("*.toml"))


def fault_plan_file(plan: str | os.PathLike[str]) -> Path:
    """A fault plan file, or the name of a shipped plan (`chaos`), which an installed fedbus
    finds without the repository's configs/ folder."""
    path = Path(plan)
    shipped = SHIPPED_CONFIGS / "faults" / f"{plan}.toml"
    if not path.exists() and path.name == str(plan) and shipped.is_file():
        return shipped
    return path


class _PortTaken(Exception):
    """The broker's port was taken by another process before the broker bound it."""


def _tail(log: Path, size: int = 4096) -> str:
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _how_to_get() -> str:
    try:
        from node.training import data

        return str(getattr(data, "_HOW_TO_GET", ""))
    except ImportError:
        return ""
