"""A three-hospital federation started only from the kits `fedbus provision` wrote.

Real processes, as the systemd units run them: the broker (the ZeroMQ daemon or Mosquitto
with the kit's mosquitto.conf), `fedbus director --config director.toml`, and
`fedbus envoy --config envoy.toml` for each hospital, on loopback. The only edits are the
ones an operator makes to a kit: each hospital's [data] (here: a small slice of
PneumoniaMNIST) and a short training recipe so the test stays small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from broker.server.mosquitto_process import MosquittoProcess
from broker.server.ports import free_port
from node.checkpoint import load_checkpoint
from node.provision import main as provision
from node.roundlog import RoundLog
from protocol.configfile import dump_toml
from tests.datafiles import PNEUMONIAMNIST
from tests.deploy.identities import public_keys_of

REPO = Path(__file__).resolve().parents[2]
ENVOYS = ("hospital-a", "hospital-b", "hospital-c")


def data_path() -> Path:
    path = PNEUMONIAMNIST
    assert path.is_file(), f"PneumoniaMNIST not found at {path}: set FEDBUS_DATA"
    return path


def edit(path: Path, change: dict) -> None:
    """What an operator does to a kit's config: change some fields, keep the rest."""
    with path.open("rb") as fh:
        config = tomllib.load(fh)
    for key, value in change.items():
        if isinstance(value, dict):
            table = config.setdefault(key, {})
            for sub, subvalue in value.items():
                if isinstance(subvalue, dict):
                    table.setdefault(sub, {}).update(subvalue)
                else:
                    table[sub] = subvalue
        else:
            config[key] = value
    path.write_text(dump_toml(config))


def spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", *args],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "mqtt"])
def test_three_hospitals_complete_secure_rounds_from_their_kits(
    tmp_path: Path, transport: str
) -> None:
    out = tmp_path / "kits"
    port = free_port()
    args = [
        "--federation", "pneumonia",
        "--envoys", ",".join(ENVOYS),
        "--out", str(out),
        "--transport", transport,
        "--port", str(port),
        "--bind-address", "127.0.0.1",
        "--rounds", "2",
        "--data", str(data_path()),
    ]  # fmt: skip
    if os.geteuid() == 0:
        args += ["--mosquitto-user", "root"]
    args += public_keys_of(out, ENVOYS)
    assert provision(args) == 0
    logs = tmp_path / "logs"
    logs.mkdir()

    # Small and quick: the federation mechanics are under test, not the accuracy.
    edit(
        out / "director" / "director.toml",
        {
            "train": {"local_epochs": 1, "batch_size": 64},
            "wait_for_envoys_s": 600.0,
            "min_envoys": 3,
        },
    )
    for envoy in ENVOYS:
        edit(out / envoy / "envoy.toml", {"data": {"limit": 240}, "heartbeat_s": 1.0})

    procs: list[subprocess.Popen[bytes]] = []
    mosquitto: MosquittoProcess | None = None
    try:
        if transport == "mqtt":
            mosquitto = MosquittoProcess(
                out / "broker" / "mosquitto.conf", (port,), log_path=logs / "mosquitto.log"
            ).start()
        else:
            ready = tmp_path / "broker.ready"
            broker = spawn(
                ["broker", "--config", "broker.toml", "--ready-file", str(ready)],
                out / "broker",
                logs / "broker.log",
            )
            procs.append(broker)
            while not ready.exists():
                assert broker.poll() is None, (logs / "broker.log").read_text()
                time.sleep(0.05)
        envoys = {
            e: spawn(["envoy", "--config", "envoy.toml"], out / e, logs / f"{e}.log")
            for e in ENVOYS
        }
        procs += envoys.values()
        director = spawn(
            ["director", "--config", "director.toml"], out / "director", logs / "director.log"
        )
        procs.append(director)
        rc = director.wait()  # the global pytest timeout is the deadlock guard
        assert rc == 0, (logs / "director.log").read_text()[-4000:]
    finally:
        for proc in procs:
            stop(proc)
        if mosquitto is not None:
            mosquitto.stop()

    records = RoundLog(out / "director" / "state").load()
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["secure"] is True
        assert sorted(record["survivors"]) == list(ENVOYS)
        assert record["dropped"] == []
    # The federated validation of the final model is the validation of that model on the
    # union of the three hospitals' splits: rescored here, centrally, it gives the same
    # histograms, so the same AUC and loss.
    val = records[-1]["metrics"]["val"]
    central = _central_validation(out, load_checkpoint(out / "director" / "state"))
    assert val["num_samples"] == central["num_samples"]
    assert val["auc"] == pytest.approx(central["auc"], abs=1e-9)
    assert val["loss"] == pytest.approx(central["loss"], rel=1e-4)


def _central_validation(kits: Path, ckpt) -> dict:
    """The final model scored by each hospital's own trainer on its own validation split,
    the histogram vectors summed in the clear and read as the director reads its sum."""
    from node.config import load_director_config, load_envoy_config
    from node.director import validation_metrics
    from node.localdata import load_local_data
    from node.trainer import make_trainer
    from node.training.histograms import histogram_vector, vector_samples

    director = load_director_config(kits / "director" / "director.toml")
    weights = ckpt.weights_numpy()
    total = None
    loss = 0.0
    for envoy in ENVOYS:
        cfg = load_envoy_config(kits / envoy / "envoy.toml")
        trainer, _ = make_trainer(cfg, data=load_local_data(cfg))
        pred = trainer.evaluate(weights)
        vector = histogram_vector(pred.probabilities, pred.labels, director.eval.bins)
        total = vector if total is None else total + vector
        loss += float(pred.loss_sum)
    metrics = validation_metrics(director, total)
    n = vector_samples(total, director.model.num_classes, director.eval.bins)
    return {"auc": float(metrics["auc"]), "num_samples": n, "loss": loss / n}
