"""`fedbus export`: the federation's model out of the director's state folder, with its card.

    fedbus export STATE_DIR [--best] --format safetensors|onnx|torchscript [--out DIR]
                  [--config director.toml]

Reads the director's checkpoint (the last round's weights, or with --best the weights chosen
on federated validation), rebuilds the network the federation trained, and writes into
`--out` (default STATE_DIR/export):

* the model: ``model.safetensors`` (the full state_dict, loadable with ``strict=True``),
  ``model.onnx`` (opset 18, batch dimension dynamic) or ``model.pt`` (TorchScript, traced);
  ONNX and TorchScript take float32 N x C x H x W images in [0, 1] at the model's size and
  return two outputs, ``logits`` and ``probabilities`` (softmax over the classes);
* ``model-card.json``: rounds, participants, validation metrics and ROC of the exported
  round, the decision threshold, the defence and the privacy parameters, how to call it.

The decision threshold is the one chosen on federated validation for those weights
(Youden's J over the summed histograms): a binary model calls an image positive iff
P(class 1) >= threshold. It is in the card and in each model file's own metadata, so the
number cannot be separated from the weights it belongs to.

The ONNX file is checked before it is written: onnxruntime runs it on a batch and its
outputs must match torch's (absolute 1e-4), else export fails and writes nothing. Every
file goes through broker.files.atomic_write_bytes, the card last: a folder with a card
holds a complete export.

The architecture comes from the director's config (--config, its [model] section) or from
``STATE_DIR/model.json`` (`write_model_spec`); it is never guessed from the weights, because
image_size changes what the model computes without changing a single weight's shape.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from broker.files import atomic_write_bytes, atomic_write_text
from node.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from node.config import DirectorConfig, ModelConfig, load_director_config
from node.errors import ExitCode, FedbusError
from node.roundlog import read_records
from protocol.configfile import ConfigError

__all__ = [
    "CARD_NAME",
    "EXPORT_FORMATS",
    "MODEL_SPEC_NAME",
    "ExportError",
    "ExportedRound",
    "StateUnusable",
    "choose_round",
    "export_model",
    "main",
    "model_card",
    "read_model_spec",
    "write_model_spec",
]

EXPORT_FORMATS = ("safetensors", "onnx", "torchscript")
MODEL_FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.pt"}
CARD_NAME = "model-card.json"
MODEL_SPEC_NAME = "model.json"
CARD_VERSION = 1
ONNX_OPSET = 18
ONNX_ATOL = 1e-4
DEFENCES = {
    "cvb": "convolutional variational bottleneck after the first convolution (Scheliga et al. "
    "2023) against gradient inversion",
    "precode": "variational bottleneck before the classifier (PRECODE, Scheliga et al. 2022) "
    "against gradient inversion",
    "none": "no bottleneck: updates are protected by secure aggregation only",
}


class ExportError(FedbusError):
    """The state folder, the model description or the export itself cannot be used."""

    exit_code = ExitCode.CONFIG


class StateUnusable(ExportError):
    """No state folder, no checkpoint in it, or one that cannot be read."""

    exit_code = ExitCode.STATE


@dataclass(frozen=True)
class ExportedRound:
    which: str  # "best" or "last"
    round: int
    weights: dict[str, np.ndarray]
    threshold: float | None
    metrics: dict[str, Any] | None


# ----------------------------------------------------------------------------- the model spec


def write_model_spec(state_dir: str | Path, model: ModelConfig) -> Path:
    """Record the federation's [model] in its state folder, so export needs no config."""
    text = json.dumps({"model": msgspec.to_builtins(model)}, indent=1, sort_keys=True)
    return atomic_write_text(Path(state_dir) / MODEL_SPEC_NAME, text + "\n")


def read_model_spec(state_dir: str | Path) -> ModelConfig | None:
    path = Path(state_dir) / MODEL_SPEC_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable model description: {exc}") from None
    try:
        return msgspec.convert(data.get("model"), ModelConfig)
    except (msgspec.ValidationError, AttributeError) as exc:
        raise ExportError(f"{path}: not a model description: {exc}") from None


# ----------------------------------------------------------------------------- which weights


