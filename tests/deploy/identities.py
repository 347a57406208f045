"""Envoy identities for provisioning tests: each envoy makes its own keys, as on its host."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from node.identity import init_identity, public_file


def public_keys_of(kits: Path, envoys: Iterable[str]) -> list[str]:
    """`fedbus envoy init` for each envoy in its kit folder (kept if it exists: init keeps
    keys), and the `--public-keys` arguments of provision for them."""
    files = []
    for name in envoys:
        if name:
            init_identity(kits / name, name)
            files.append(str(public_file(kits / name, name)))
    return ["--public-keys", *files] if files else []
