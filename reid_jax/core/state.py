"""The train state every method shares: params, BatchNorm statistics, optimiser state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus the `batch_stats` collection (empty for models without BN)."""
  batch_stats: Any


def create(apply_fn: Any, variables: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state (step 0) from model variables {'params', 'batch_stats'?}."""
  return TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def loss_step(state: TrainState, images: Any, rng: jax.Array, loss_fn: Callable, *,
              model: Any, axis_name: str, apply_kwargs: dict | None = None
              ) -> tuple[TrainState, dict]:
  """One gradient step of `loss_fn(model outputs) -> (loss, metrics)` on this device's
  images (inside pmap): dropout keys differ per device, BatchNorm statistics update,
  gradients and statistics are averaged over `axis_name`; metrics get loss and
  grad_norm and are averaged too."""
  rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def compute_loss(params):
    out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": rng}, **(apply_kwargs or {}))
    loss, metrics = loss_fn(out)
    return loss, (new_vars["batch_stats"], metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  return new_state, jax.lax.pmean(metrics, axis_name)


def variables(state: TrainState) -> dict[str, Any]:
  """The model variables of a state, as `model.apply` takes them."""
  return {"params": state.params, "batch_stats": state.batch_stats}


# XLA's backend optimisations buy nothing for a program that runs once, and cost the most
# there: a small ResNet's jitted `model.init` (thousands of threefry ops) compiled in 19 s
# with them and 3 s without, on 2 CPU cores (2026-12-01).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def run_once(fn: Callable, *args: Any) -> Any:
  """`jax.jit(fn)(*args)`, compiled without backend optimisations (for model init)."""
  compiled = jax.jit(fn).lower(*args).compile(compiler_options=RUN_ONCE_COMPILER_OPTIONS)
  return compiled(*args)
