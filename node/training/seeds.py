"""Where local training's randomness comes from: the one hook between the envoy's security
policy and node.training.

`train_local(..., seed=...)` draws everything random from that seed: the batch order, the
augmentation, dropout and the bottleneck's noise. The bottleneck only protects an update if
its noise is unknown to whoever inverts the update, so an envoy takes a fresh seed from the
OS CSPRNG every round (`secret_seed`). `reproducible_seed` (from the config's seed and the
round) exists for tests and demos that must replay exactly; the envoy only uses it under
`[policy] insecure_reproducible_seeds`, which a config with a non-loopback bus refuses.
"""

from __future__ import annotations

import secrets

__all__ = ["SEED_BITS", "reproducible_seed", "secret_seed"]

# torch.manual_seed takes 64-bit seeds and train_local also uses seed + 1.
SEED_BITS = 63


def secret_seed() -> int:
    """A fresh seed from the OS CSPRNG (63 bits: nothing a director can guess or replay)."""
    return secrets.randbits(SEED_BITS)


def reproducible_seed(base: int, round: int) -> int:
    """A seed that is a function of (base, round) only: predictable, for tests and demos."""
    return (base * 1_000_003 + round) % 2**SEED_BITS
