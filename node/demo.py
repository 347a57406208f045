"""`fedbus demo`: a whole federation on this machine, each node its own OS process.

The launcher generates keys (CurveZMQ for the bus, Ed25519 for signatures) and configs into
OUT, starts the broker, the director and envoy-1..envoy-N on loopback, shows progress from the
director's status.json / rounds.jsonl, and when the director is done evaluates the best model
by validation, with its validation threshold, on the official test split (the launcher holds
the test split; a real deployment reports federated validation only). It writes
OUT/report.json and PNG plots. With --audit it checks, bit for bit, that the director's
unmasked sum equals the sum of the survivors' quantised updates, per round.

Ctrl-C / SIGTERM stops every process it started. Exit code 0 only on success.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import dump_toml
from node.status import read_records

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "configs" / "director.toml"


class DemoError(RuntimeError):
    pass


class Interrupted(Exception):
    pass


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _parse_value(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


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


class Federation:
    """Keys, configs and processes of one local federation (reused by the integration tests)."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.out = Path(opts.out).resolve()
        self.names = [f"envoy-{i + 1}" for i in range(opts.envoys)]
        self.procs: dict[str, Proc] = {}
        self.broker_url: str | None = None
        self.broker_bind: str = "tcp://127.0.0.1:0"
        self.plan: Any = None
        self.started_at = time.time()
        self.data_path: Path | None = None
        self._restarts_done: set[int] = set()

    # -- setup --------------------------------------------------------------------------------

    @property
    def keys(self) -> Path:
        return self.out / "keys"

    @property
    def configs(self) -> Path:
        return self.out / "configs"

    @property
    def director_state(self) -> Path:
        return self.out / "director"

    def envoy_state(self, name: str) -> Path:
        return self.out / name

    def resolve_data(self) -> Path:
        from node.training.data import resolve_pneumoniamnist

        path = self.opts.data or os.environ.get("FEDBUS_DATA") or None
        if path is None:
            from node.training.data import DataUnavailable

            raise DataUnavailable(
                "no data: pass --data PATH/pneumoniamnist.npz or set FEDBUS_DATA.\n" + _how_to_get()
            )
        self.data_path = resolve_pneumoniamnist(path).resolve()
        return self.data_path

    def prepare(self) -> None:
        """Keys and broker config (the node configs need the broker's URL: see write_configs)."""
        from broker.credentials import generate_curve_keypair, write_secret_key

        from crypto.signing import generate_signing_keypair

        if self.opts.transport not in ("zmq", "mqtt"):
            raise DemoError(f"--transport {self.opts.transport}: expected zmq or mqtt")
        if self.opts.envoys < 2:
            raise DemoError("--envoys must be at least 2 (secure aggregation needs a crowd)")
        if self.opts.faults:
            from broker.faults import FaultPlan

            self.plan = FaultPlan.load(self.opts.faults)
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("keys", "configs", "logs"):
            (self.out / sub).mkdir(exist_ok=True)
        if (self.director_state / "checkpoint.msgpack").exists():
            raise DemoError(f"{self.out} already holds a run; choose a new --out")
        for name in ["broker", "director", *self.names]:
            kp = generate_curve_keypair()
            write_secret_key(self.keys / f"{name}.key", kp.secret)
            (self.keys / f"{name}.pub").write_text(kp.public + "\n")
        for name in ["director", *self.names]:
            sk = generate_signing_keypair()
            _write_private(self.keys / f"{name}.sign.key", sk.private.hex())
            (self.keys / f"{name}.sign.pub").write_text(sk.public.hex() + "\n")
        broker_cfg = {
            "federation": "demo",
            "bind": self.broker_bind,
            "secret_key_file": "../keys/broker.key",
            "heartbeat": {"interval_s": 1.0, "timeout_s": 6.0},
        }
        text = dump_toml(broker_cfg)
        text += "".join(
            f'\n[[allow]]\nnode_id = "{n}"\nrole = "{"director" if n == "director" else "envoy"}"\n'
            f'public_key_file = "../keys/{n}.pub"\n'
            for n in ["director", *self.names]
        )
        (self.configs / "broker.toml").write_text(text)
        if self.opts.transport == "mqtt":
            self._prepare_mosquitto()
        if self.plan is not None:
            self.plan.save(self.configs / "faults.toml")

    def _prepare_mosquitto(self) -> None:
        """Mosquitto's conf, password and ACL files (ACL from broker.topics, as everywhere)."""
        import getpass

        from broker.mosquitto import (
            Listener,
            free_port,
            generate_password,
            mosquitto_binary,
            write_broker_files,
        )

        mosquitto_binary()  # a clear error now if it is not installed
        nodes = {"director": "director", **{n: "envoy" for n in self.names}}
        passwords = {n: generate_password() for n in nodes}
        for n, pw in passwords.items():
            _write_private(self.keys / f"{n}.mqtt.pass", pw)
        self.mqtt_port = free_port()
        folder = self.out / "mosquitto"
        folder.mkdir(exist_ok=True)
        self.mosquitto_conf = write_broker_files(
            folder,
            federation="demo",
            nodes=nodes,
            passwords=passwords,
            listeners=(Listener(port=self.mqtt_port),),
            run_as_user=getpass.getuser() if os.geteuid() == 0 else None,
        ).conf

    def _credentials(self, name: str) -> dict[str, Any]:
        if self.opts.transport == "mqtt":
            return {"username": name, "password_file": f"../keys/{name}.mqtt.pass"}
        return {
            "curve_secret_key": f"../keys/{name}.key",
            "broker_public_key": "../keys/broker.pub",
        }

    def director_config(self) -> dict[str, Any]:
        import tomllib

        with open(TEMPLATE, "rb") as fh:
            cfg = tomllib.load(fh)
        n = self.opts.envoys
        cfg.update(
            federation="demo",
            bus_url=self.broker_url,
            state_dir="../director",
            rounds=self.opts.rounds,
            min_envoys=2,
            target_envoys=n,
            wait_for_envoys_s=600.0,
            seed=self.opts.seed,
            audit=self.opts.audit,
            insecure_plain_aggregation=self.opts.insecure_plain,
            signing_key="../keys/director.sign.key",
            credentials=self._credentials("director"),
            envoy_signing_keys={m: f"../keys/{m}.sign.pub" for m in self.names},
        )
        cfg.setdefault("model", {})
        for dotted, value in self.opts.director_set.items():
            _set(cfg, dotted, value)
        return cfg

    def envoy_config(self, index: int, model: dict[str, Any]) -> dict[str, Any]:
        name = self.names[index]
        assert self.data_path is not None
        cfg: dict[str, Any] = {
            "node_id": name,
            "federation": "demo",
            "bus_url": self.broker_url,
            "state_dir": f"../{name}",
            "heartbeat_s": 1.0,
            "threads": 1,
            "seed": self.opts.seed * 1000 + index + 1,
            "audit": self.opts.audit,
            "signing_key": f"../keys/{name}.sign.key",
            "director_signing_key": "../keys/director.sign.pub",
            "faults": "faults.toml" if self.plan is not None else None,
            "credentials": self._credentials(name),
            "peer_signing_keys": {m: f"../keys/{m}.sign.pub" for m in self.names},
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
            "model": model,
        }
        for dotted, value in self.opts.envoy_set.items():
            _set(cfg, dotted, value)
        return cfg

    def write_configs(self) -> None:
        from node.config import load_director_config, load_envoy_config

        dcfg = self.director_config()
        model = dict(dcfg.get("model", {}))
        model.pop("init_seed", None)
        (self.configs / "director.toml").write_text(dump_toml(dcfg))
        load_director_config(self.configs / "director.toml")  # fail here, not in a child
        for i, name in enumerate(self.names):
            path = self.configs / f"{name}.toml"
            path.write_text(dump_toml(self.envoy_config(i, model)))
            load_envoy_config(path)

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], command: list[str] | None = None) -> Proc:
        log = self.out / "logs" / f"{name}.log"
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        fh = open(log, "ab")  # noqa: SIM115 (the child owns it)
        popen = subprocess.Popen(
            command or [sys.executable, "-m", "node.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.out),
            env=env,
            start_new_session=True,  # its own process group: we stop it, Ctrl-C does not
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        # Who is who, for operators and tests (e.g. to kill -9 one envoy).
        pids = {n: p.pid for n, p in self.procs.items()}
        tmp = self.out / ".pids.json.tmp"
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.out / "pids.json")
        return proc

    def start_broker(self, timeout_s: float = 60.0) -> str:
        if self.opts.transport == "mqtt":
            return self._start_mosquitto(timeout_s)
        ready = self.out / "broker.url"
        ready.unlink(missing_ok=True)
        args = ["broker", "--config", str(self.configs / "broker.toml"), "--ready-file", str(ready)]
        if self.broker_url is not None:
            args += ["--bind", self.broker_url.removeprefix("zmq+")]
        proc = self._spawn("broker", args)
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.popen.poll() is not None:
                raise DemoError(f"the broker exited ({proc.popen.returncode}); see {proc.log}")
            if time.monotonic() > deadline:
                raise DemoError(f"the broker did not come up in {timeout_s} s; see {proc.log}")
            time.sleep(0.05)
        self.broker_url = ready.read_text().strip()
        return self.broker_url

    def _start_mosquitto(self, timeout_s: float) -> str:
        import socket

        from broker.mosquitto import mosquitto_binary

        proc = self._spawn("broker", [], [mosquitto_binary(), "-c", str(self.mosquitto_conf)])
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.popen.poll() is not None:
                raise DemoError(f"mosquitto exited ({proc.popen.returncode}); see {proc.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoError(f"mosquitto did not come up; see {proc.log}") from None
                time.sleep(0.05)
        self.broker_url = f"mqtt://127.0.0.1:{self.mqtt_port}"
        return self.broker_url

    def start_director(self, *, resume: bool = False) -> Proc:
        args = ["director", "--config", str(self.configs / "director.toml")]
        if resume:
            args.append("--resume")
        if self.plan is not None:
            args += ["--faults", str(self.configs / "faults.toml")]
            args += ["--faults-start", repr(self.started_at)]
        return self._spawn("director", args)

    def start_envoy(self, name: str) -> Proc:
        args = ["envoy", "--config", str(self.configs / f"{name}.toml")]
        if self.plan is not None:
            args += ["--faults-start", repr(self.started_at)]
        return self._spawn(name, args)

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

    def stop_all(self, grace_s: float = 10.0) -> None:
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

    def planned_crash(self, name: str) -> bool:
        if self.plan is None:
            return False
        return any(c.get("envoy") == name for c in self.plan.to_dict().get("crash", []))

    def broker_restarts(self) -> list[dict[str, Any]]:
        return [] if self.plan is None else list(self.plan.to_dict().get("broker_restart", []))

    def tick(self) -> None:
        """Housekeeping while waiting: scheduled broker restarts of the fault plan."""
        now = time.time() - self.started_at
        for i, r in enumerate(self.broker_restarts()):
            if i not in self._restarts_done and now >= float(r["at_s"]):
                self._restarts_done.add(i)
                self.kill("broker")
                time.sleep(float(r.get("down_s", 1.0)))
                self.start_broker()

    # -- results ------------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.director_state)

    def audit(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """aggregate_verified per secure round: unmasked sum == sum of survivors' inputs."""
        import numpy as np

        out = []
        for rec in records:
            rec = dict(rec)
            if rec.get("secure"):
                rec["aggregate_verified"] = self._verify_round(rec["round"], np)
            out.append(rec)
        return out

    def _verify_round(self, r: int, np: Any) -> bool:
        folder = self.director_state / "audit"
        try:
            total = np.load(folder / f"round-{r}-sum.npy")
            survivors = json.loads((folder / f"round-{r}-survivors.json").read_text())
            acc = np.zeros_like(total, dtype=np.uint32)
            for name in survivors:
                part = np.load(self.envoy_state(name) / "audit" / f"round-{r}.npy")
                if part.shape != total.shape or part.dtype != np.uint32:
                    return False
                acc += part  # uint32 arithmetic wraps mod 2^32, as the masking does
        except (OSError, ValueError):
            return False
        return bool(np.array_equal(acc, total))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def _how_to_get() -> str:
    try:
        from node.training import data

        return str(getattr(data, "_HOW_TO_GET", ""))
    except ImportError:
        return ""


# -- progress -----------------------------------------------------------------------------------


class Progress:
    def __init__(self, fed: Federation, quiet: bool) -> None:
        self.fed = fed
        self.quiet = quiet
        self.bar: Any = None
        self.seen = 0
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=fed.opts.rounds, unit="round", desc="fedbus", dynamic_ncols=True)

    def update(self) -> None:
        records = self.fed.records()
        status: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((self.fed.director_state / "status.json").read_text())
        for rec in records[self.seen :]:
            val = (rec.get("metrics") or {}).get("val") or {}
            line = (
                f"round {rec['round']:3d}: {len(rec['survivors'])} envoys"
                f"{' (dropped ' + ', '.join(rec['dropped']) + ')' if rec['dropped'] else ''}, "
                f"{'secure' if rec['secure'] else 'PLAIN'}, val acc {val.get('accuracy', float('nan')):.3f} "
                f"auc {val.get('auc', float('nan')):.3f}, {rec['seconds']:.1f} s"
            )
            if self.bar is not None:
                self.bar.write(line)
                self.bar.update(1)
        self.seen = max(self.seen, len(records))
        if self.bar is not None and status:
            online = sum(1 for e in status.get("envoys", {}).values() if e.get("online"))
            self.bar.set_postfix_str(
                f"round {status.get('round')} {status.get('stage')}, {online} online", refresh=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- final evaluation and report ----------------------------------------------------------------


def final_evaluation(fed: Federation) -> dict[str, Any]:
    """The best-by-validation model and threshold, scored on the official test split."""
    import numpy as np
    import torch

    from node.checkpoint import load_checkpoint
    from node.config import load_director_config, model_kwargs
    from node.training.data import load_pneumoniamnist
    from node.training.metrics import binary_metrics, roc_auc
    from node.training.model import build_model
    from node.training.train import predict_scores
    from node.training.weights import set_weights

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = load_director_config(fed.configs / "director.toml")
    ckpt = load_checkpoint(fed.director_state)
    if ckpt is None:
        raise DemoError("the director left no checkpoint")
    weights = ckpt.best_weights_numpy() or ckpt.weights_numpy()
    threshold = ckpt.best_threshold if ckpt.best_threshold is not None else 0.5
    model = build_model(**model_kwargs(cfg.model))
    set_weights(model, weights)
    assert fed.data_path is not None
    ds = load_pneumoniamnist(fed.data_path)
    scores = np.asarray(predict_scores(model, ds.test.images), dtype=np.float64)
    test = {
        k: _plain(v) for k, v in dict(binary_metrics(scores, ds.test.labels, threshold)).items()
    }
    test["auc"] = float(roc_auc(scores, ds.test.labels))
    test["threshold"] = float(threshold)
    test["num_samples"] = len(ds.test.labels)
    val = {k: _plain(v) for k, v in (ckpt.best_metrics or {}).items()}
    return {
        "best_round": ckpt.best_round,
        "last_round": ckpt.round,
        "threshold": float(threshold),
        "test": test,
        "val": val,
        "_test_scores": scores,
        "_test_labels": ds.test.labels,
    }


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def write_plots(out: Path, rounds: list[dict[str, Any]], final: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    xs = [r["round"] for r in rounds]
    vals = [((r.get("metrics") or {}).get("val") or {}) for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [v.get("accuracy", np.nan) for v in vals], "o-", label="val accuracy")
    ax.plot(xs, [v.get("auc", np.nan) for v in vals], "s-", label="val AUC")
    if final.get("best_round") is not None:
        ax.axvline(final["best_round"], color="grey", ls=":", label="best by validation")
    ax.set_xlabel("round")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("federated validation per round")
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)
    written.append("rounds.png")

    from node.training.metrics import roc_from_histograms, score_histograms

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    neg, pos = score_histograms(final["_test_scores"], final["_test_labels"], 1000)
    fpr, tpr = roc_from_histograms(neg, pos)
    ax.plot(fpr, tpr, label=f"test (AUC {final['test']['auc']:.3f})")
    if final["val"].get("roc_fpr"):
        ax.plot(
            final["val"]["roc_fpr"],
            final["val"]["roc_tpr"],
            "--",
            label=f"validation (AUC {final['val'].get('auc', float('nan')):.3f})",
        )
    t = final["test"]
    ax.plot(
        1 - t["specificity"], t["sensitivity"], "ko", label=f"threshold {final['threshold']:.2f}"
    )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    ax.set_title(f"ROC, model of round {final.get('best_round')}")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)
    written.append("roc.png")
    return written


def build_report(
    fed: Federation, rounds: list[dict[str, Any]], final: dict[str, Any], seconds: float
) -> dict[str, Any]:
    def slim(rec: dict[str, Any]) -> dict[str, Any]:
        metrics = dict(rec.get("metrics") or {})
        if metrics.get("val"):
            metrics["val"] = {
                k: v for k, v in metrics["val"].items() if k not in ("roc_fpr", "roc_tpr")
            }
        return {
            "round": rec["round"],
            "participants": rec["participants"],
            "survivors": rec["survivors"],
            "dropped": rec["dropped"],
            "secure": rec["secure"],
            "aggregate_verified": rec.get("aggregate_verified"),
            "attempt": rec.get("attempt", 0),
            "metrics": metrics,
            "seconds": rec["seconds"],
            "stage_seconds": rec.get("stage_seconds", {}),
        }

    val = {k: v for k, v in final["val"].items() if k not in ("roc_fpr", "roc_tpr")}
    opts = fed.opts
    return {
        "envoys": opts.envoys,
        "rounds_requested": opts.rounds,
        "data": str(fed.data_path),
        "partition": {"scheme": opts.partition, "alpha": opts.alpha, "seed": opts.seed},
        "faults": opts.faults,
        "audit": opts.audit,
        "seconds": round(seconds, 1),
        "rounds": [slim(r) for r in rounds],
        "final": {
            "best_round": final["best_round"],
            "threshold": final["threshold"],
            "test": final["test"],
            "val": val,
        },
    }


# -- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedbus demo",
        description="A whole federation on this machine: broker, director and envoys as "
        "separate processes over loopback, with secure aggregation.",
    )
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--data", help="pneumoniamnist.npz (or set FEDBUS_DATA)")
    p.add_argument("--transport", choices=("zmq", "mqtt"), default="zmq")
    p.add_argument("--faults", help="fault plan TOML (configs/faults/*.toml)")
    p.add_argument("--audit", action="store_true", help="check every secure aggregate bit for bit")
    p.add_argument("--out", help="output folder (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", choices=("dirichlet", "iid"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    p.add_argument("--limit", type=int, default=0, help="use at most this many samples per split")
    p.add_argument(
        "--insecure-plain-aggregation",
        action="store_true",
        help="send plain updates (the director sees each one); for comparisons only",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a director config value, e.g. --set train.local_epochs=1",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise DemoError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    return Options(
        envoys=args.envoys,
        rounds=args.rounds,
        data=args.data,
        transport=args.transport,
        faults=args.faults,
        audit=args.audit,
        out=args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}",
        seed=args.seed,
        alpha=args.alpha,
        partition=args.partition,
        limit=args.limit,
        insecure_plain=args.insecure_plain_aggregation,
        director_set=overrides,
        quiet=args.quiet,
    )


def run(opts: Options) -> int:
    from node.training.data import DataUnavailable

    fed = Federation(opts)
    try:
        fed.resolve_data()
    except DataUnavailable as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    progress: Progress | None = None
    try:
        fed.prepare()
        fed.start_all()
        print(
            f"fedbus demo: {opts.envoys} envoys, {opts.rounds} rounds, bus {fed.broker_url}, "
            f"output {fed.out}",
            file=sys.stderr,
        )
        progress = Progress(fed, opts.quiet)
        director = fed.procs["director"]
        warned: set[str] = set()
        while director.popen.poll() is None:
            time.sleep(0.5)
            fed.tick()
            progress.update()
            broker = fed.procs["broker"]
            if broker.popen.poll() is not None:
                raise DemoError(f"the broker died ({broker.popen.returncode}); see {broker.log}")
            for name in fed.names:
                p = fed.procs[name]
                if p.popen.poll() is not None and name not in warned:
                    warned.add(name)
                    how = "as the fault plan says" if fed.planned_crash(name) else "UNPLANNED"
                    print(
                        f"fedbus demo: {name} exited ({p.popen.returncode}), {how}", file=sys.stderr
                    )
        progress.update()
        progress.close()
        rc = director.popen.returncode
        if rc != 0:
            raise DemoError(f"the director exited with {rc}; see {director.log}")
        for name in fed.names:  # they got Shutdown; give them a moment to leave
            with contextlib.suppress(subprocess.TimeoutExpired):
                fed.procs[name].popen.wait(15)
        fed.stop_all()
        records = fed.records()
        if opts.audit:
            records = fed.audit(records)
        final = final_evaluation(fed)
        report = build_report(fed, records, final, time.monotonic() - t0)
        plots = write_plots(fed.out, records, final)
        report["plots"] = plots
        tmp = fed.out / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(fed.out / "report.json")
        t = final["test"]
        print(
            f"fedbus demo: done in {report['seconds']:.0f} s. Best model: round {final['best_round']} "
            f"(threshold {final['threshold']:.2f} from validation). TEST accuracy {t['accuracy']:.3f}, "
            f"AUC {t['auc']:.3f}, sensitivity {t['sensitivity']:.3f}, specificity "
            f"{t['specificity']:.3f}, F1 {t['f1']:.3f}. Report: {fed.out / 'report.json'}",
            file=sys.stderr,
        )
        ok = len(records) == opts.rounds and [r["round"] for r in records] == list(
            range(1, opts.rounds + 1)
        )
        if not ok:
            print("fedbus demo: FAILED: not every round completed exactly once", file=sys.stderr)
            return 1
        if opts.audit:
            bad = [r["round"] for r in records if r.get("secure") and not r["aggregate_verified"]]
            if bad:
                print(f"fedbus demo: FAILED: audit mismatch in rounds {bad}", file=sys.stderr)
                return 1
            print(
                "fedbus demo: audit: every secure aggregate verified bit for bit", file=sys.stderr
            )
        return 0
    except Interrupted as exc:
        print(f"\nfedbus demo: {exc}: stopping every process", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fed.stop_all()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
    except DemoError as exc:
        print(f"fedbus demo: {exc}", file=sys.stderr)
        return 2
    return run(opts)
