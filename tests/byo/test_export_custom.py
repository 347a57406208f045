"""`fedbus export` of a team's own three-class RGB model: rebuilt by its factory, checked by
onnxruntime, with a card that says what the model is and how to read it."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from node.checkpoint import make_checkpoint, save_checkpoint
from node.cli import main as fedbus
from node.config import ModelConfig
from node.errors import ExitCode
from node.export import export_model, write_model_spec
from node.models import build_configured_model, initial_model_weights
from node.roundlog import RoundLog
from node.training.histograms import histogram_vector, metrics_from_vector
from node.training.weights import set_weights
from tests.byo.teamcode import team_module

NETS = textwrap.dedent(
    """
    from torch import nn
    from gradient_leakage.bottleneck import ConvVariationalBottleneck

    def guarded(num_classes, in_channels, image_size, width=6):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), ConvVariationalBottleneck(width),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def plain(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, num_classes))
    """
)
CLASSES = ["bacteria", "normal", "virus"]


@pytest.fixture
def nets(tmp_path, monkeypatch):
    with team_module(tmp_path, monkeypatch, "teamnets", NETS):
        yield


def state_of(folder, model: ModelConfig):
    """A director's state folder after one evaluated round of `model`."""
    weights = initial_model_weights(model)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 3))
    labels = rng.integers(0, 3, 60)
    logits[np.arange(60), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    val = metrics_from_vector(histogram_vector(probs, labels, 50), 3, 50, CLASSES)
    record = {
        "round": 1,
        "participants": ["envoy-1", "envoy-2"],
        "survivors": ["envoy-1", "envoy-2"],
        "dropped": [],
        "secure": True,
        "metrics": {"val": val},
        "best_round": 1,
    }
    save_checkpoint(
        folder,
        make_checkpoint(
            federation="hospitals",
            round=1,
            weights=weights,
            best_round=1,
            best_weights=weights,
            best_threshold=None,
            best_metrics=val,
            last_record=record,
        ),
    )
    RoundLog(folder).append(record)
    write_model_spec(folder, model)
    return weights


def model_cfg(factory: str) -> ModelConfig:
    return ModelConfig(
        factory=f"teamnets:{factory}",
        num_classes=3,
        in_channels=3,
        image_size=16,
        classes=CLASSES,
        init_seed=4,
    )


def test_a_teams_model_exports_and_runs_in_onnxruntime(nets, tmp_path) -> None:
    cfg = model_cfg("guarded")
    weights = state_of(tmp_path, cfg)
    paths = export_model(tmp_path, fmt="onnx", best=True)
    model = build_configured_model(cfg)
    set_weights(model, weights)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits, probs = ort.InferenceSession(str(paths["model"])).run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    card = json.loads(paths["card"].read_text())
    assert card["classes"] == CLASSES and card["decision_threshold"] is None
    assert card["decision_rule"] == "argmax of probabilities"
    assert card["input"]["shape"] == ["batch", 3, 16, 16]
    assert card["outputs"]["logits"] == ["batch", 3]
    assert card["defence"]["name"] == "custom"
    assert card["defence"]["modules"] == ["ConvVariationalBottleneck"]
    assert card["privacy"]["bottleneck"] == "custom"
    per_class = card["validation"]["per_class"]
    assert [c["class"] for c in per_class] == CLASSES and card["validation"]["auc"] > 0.5


def test_a_model_without_a_fedbus_bottleneck_says_so(nets, tmp_path) -> None:
    state_of(tmp_path, model_cfg("plain"))
    card = json.loads(export_model(tmp_path, fmt="safetensors", best=True)["card"].read_text())
    assert card["defence"]["name"] == "none" and card["privacy"]["bottleneck"] == "none"
    assert "secure aggregation only" in card["defence"]["description"]


def test_export_without_the_teams_package_names_the_field(nets, tmp_path, capsys) -> None:
    state_of(tmp_path, model_cfg("plain"))
    write_model_spec(
        tmp_path,
        model_cfg("plain").__class__(
            factory="gone_package:plain", num_classes=3, in_channels=3, image_size=16
        ),
    )
    code = fedbus(["export", str(tmp_path), "--format", "onnx"])
    assert code == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "model.factory = 'gone_package:plain': no module named 'gone_package'" in err
    assert not (tmp_path / "export").exists()