def choose_round(ckpt: Checkpoint, *, best: bool) -> ExportedRound:
    """The weights to export with their threshold and validation metrics."""
    if best:
        weights = ckpt.best_weights_numpy()
        if weights is None or ckpt.best_round is None:
            raise ExportError(
                f"federation {ckpt.federation!r}: no best model yet (no round has been "
                f"evaluated on validation); export the last round without --best"
            )
        return ExportedRound(
            "best", ckpt.best_round, weights, ckpt.best_threshold, ckpt.best_metrics
        )
    if ckpt.round == 0:
        raise ExportError(
            f"federation {ckpt.federation!r}: no round has completed; there is only the "
            f"initial model"
        )
    record: dict[str, Any] = ckpt.last_record or {}
    val = (record.get("metrics") or {}).get("val")
    return ExportedRound(
        "last", ckpt.round, ckpt.weights_numpy(), (val or {}).get("threshold"), val
    )


# ----------------------------------------------------------------------------- the card


def _fedbus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedbus")
    except PackageNotFoundError:
        return "unknown"


def _participation(records: Sequence[Mapping[str, Any]], upto: int) -> dict[str, Any]:
    rounds = [r for r in records if int(r.get("round", 0)) <= upto]
    sites = sorted({s for r in rounds for s in r.get("survivors", [])})
    return {
        "rounds": [
            {
                "round": r.get("round"),
                "participants": len(r.get("participants", [])),
                "survivors": len(r.get("survivors", [])),
                "dropped": list(r.get("dropped", [])),
                "secure_aggregation": bool(r.get("secure")),
            }
            for r in rounds
        ],
        "sites": sites,
        "num_sites": len(sites),
    }


