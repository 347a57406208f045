"""Do the director and an envoy build the same model? A fingerprint checked when the envoy joins.

A federation only works if every node builds the same network from its own `[model]`: the
envoy loads the director's weights into its model and trains it. A difference (another
factory, other options, 3 classes here and 2 there, the class names in another order) would
otherwise surface as a shape error in round 1 or, worse, not at all. So:

* every node summarises its model (`model_summary`): the `[model]` settings that shape the
  network, and the name and shape of every weight it averages;
* an envoy puts the summary's `fingerprint` into its presence heartbeat;
* the director compares it with its own (`ModelGate`): an envoy that differs is never
  selected, the director's status says why, and the envoy gets a `ModelMismatch` carrying
  the director's summary;
* the envoy names the differences (`differences`) and stops with a config error
  (`ModelMismatchError`, exit code CONFIG) instead of joining rounds it cannot train.

`init_seed` is not part of the summary (envoys take the director's weights, not its seed),
nor is anything that only says how to train (the director's [train]). Torch-free: the
director's layers come from its weights, an envoy's from the model it built.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import numpy as np

from node.config import BUNDLED_MODEL_FIELDS, ModelConfig
from node.errors import ExitCode, FedbusError
from protocol.messages import ModelMismatch, ModelSummary

__all__ = [
    "ModelGate",
    "ModelMismatchError",
    "differences",
    "fingerprint",
    "model_summary",
]

# Only the differences a person reads: the first few of each kind, then a count.
MAX_LISTED = 6
# A refused envoy that keeps announcing itself is told again at most this often.
RETELL_S = 10.0
# What node.training.model.build_model uses when [model] norm is unset.
DEFAULT_NORM = "batch"


class ModelMismatchError(FedbusError):
    """This node's [model] does not build the federation's model; the message says how."""

    exit_code = ExitCode.CONFIG


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_summary(
    m: ModelConfig, weights: Mapping[str, np.ndarray | tuple[int, ...]]
) -> ModelSummary:
    """The summary of the model `m` builds, whose averaged weights are `weights` (arrays, or
    just their shapes)."""
    settings: dict[str, Any] = {
        "factory": m.factory_name,
        "num_classes": m.num_classes,
        "in_channels": m.in_channels,
        "image_size": m.image_size,
        "classes": m.classes,
    }
    if m.factory is None:
        settings.update({name: getattr(m, name) for name in BUNDLED_MODEL_FIELDS})
        settings["norm"] = m.norm or DEFAULT_NORM  # unset is build_model's default: the same net
    else:
        settings.update({f"options.{k}": v for k, v in m.options.items()})
    layers = [
        (name, [int(d) for d in (w if isinstance(w, tuple) else np.shape(w))])
        for name, w in weights.items()
    ]
    return ModelSummary(settings={k: _text(v) for k, v in sorted(settings.items())}, layers=layers)


def fingerprint(summary: ModelSummary) -> str:
    """32 hex digits of SHA-256 over the summary's canonical encoding."""
    canonical = msgspec.msgpack.encode(
        [sorted(summary.settings.items()), [[n, list(s)] for n, s in summary.layers]]
    )
    return hashlib.sha256(canonical).hexdigest()[:32]


def _shown(setting: str | None) -> str:
    return "unset" if setting in (None, "null") else setting


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def differences(
    mine: ModelSummary, theirs: ModelSummary, *, me: str = "here", them: str = "there"
) -> list[str]:
    """What differs between two summaries, in words (empty when they are the same model)."""
    out = []
    for key in sorted(set(mine.settings) | set(theirs.settings)):
        a, b = mine.settings.get(key), theirs.settings.get(key)
        if a != b:
            out.append(f"model.{key}: {them} {_shown(b)}, {me} {_shown(a)}")
    my_layers = {name: tuple(shape) for name, shape in mine.layers}
    their_layers = {name: tuple(shape) for name, shape in theirs.layers}
    only_theirs = [n for n in their_layers if n not in my_layers]
    only_mine = [n for n in my_layers if n not in their_layers]
    reshaped = [
        f"{n} {list(their_layers[n])} vs {list(my_layers[n])}"
        for n in their_layers
        if n in my_layers and their_layers[n] != my_layers[n]
    ]
    if only_theirs:
        out.append(f"weights only {them}: {_listed(only_theirs)}")
    if only_mine:
        out.append(f"weights only {me}: {_listed(only_mine)}")
    if reshaped:
        out.append(f"weight shapes ({them} vs {me}): {_listed(reshaped)}")
    if not out and [n for n, _ in mine.layers] != [n for n, _ in theirs.layers]:
        out.append("the same weights in another order")
    return out


def mismatch_error(
    mine: ModelSummary, director: ModelSummary, *, source: str | None = None
) -> ModelMismatchError:
    """The envoy's error after the director said its model differs."""
    found = differences(mine, director, me="this envoy", them="the director")
    where = f" ({source})" if source else ""
    return ModelMismatchError(
        f"this envoy's [model]{where} does not build the federation's model, so the director "
        f"refuses it: {'; '.join(found) or 'the fingerprints differ'}. Configure [model] as "
        f"the director does (same factory, options, classes and image size)."
    )


class ModelGate:
    """The director's side: which envoys announced another model, and what to tell them."""

    def __init__(
        self, summary: ModelSummary, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.summary = summary
        self.fingerprint = fingerprint(summary)
        self.clock = clock
        self.refused: dict[str, str] = {}  # envoy -> the fingerprint it announced
        self._told: dict[str, float] = {}

    def check(self, envoy: str, announced: str) -> ModelMismatch | None:
        """An envoy's announced fingerprint; the message to send it when it differs (at most
        every RETELL_S). An envoy that announces nothing is not checked."""
        if not announced or announced == self.fingerprint:
            self.refused.pop(envoy, None)
            return None
        self.refused[envoy] = announced
        now = self.clock()
        if now - self._told.get(envoy, -RETELL_S) < RETELL_S:
            return None
        self._told[envoy] = now
        return ModelMismatch(fingerprint=self.fingerprint, model=self.summary)

    def admitted(self, envoys: list[str]) -> list[str]:
        return [e for e in envoys if e not in self.refused]
