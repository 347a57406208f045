"""`fedbus attack`: gradient inversion against the model the federation deploys.

* :mod:`node.attack.replay`: the envoy's local training (``train_local``) replayed as a
  function differentiable in the images, exact to float tolerance;
* :mod:`node.attack.deployed`: the deployed model and update, built from the director's
  config (model, defence, KL weight, training plan), and what each threat setting observes;
* :mod:`node.attack.cli`: the command, scoring and report files.
"""

from node.attack.cli import SMOOTH_RELU, AttackConfig, main, run

__all__ = ["SMOOTH_RELU", "AttackConfig", "main", "run"]
