"""What an envoy has revealed, per round: the record that stops differencing across attempts.

A director that could run two attempts of one round and unmask two different survivor sets
would learn sum(S) - sum(S minus u) = the update of u; one that made the envoy train twice
could do the same with the two trainings. So an envoy:

* trains once per round, on one model: a later attempt of round r must carry the same
  weights, and reuses the update it kept (the masks are fresh: every attempt is a new SecAgg
  session); after a restart it has lost that update and stays out of round r;
* signs at most one survivor set per round, and once it has signed one it stays out of the
  later attempts of that round: the sums of two attempts can then only differ by a set that
  holds all of the first attempt's signers (at least t - C honest envoys), never by one
  envoy (the masked input of an envoy that did not sign may go into two attempts: it cancels
  out of their difference);
* trains a model once, ever: a later round on weights it already trained (a director that
  "skips" a round without moving the model, or goes back to an earlier one) would let it
  difference the sums of the two rounds, which differ in the retrained updates only;
* evaluates once per round, and only a model it will train on next: the model evaluated
  after round r must be the one RoundStart r + 1 carries.

Rounds only move forward. Every decision is written to STATE_DIR/ledger.json (atomically,
0600) before the message it allows leaves the envoy, so a crash and restart cannot undo it.
The ledger keeps the latest round of each kind only: anything older is refused anyway.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.files import SECRET_MODE, atomic_write_text
from node.errors import FedbusError

__all__ = ["LEDGER_FILE", "LedgerError", "RoundLedger"]

LEDGER_FILE = "ledger.json"


class LedgerError(FedbusError, ValueError):
    """The ledger file exists but cannot be read: the envoy must not guess what it revealed."""


@dataclass
class _Training:
    round: int = -1
    weights: str = ""  # sha256 of the model the round trained
    trained: bool = False
    signed: str = ""  # sha256 of the survivor set signed in this round


@dataclass
class _Evaluation:
    round: int = -1
    model: str = ""  # sha256 of the model evaluated after this round


# Digests of the models trained before the current round, newest last. A director that wants
# to bring back a model older than this many rounds has to wait as many rounds for it, each of
# which moves the federation on; 64 bytes each on disk.
TRAINED_MODELS_KEPT = 1024


@dataclass
class RoundLedger:
    path: Path | None = None
    training: _Training = field(default_factory=_Training)
    evaluation: _Evaluation = field(default_factory=_Evaluation)
    trained_models: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: str | Path | None) -> RoundLedger:
        """The ledger of `state_dir` (an empty one the first time; None: in memory only)."""
        if state_dir is None:
            return cls()
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            trained = data.get("trained_models", [])  # absent in ledgers of older versions
            if not isinstance(trained, list) or not all(isinstance(d, str) for d in trained):
                raise ValueError("trained_models is not a list of digests")
            return cls(
                path,
                _Training(**data["training"]),
                _Evaluation(**data["evaluation"]),
                trained,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{path}: unreadable ({exc}); it records what this envoy revealed, so the "
                "envoy will not start without it: restore it, or remove it only together "
                "with the envoy's keys"
            ) from None

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "training": asdict(self.training),
            "evaluation": asdict(self.evaluation),
            "trained_models": self.trained_models,
        }
        atomic_write_text(self.path, json.dumps(data, sort_keys=True) + "\n", mode=SECRET_MODE)

    # -- training ---------------------------------------------------------------------------

    def refuse_round(self, round: int, weights: str, *, kept: bool) -> str:
        """Why this envoy stays out of round `round` on model `weights` ('' if it may join);
        `kept`: whether it still holds the update it trained for that round."""
        t, e = self.training, self.evaluation
        if round < t.round or round <= e.round - 1:
            return (
                f"round {round} is older than round {max(t.round, e.round)} already taken part in"
            )
        if round == t.round and weights != t.weights:
            return f"round {round} was already trained on another model"
        if round == t.round and t.trained and not kept:
            return f"the update of round {round} was lost (restart); a round is never trained twice"
        if round > t.round and (
            (t.trained and weights == t.weights) or weights in self.trained_models
        ):
            return (
                f"round {round} carries a model this envoy already trained (round "
                f"{t.round} or earlier); training it again could be differenced against it"
            )
        if round == t.round and t.signed:
            return (
                f"a survivor set of round {round} was signed in an earlier attempt; a later "
                "attempt could be differenced against it"
            )
        if e.round == round - 1 and e.model and weights != e.model:
            return f"the director evaluated one model after round {e.round} and now trains another"
        return ""

    def begin(self, round: int, weights: str) -> None:
        if round != self.training.round:
            if self.training.trained:
                self.trained_models = [*self.trained_models, self.training.weights][
                    -TRAINED_MODELS_KEPT:
                ]
            self.training = _Training(round=round, weights=weights)
            self._save()

    def trained(self, round: int) -> None:
        """The round's update exists: from now on it is the only one for this round."""
        if self.training.round == round and not self.training.trained:
            self.training.trained = True
            self._save()

    def refuse_signing(self, round: int, survivors: str) -> str:
        """Why the survivor set `survivors` (a digest) must not be signed ('' if it may)."""
        t = self.training
        if t.round != round:
            return f"round {round} is not this envoy's current round {t.round}"
        if t.signed and t.signed != survivors:
            return f"another survivor set of round {round} was signed already"
        return ""

    def signed(self, round: int, survivors: str) -> None:
        if self.training.round == round and self.training.signed != survivors:
            self.training.signed = survivors
            self._save()

    # -- evaluation -------------------------------------------------------------------------

    def refuse_evaluation(self, round: int, model: str) -> str:
        """Why the model `model` must not be evaluated for round `round` ('' if it may)."""
        t, e = self.training, self.evaluation
        if round <= e.round:
            return f"the model of round {round} was already evaluated"
        if round < t.round:
            return f"round {round} is older than round {t.round} already trained"
        return ""

    def evaluating(self, round: int, model: str) -> None:
        self.evaluation = _Evaluation(round=round, model=model)
        self._save()
