"""`fedbus export`: safetensors, ONNX (checked by onnxruntime) and TorchScript, with the card.

The state folder is written by the director's own checkpoint writer, from a model trained
on real PneumoniaMNIST images and validation metrics computed the federated way (summed
score histograms), so the threshold in the card is a real one. The slow test at the end
exports what a real demo federation left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from node.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from node.cli import main as fedbus
from node.config import ModelConfig, model_kwargs
from node.errors import ExitCode
from node.export import (
    CARD_NAME,
    ExportError,
    _check_onnx,
    _with_probabilities,
    export_model,
    read_model_spec,
    write_model_spec,
)
from node.roundlog import RoundLog
from node.training.data import load_pneumoniamnist
from node.training.metrics import metrics_from_histograms
from node.training.model import build_model
from node.training.train import evaluate, train_local
from node.training.weights import get_weights, set_weights
from protocol.messages import TrainPlan
from tests.datafiles import PNEUMONIAMNIST

MODEL = ModelConfig(width=8)
PLAN = TrainPlan(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, kl_beta=0.01, augment=True)


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def data():
    return load_pneumoniamnist(PNEUMONIAMNIST)


@pytest.fixture(scope="module")
def state(tmp_path_factory, data) -> Path:
    """A director state folder after two rounds; round 1 was the best on validation."""
    folder = tmp_path_factory.mktemp("director")
    model = build_model(**model_kwargs(MODEL), seed=0)
    idx = np.random.default_rng(0).choice(len(data.train), 320, replace=False)
    records, snapshots = [], []
    for r in (1, 2):
        train_local(model, data.train.images[idx], data.train.labels[idx], PLAN, seed=r)
        res = evaluate(model, data.val.images, data.val.labels)
        val = metrics_from_histograms(np.array(res.hist_negative), np.array(res.hist_positive))
        val.update(loss=res.loss_sum / res.num_samples, num_samples=res.num_samples)
        snapshots.append((get_weights(model), val))
        records.append(
            {
                "round": r,
                "attempt": 0,
                "participants": ["envoy-1", "envoy-2", "envoy-3"],
                "survivors": ["envoy-1", "envoy-2"]
                if r == 2
                else ["envoy-1", "envoy-2", "envoy-3"],
                "dropped": ["envoy-3"] if r == 2 else [],
                "secure": True,
                "aggregate_verified": None,
                "metrics": {"train_loss": 0.5, "val": val, "evaluated_by": ["envoy-1"]},
                "best_round": 1,
                "seconds": 3.0,
                "stage_seconds": {},
            }
        )
    best_weights, best_val = snapshots[0]
    save_checkpoint(
        folder,
        make_checkpoint(
            federation="pneumonia",
            round=2,
            weights=snapshots[1][0],
            best_round=1,
            best_weights=best_weights,
            best_threshold=best_val["threshold"],
            best_metrics=best_val,
            last_record=records[-1],
        ),
    )
    for record in records:
        RoundLog(folder).append(record)
    (folder / "status.json").write_text(json.dumps({"rounds_total": 20, "round": 2}))
    write_model_spec(folder, MODEL)
    return folder


def _torch_model(weights: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(**model_kwargs(MODEL))
    set_weights(model, weights)
    return model.eval()


@pytest.fixture(scope="module")
def exported(state: Path, tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = {}
    for fmt in ("safetensors", "onnx", "torchscript"):
        out[fmt] = export_model(
            state, fmt=fmt, best=True, out_dir=tmp_path_factory.mktemp(fmt), model=None
        )
    return out


def test_onnx_matches_torch_in_onnxruntime_at_any_batch_size(exported, state, data) -> None:
    ckpt = load_checkpoint(state)
    reference = _with_probabilities(_torch_model(ckpt.best_weights_numpy()))
    session = ort.InferenceSession(
        str(exported["onnx"]["model"]), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    images = data.test.images[:65].astype(np.float32)[:, None] / 255.0
    for n in (1, 7, 65):
        logits, probs = session.run(None, {"image": images[:n]})
        with torch.no_grad():
            want_logits, want_probs = reference(torch.from_numpy(images[:n]))
        np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs, want_probs.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_the_onnx_threshold_gives_torchs_decisions(exported, state, data) -> None:
    card = _strict_json(exported["onnx"]["card"].read_text())
    ckpt = load_checkpoint(state)
    threshold = card["decision_threshold"]
    assert threshold == ckpt.best_threshold and 0 < threshold < 1
    session = ort.InferenceSession(str(exported["onnx"]["model"]))
    images = data.test.images.astype(np.float32)[:, None] / 255.0
    _, probs = session.run(None, {"image": images})
    from node.training.train import predict_scores

    torch_scores = predict_scores(_torch_model(ckpt.best_weights_numpy()), data.test.images)
    calls = probs[:, 1] >= threshold
    near = np.abs(torch_scores - threshold) < 1e-5  # ties at the threshold may flip
    assert np.array_equal(calls[~near], (torch_scores >= threshold)[~near])
    accuracy = float(np.mean(calls == data.test.labels))
    assert accuracy > 0.6  # a trained pneumonia detector, not noise


def test_onnx_metadata_carries_the_threshold(exported, state) -> None:
    proto = onnx.load(str(exported["onnx"]["model"]))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fedbus.decision_threshold"]) == load_checkpoint(state).best_threshold
    assert meta["fedbus.round"] == "1" and meta["fedbus.weights"] == "best"


def test_safetensors_loads_strictly_into_the_model(exported, state) -> None:
    path = exported["safetensors"]["model"]
    state_dict = load_file(str(path))
    model = build_model(**model_kwargs(MODEL))
    model.load_state_dict(state_dict, strict=True)
    reference = _torch_model(load_checkpoint(state).best_weights_numpy())
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=0, rtol=0)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert float(meta["fedbus.decision_threshold"]) == load_checkpoint(state).best_threshold


def test_torchscript_runs_without_fedbus_and_carries_the_card(exported, state) -> None:
    files = {CARD_NAME: ""}
    scripted = torch.jit.load(str(exported["torchscript"]["model"]), _extra_files=files)
    card = _strict_json(files[CARD_NAME])
    assert card["format"] == "torchscript" and card["weights"]["round"] == 1
    reference = _with_probabilities(_torch_model(load_checkpoint(state).best_weights_numpy()))
    for n in (1, 5):
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            for got, want in zip(scripted(x), reference(x), strict=True):
                torch.testing.assert_close(got, want)


def test_the_card_describes_the_round_and_the_federation(exported, state) -> None:
    card = _strict_json(exported["safetensors"]["card"].read_text())
    ckpt = load_checkpoint(state)
    assert card["federation"] == "pneumonia"
    assert card["weights"] == {
        "which": "best",
        "round": 1,
        "chosen_by": "federated validation AUC",
        "rounds_completed": 2,
        "rounds_planned": 20,
    }
    assert card["validation"]["auc"] == pytest.approx(ckpt.best_metrics["auc"])
    roc = card["validation"]["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) == 101
    # Participation up to the exported round only: round 2's dropout is not in it.
    assert [r["round"] for r in card["participation"]["rounds"]] == [1]
    assert card["participation"]["num_sites"] == 3
    assert card["defence"]["name"] == "cvb"
    assert card["privacy"]["secure_aggregation"] is True
    assert card["input"]["shape"] == ["batch", 1, 28, 28]
    assert card["decision_rule"].startswith("positive (class 1) iff probabilities[:, 1]")


def test_the_last_round_is_the_default(state, tmp_path) -> None:
    paths = export_model(state, fmt="safetensors", out_dir=tmp_path)
    card = _strict_json(paths["card"].read_text())
    assert card["weights"]["which"] == "last" and card["weights"]["round"] == 2
    ckpt = load_checkpoint(state)
    assert card["decision_threshold"] == ckpt.last_record["metrics"]["val"]["threshold"]
    assert [r["dropped"] for r in card["participation"]["rounds"]] == [[], ["envoy-3"]]
    loaded = load_file(str(paths["model"]))
    for name, value in ckpt.weights_numpy().items():
        np.testing.assert_array_equal(loaded[name].numpy(), value)


def test_the_cli_exports_with_the_directors_config(state, tmp_path, capsys) -> None:
    config = tmp_path / "director.toml"
    config.write_text(
        'federation = "pneumonia"\nbus_url = "zmq+tcp://127.0.0.1:5555"\n'
        f'state_dir = "{state}"\nrounds = 20\n[model]\nwidth = 8\n'
        "[secagg]\ndropout_fraction = 0.2\n"
    )
    out = tmp_path / "export"
    code = fedbus(
        [
            "export",
            str(state),
            "--best",
            "--format",
            "onnx",
            "--out",
            str(out),
            "--config",
            str(config),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "exported best round 1 of 'pneumonia'" in capsys.readouterr().out
    card = _strict_json((out / CARD_NAME).read_text())
    assert card["privacy"]["secagg"]["dropout_fraction"] == 0.2
    assert card["privacy"]["secagg"]["malicious"] is True
    assert (out / "model.onnx").stat().st_size > 0


def test_a_config_of_another_federation_is_refused(state, tmp_path, capsys) -> None:
    config = tmp_path / "director.toml"
    config.write_text(
        'federation = "other"\nbus_url = "zmq+tcp://127.0.0.1:5555"\n'
        f'state_dir = "{state}"\nrounds = 2\n[model]\nwidth = 8\n'
    )
    code = fedbus(["export", str(state), "--format", "onnx", "--config", str(config)])
    assert code == ExitCode.CONFIG
    assert "federation 'pneumonia'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "args", "code", "message"),
    [
        ("empty", [], ExitCode.STATE, "no checkpoint"),
        ("corrupt", [], ExitCode.STATE, "corrupt checkpoint"),
        ("no_spec", [], ExitCode.CONFIG, "pass --config"),
        ("wrong_spec", [], ExitCode.CONFIG, "do not fit the described model"),
        ("initial_only", [], ExitCode.CONFIG, "no round has completed"),
        ("initial_only", ["--best"], ExitCode.CONFIG, "no best model yet"),
    ],
)
def test_unusable_state_folders_fail_clearly_and_write_nothing(
    tmp_path, capsys, setup: str, args: list[str], code: int, message: str
) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    weights = get_weights(build_model(**model_kwargs(MODEL), seed=0))
    if setup == "corrupt":
        (folder / "checkpoint.msgpack").write_bytes(b"\x93garbage")
    elif setup != "empty":
        done = 0 if setup == "initial_only" else 1
        save_checkpoint(folder, make_checkpoint(federation="f", round=done, weights=weights))
        if setup == "wrong_spec":
            write_model_spec(folder, ModelConfig(width=16))
        elif setup != "no_spec":
            write_model_spec(folder, MODEL)
    out = tmp_path / "out"
    got = fedbus(["export", str(folder), "--format", "safetensors", "--out", str(out), *args])
    assert got == code
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_onnx_check_catches_a_model_that_disagrees() -> None:
    a = _with_probabilities(_torch_model(get_weights(build_model(**model_kwargs(MODEL), seed=0))))
    b = _with_probabilities(_torch_model(get_weights(build_model(**model_kwargs(MODEL), seed=1))))
    x = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(
        a,
        (x,),
        dynamo=True,
        input_names=["image"],
        output_names=["logits", "probabilities"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
    )
    data = program.model_proto.SerializeToString()
    _check_onnx(data, a, x)  # agrees with the model it came from
    with pytest.raises(ExportError, match="onnxruntime's logits differ from torch's"):
        _check_onnx(data, b, x)


def test_the_model_spec_round_trips_and_bad_ones_are_named(tmp_path) -> None:
    spec = ModelConfig(arch="resnet18", defense="precode", image_size=64, num_classes=3)
    write_model_spec(tmp_path, spec)
    assert read_model_spec(tmp_path) == spec
    (tmp_path / "model.json").write_text('{"model": {"arch": "vgg"}}')
    with pytest.raises(ExportError, match=r"model\.json: not a model description"):
        read_model_spec(tmp_path)


@pytest.mark.slow
def test_export_of_a_real_demo_federation_runs_in_onnxruntime(tmp_path, data) -> None:
    """`fedbus demo` (real processes, SecAgg), then `fedbus export` as a user would run it."""
    from tests.integration.fedprocs import SMALL, start_demo

    out = tmp_path / "run"
    proc = start_demo(out, "--envoys", "2", "--rounds", "2", *SMALL)
    log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    state = out / "director"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "export",
            str(state),
            "--best",
            "--format",
            "onnx",
            "--config",
            str(out / "kits" / "director" / "director.toml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = _strict_json((state / "export" / CARD_NAME).read_text())
    ckpt = load_checkpoint(state)
    assert card["weights"]["round"] == ckpt.best_round
    assert card["participation"]["sites"] == ["envoy-1", "envoy-2"]
    assert card["privacy"]["secure_aggregation"] is True
    model = build_model(**model_kwargs(ModelConfig(width=8)))
    set_weights(model, ckpt.best_weights_numpy())
    session = ort.InferenceSession(str(state / "export" / "model.onnx"))
    images = data.test.images.astype(np.float32)[:, None] / 255.0
    logits, _ = session.run(None, {"image": images})
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
