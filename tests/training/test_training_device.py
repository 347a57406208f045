"""Device selection, and training/evaluation on the chosen device (a real GPU where one exists)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from node.errors import ExitCode
from node.training.device import (
    DEVICE_SPEC_PATTERN,
    DeviceUnavailable,
    available_devices,
    parse_device_spec,
    select_device,
)
from node.training.model import build_model
from node.training.train import evaluate, model_device, predict_logits, train_local
from node.training.weights import get_weights
from protocol.messages import TrainPlan

PLAN = TrainPlan(local_epochs=1, batch_size=16, lr=0.05, momentum=0.9, kl_beta=0.01, augment=True)


def _data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 2
    images[labels == 1, 10:18, 10:18] = 255  # a learnable difference
    return images, labels


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("auto", ("auto", None)),
        ("cpu", ("cpu", None)),
        ("cuda", ("cuda", None)),
        ("cuda:0", ("cuda", 0)),
        ("cuda:12", ("cuda", 12)),
        ("mps", ("mps", None)),
    ],
)
def test_valid_specs_parse(spec: str, parsed: tuple[str, int | None]) -> None:
    assert parse_device_spec(spec) == parsed


@given(st.text(max_size=12))
def test_any_other_spec_is_refused_with_the_choices(spec: str) -> None:
    if re.match(DEVICE_SPEC_PATTERN, spec):
        parse_device_spec(spec)
        return
    with pytest.raises(DeviceUnavailable, match="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        parse_device_spec(spec)


def test_a_bad_device_is_a_config_error() -> None:
    assert DeviceUnavailable.exit_code == ExitCode.CONFIG


def test_cpu_and_auto_resolve_on_this_machine() -> None:
    assert select_device("cpu") == torch.device("cpu")
    auto = select_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif "mps" in available_devices():
        assert auto.type == "mps"
    else:
        assert auto == torch.device("cpu")


def test_asking_for_a_gpu_that_is_not_there_never_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match=r"'cuda' asked for, but .* no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(DeviceUnavailable, match="available: cpu"):
        select_device("cuda:1")


def test_a_gpu_index_beyond_the_count_names_the_count(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceUnavailable, match=r"has 2 CUDA GPU\(s\)"):
        select_device("cuda:2")
    assert select_device("cuda:1") == torch.device("cuda", 1)


def test_mps_is_refused_where_the_backend_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="no usable MPS backend"):
        select_device("mps")


def test_training_on_the_cpu_device_is_the_default_training_bit_for_bit() -> None:
    images, labels = _data()
    results = []
    for device in (None, "cpu", select_device("cpu")):
        model = build_model("cnn", "cvb", 28, seed=0, width=8)
        res = train_local(model, images, labels, PLAN, seed=5, device=device)
        results.append((get_weights(model), res.loss))
    for weights, loss in results[1:]:
        assert loss == results[0][1]
        for name, value in weights.items():
            np.testing.assert_array_equal(value, results[0][0][name])


def test_gpu_training_step_and_evaluation() -> None:
    """One real training step and an evaluation on CUDA, checked against the CPU."""
    if not torch.cuda.is_available():
        reason = f"no CUDA GPU on this machine (torch {torch.__version__}): GPU training unchecked"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    images, labels = _data()
    device = select_device("cuda")
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    before = get_weights(model)
    plan = TrainPlan(local_epochs=1, batch_size=48, lr=0.05, momentum=0.9, kl_beta=0.01)
    res = train_local(model, images, labels, plan, seed=5, device=device)
    assert res.steps == 1 and np.isfinite(res.loss)
    assert model_device(model).type == "cuda"
    after = get_weights(model)  # copies back to host memory
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    # The same weights score the same on either device (eval mode: the bottleneck's mean).
    on_gpu = predict_logits(model, images)
    on_cpu = predict_logits(model.to("cpu"), images)
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    res_gpu = evaluate(model.to(device), images, labels)
    res_cpu = evaluate(model.to("cpu"), images, labels)
    assert res_gpu.num_samples == res_cpu.num_samples == len(labels)
    assert abs(res_gpu.loss_sum - res_cpu.loss_sum) < 1e-3 * len(labels)