def _finite(value: Any) -> Any:
    """NaN and infinities (an undefined metric) as null: the card is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _validation(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not metrics:
        return None
    out = {k: v for k, v in metrics.items() if k not in ("roc_fpr", "roc_tpr")}
    if "roc_fpr" in metrics and "roc_tpr" in metrics:
        out["roc"] = {"fpr": metrics["roc_fpr"], "tpr": metrics["roc_tpr"]}
    return out


def model_card(
    ckpt: Checkpoint,
    chosen: ExportedRound,
    model: ModelConfig,
    *,
    records: Sequence[Mapping[str, Any]],
    fmt: str,
    in_channels: int,
    director: DirectorConfig | None = None,
    status: Mapping[str, Any] | None = None,
    bottlenecks: Sequence[str] = (),
) -> dict[str, Any]:
    """What a hospital needs to know before it uses the model, as one JSON-able dict.

    `records` are the round records (the state folder's round log); `bottlenecks` are the
    class names of the gradient_leakage bottleneck modules in a team's own model (the defence
    of a custom factory is whatever it built in).
    """
    rounds = _participation(records, chosen.round)
    defence = _defence(model, bottlenecks)
    all_secure = bool(rounds["rounds"]) and all(r["secure_aggregation"] for r in rounds["rounds"])
    privacy: dict[str, Any] = {
        "secure_aggregation": all_secure,
        "secure_aggregation_rounds": sum(r["secure_aggregation"] for r in rounds["rounds"]),
        "bottleneck": defence["name"],
        "differential_privacy": None,
    }
    if director is not None:
        privacy["secagg"] = {
            **msgspec.to_builtins(director.secagg),
            "min_survivors": director.min_envoys,
        }
        privacy["kl_beta"] = director.train.kl_beta
        privacy["insecure_plain_aggregation"] = director.insecure_plain_aggregation
    binary = model.num_classes == 2
    return {
        "card_version": CARD_VERSION,
        "fedbus_version": _fedbus_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "federation": ckpt.federation,
        "format": fmt,
        "file": MODEL_FILES[fmt],
        "weights": {
            "which": chosen.which,
            "round": chosen.round,
            "chosen_by": "federated validation AUC" if chosen.which == "best" else "last round",
            "rounds_completed": ckpt.round,
            "rounds_planned": (status or {}).get("rounds_total"),
        },
        "model": {**msgspec.to_builtins(model), "in_channels": in_channels},
        "input": {
            "name": "image",
            "shape": ["batch", in_channels, model.image_size, model.image_size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "note": "pixels / 255 for 8-bit images; the model normalises internally",
        },
        "outputs": {
            "logits": ["batch", model.num_classes],
            "probabilities": ["batch", model.num_classes],
        },
        "classes": model.classes,
        "decision_threshold": chosen.threshold,
        "decision_rule": (
            "positive (class 1) iff probabilities[:, 1] >= decision_threshold"
            if binary
            else "argmax of probabilities"
        ),
        "validation": _validation(chosen.metrics),
        "participation": rounds,
        "defence": defence,
        "privacy": privacy,
    }


def _defence(model: ModelConfig, bottlenecks: Sequence[str]) -> dict[str, Any]:
    if model.factory is None:
        return {"name": model.defense, "description": DEFENCES[model.defense]}
    if not bottlenecks:
        return {
            "name": "none",
            "description": f"a team's own model ({model.factory}) without a fedbus bottleneck "
            f"module: {DEFENCES['none']}",
        }
    return {
        "name": "custom",
        "modules": list(bottlenecks),
        "description": f"a team's own model ({model.factory}) with the variational "
        f"bottleneck module(s) {', '.join(bottlenecks)} of gradient_leakage",
    }


# ----------------------------------------------------------------------------- writers


def _build(model_cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> Any:
    from node.models import build_configured_model
    from node.training.weights import set_weights

    model = build_configured_model(model_cfg)  # EntryPointError (a FedbusError) if it cannot
    try:
        set_weights(model, weights)
    except ValueError as exc:
        built = (
            f"{model_cfg.arch}, defence {model_cfg.defense}, width {model_cfg.width}"
            if model_cfg.factory is None
            else f"factory {model_cfg.factory}, options {model_cfg.options}"
        )
        raise ExportError(
            f"the checkpoint's weights do not fit the described model ({built}, "
            f"{model_cfg.num_classes} classes): {exc}"
        ) from None
    return model.eval()


def _bottlenecks(model: Any) -> list[str]:
    from gradient_leakage.bottleneck import Bottleneck

    return [type(m).__name__ for m in model.modules() if isinstance(m, Bottleneck)]


def _with_probabilities(model: Any) -> Any:
    import torch

    class WithProbabilities(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(image)
            return logits, torch.softmax(logits, dim=1)

    return WithProbabilities(model).eval()


def _example(model_cfg: ModelConfig, in_channels: int, batch: int = 2) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    size = model_cfg.image_size
    return torch.rand(batch, in_channels, size, size, generator=gen)


def _safetensors_bytes(model: Any, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata=metadata)


def _onnx_bytes(model: Any, example: Any, metadata: dict[str, str]) -> bytes:
    import torch

    wrapped = _with_probabilities(model)
    try:
        with warnings.catch_warnings():
            # The bottlenecks keep their last mean/sigma as plain attributes for kl_loss;
            # the exporter notes the assignment, which does not change what inference does.
            warnings.filterwarnings("ignore", message=r"The tensor attributes .* during export")
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=["logits", "probabilities"],
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=65536)}},
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the reason
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ExportError("ONNX export failed: the exporter returned no program")
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data: bytes = proto.SerializeToString()
    _check_onnx(data, wrapped, example)
    return data


def _check_onnx(data: bytes, wrapped: Any, example: Any) -> None:
    """onnxruntime must give torch's outputs, at the export batch size and at batch 1."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for batch in (example, example[:1]):
        with torch.no_grad():
            expected = [t.numpy() for t in wrapped(batch)]
        got = session.run(["logits", "probabilities"], {"image": batch.numpy()})
        for name, want, have in zip(("logits", "probabilities"), expected, got, strict=True):
            if want.shape != have.shape or not np.allclose(want, have, atol=ONNX_ATOL, rtol=0):
                worst = float(np.max(np.abs(want - have))) if want.shape == have.shape else None
                raise ExportError(
                    f"ONNX check failed: onnxruntime's {name} differ from torch's "
                    f"(shapes {have.shape} vs {want.shape}, max difference {worst})"
                )


