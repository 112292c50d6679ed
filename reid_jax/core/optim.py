"""Optimisers by name, built with optax, with per-parameter-group learning rates.

`config.optimizer.name`:
  * `adam`: the TriNet/DaRe schedule (Hermans et al. 2017, §4.2 / appendix): lr
    constant until t0, then lr(t) = lr * (end_lr/lr)^((t - t0) / (T - t0)); Adam beta1
    drops from 0.9 to 0.5 at t0. DaRe's official code uses T=60k, t0=30k.
  * `sgd`: SGD with (Nesterov) momentum and coupled weight decay (PyTorch's
    `torch.optim.SGD(weight_decay=...)`: decay added to the gradient before momentum),
    with a step-decay schedule (`lr * decay_factor^k` after the k-th of `decay_steps`)
    as the classification baselines train.

`config.optimizer.schedule` overrides the optimiser's own: `constant`, or `poly`
(Caffe's lr_policy "poly": lr * (1 - t / T)^power, T = the stage's steps).

Parameter groups: `config.optimizer.lr_mult` maps a top-level parameter name (e.g.
`backbone`) to a learning-rate multiplier (the IDE baseline trains the ImageNet
backbone at 0.1x the new layers' rate); the rest use 1x. Built with
`optax.multi_transform`; every group's rate is an `optax.inject_hyperparams`
hyperparameter, so `current_learning_rates(opt_state)` reads the rates actually used
from the optimiser state. `config.optimizer.accumulate_steps > 1` wraps the whole
optimiser in `optax.MultiSteps` (gradients averaged over that many calls, one update).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

NAMES = ("adam", "sgd")
SCHEDULES = ("trinet", "step", "constant", "poly")
DEFAULT_GROUP = "default"


def exponential_decay_after(base: float, end: float, decay_start: int, total: int):
  """lr(t) = base until decay_start, then base * (end/base)^((t-t0)/(T-t0))."""
  span = max(total - decay_start, 1)

  def schedule(step):
    frac = jnp.clip((step - decay_start) / span, 0.0, 1.0)
    return base * (end / base) ** frac
  return schedule


def step_change(before: float, after: float, at: int):
  """Piecewise constant: `before` until step `at`, then `after` (Adam beta1 0.9 -> 0.5)."""
  def schedule(step):
    return jnp.where(step < at, before, after)
  return schedule


def step_decay(base: float, boundaries: tuple[int, ...], factor: float):
  """base * factor^k after the k-th boundary (PyTorch MultiStepLR, stepped per update)."""
  return optax.piecewise_constant_schedule(
      base, {int(b): float(factor) for b in boundaries})


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """The learning-rate schedule named by `cfg.schedule` (default by optimiser)."""
  name = cfg.get("schedule", "") or ("trinet" if cfg.name == "adam" else "step")
  if name == "trinet":
    return exponential_decay_after(cfg.lr, cfg.end_lr, cfg.decay_start, total_steps)
  if name == "step":
    return step_decay(cfg.lr, tuple(cfg.get("decay_steps", ())), cfg.get("decay_factor", 0.1))
  if name == "constant":
    return optax.constant_schedule(cfg.lr)
  if name == "poly":  # Caffe's "poly": lr (1 - t / T)^power, 0 at T
    return optax.polynomial_schedule(cfg.lr, 0.0, float(cfg.get("power", 0.5)),
                                     max(int(total_steps), 1))
  raise ValueError(f"config.optimizer.schedule={name!r}: use one of {SCHEDULES}")


def param_labels(params: Mapping[str, Any], lr_mult: Mapping[str, float]) -> Any:
  """Each leaf's group: its top-level parameter name if it has a multiplier, else default."""
  return {k: jax.tree_util.tree_map(lambda _, g=(k if k in lr_mult else DEFAULT_GROUP): g, v)
          for k, v in params.items()}


def _base(cfg: ml_collections.ConfigDict, total_steps: int, mult: float
          ) -> optax.GradientTransformation:
  """One group's optimiser, with its learning rate scaled by `mult`."""
  schedule = make_schedule(cfg, total_steps)
  lr = (lambda step: schedule(step) * mult) if mult != 1.0 else schedule
  if cfg.name == "adam":
    b1 = step_change(cfg.b1, cfg.b1_after_decay, cfg.decay_start)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.name == "sgd":
    tx = optax.inject_hyperparams(optax.sgd)(
        learning_rate=lr, momentum=cfg.get("momentum", 0.9) or None,
        nesterov=bool(cfg.get("nesterov", False)))
  else:
    raise ValueError(f"config.optimizer.name={cfg.name!r}: use one of {NAMES}")
  if cfg.get("weight_decay", 0.0):
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  return tx


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   params: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """The optimiser of `cfg` (see the module docstring); `params` is needed for groups."""
  lr_mult = dict(cfg.get("lr_mult", None) or {})
  if lr_mult:
    if params is None:
      raise ValueError("config.optimizer.lr_mult needs the parameters to group")
    unknown = sorted(set(lr_mult) - set(params))
    if unknown:
      raise ValueError(f"config.optimizer.lr_mult names {unknown}, which are not top-level "
                       f"parameters of the model ({sorted(params)})")
    groups = {g: _base(cfg, total_steps, float(m)) for g, m in lr_mult.items()}
    groups[DEFAULT_GROUP] = _base(cfg, total_steps, 1.0)
    tx = optax.multi_transform(groups, param_labels(params, lr_mult))
  else:
    tx = _base(cfg, total_steps, 1.0)
  accumulate = int(cfg.get("accumulate_steps", 1) or 1)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx


def current_learning_rates(opt_state: Any) -> dict[str, float]:
  """{group: learning rate} read from the optimiser state (`lr` when there is one group).

  Walks the state for `inject_hyperparams` states; a `multi_transform` names the
  groups by their labels.
  """
  found: dict[str, float] = {}

  def walk(node: Any, name: str) -> None:
    hp = getattr(node, "hyperparams", None)
    if isinstance(hp, Mapping) and "learning_rate" in hp:
      found[name] = float(np.asarray(hp["learning_rate"]))
      return
    inner = getattr(node, "inner_states", None)
    if isinstance(inner, Mapping):  # optax.multi_transform
      for label, sub in inner.items():
        walk(getattr(sub, "inner_state", sub), f"lr/{label}")
      return
    if isinstance(node, Mapping):
      children = node.values()
    elif isinstance(node, tuple):
      children = node
    else:
      return
    for child in children:
      walk(child, name)

  walk(opt_state, "lr")
  return found
