"""The train state every method shares: params, BatchNorm statistics, optimiser state."""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus the `batch_stats` collection (empty for models without BN)."""
  batch_stats: Any


def create(apply_fn: Any, variables: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state (step 0) from model variables {'params', 'batch_stats'?}."""
  return TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def variables(state: TrainState) -> dict[str, Any]:
  """The model variables of a state, as `model.apply` takes them."""
  return {"params": state.params, "batch_stats": state.batch_stats}