def _torchscript_bytes(model: Any, example: Any, card_text: str) -> bytes:
    import torch

    wrapped = _with_probabilities(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but LibTorch (C++) deployments still load only
        # TorchScript. The tracer's warnings are about the models' input-shape checks, which
        # are constant at the model's own image size; check_inputs reruns batch 1 to be sure.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        with torch.no_grad():
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                wrapped, example, check_inputs=[(example[:1],)]
            )
        torch.jit.save(traced, buffer, _extra_files={CARD_NAME: card_text})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- export


def _load(state_dir: Path) -> Checkpoint:
    if not state_dir.is_dir():
        raise StateUnusable(f"{state_dir}: no such state folder")
    try:
        ckpt = load_checkpoint(state_dir)
    except CheckpointError as exc:
        raise StateUnusable(str(exc)) from None
    if ckpt is None:
        raise StateUnusable(f"{state_dir}: no checkpoint (is this a director's state_dir?)")
    return ckpt


def _read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((state_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) else None


def export_model(
    state_dir: str | Path,
    *,
    fmt: str,
    best: bool = False,
    out_dir: str | Path | None = None,
    model: ModelConfig | None = None,
    director: DirectorConfig | None = None,
) -> dict[str, Path]:
    """Export the model and its card; returns {"model": path, "card": path}."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    state = Path(state_dir)
    ckpt = _load(state)
    if director is not None and director.federation != ckpt.federation:
        raise ExportError(
            f"{state}: the checkpoint is of federation {ckpt.federation!r}, the config's is "
            f"{director.federation!r}"
        )
    model_cfg = model or (director.model if director else None) or read_model_spec(state)
    if model_cfg is None:
        raise ExportError(
            f"{state}: no {MODEL_SPEC_NAME} describes the model; pass --config with the "
            f"director's config so export knows the architecture"
        )
    chosen = choose_round(ckpt, best=best)
    net = _build(model_cfg, chosen.weights)
    in_channels = int(getattr(net, "in_channels", model_cfg.in_channels))
    card = model_card(
        ckpt,
        chosen,
        model_cfg,
        records=read_records(state),
        fmt=fmt,
        in_channels=in_channels,
        director=director,
        status=_read_status(state),
        bottlenecks=_bottlenecks(net),
    )
    card_text = json.dumps(_finite(card), indent=1, allow_nan=False) + "\n"
    metadata = {
        "fedbus.federation": ckpt.federation,
        "fedbus.round": str(chosen.round),
        "fedbus.weights": chosen.which,
        "fedbus.decision_threshold": json.dumps(chosen.threshold),
        "fedbus.model": json.dumps(card["model"], sort_keys=True),
    }
    if fmt == "safetensors":
        data = _safetensors_bytes(net, metadata)
    elif fmt == "onnx":
        data = _onnx_bytes(net, _example(model_cfg, in_channels), metadata)
    else:
        data = _torchscript_bytes(net, _example(model_cfg, in_channels), card_text)
    out = Path(out_dir) if out_dir is not None else state / "export"
    model_path = atomic_write_bytes(out / MODEL_FILES[fmt], data)
    card_path = atomic_write_text(out / CARD_NAME, card_text)
    return {"model": model_path, "card": card_path}


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fedbus export",
        description="Write the federation's model, its decision threshold and a model card.",
    )
    p.add_argument("state_dir", type=Path, help="the director's state_dir")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt")
    p.add_argument(
        "--best", action="store_true", help="the model chosen on validation, not the last round"
    )
    p.add_argument("--out", type=Path, help="output folder (default STATE_DIR/export)")
    p.add_argument("--config", type=Path, help="the director's config: model and privacy settings")
    args = p.parse_args(argv)
    try:
        director = load_director_config(args.config) if args.config else None
        paths = export_model(
            args.state_dir, fmt=args.fmt, best=args.best, out_dir=args.out, director=director
        )
    except ConfigError as exc:
        print(f"fedbus export: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    except FedbusError as exc:
        print(f"fedbus export: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:
        print(f"fedbus export: cannot write the export: {exc}", file=sys.stderr)
        return int(ExitCode.STATE)
    card = json.loads(paths["card"].read_text())
    print(
        f"exported {card['weights']['which']} round {card['weights']['round']} of "
        f"{card['federation']!r}: {paths['model']} (threshold {card['decision_threshold']}), "
        f"card {paths['card']}"
    )
    return 0
