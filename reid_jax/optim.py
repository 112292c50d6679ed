"""Optimiser: Adam with the TriNet/DaRe schedule.

Hermans et al. 2017 (§4.2 / appendix): lr 3e-4 constant until t0, then
lr(t) = 3e-4 * 0.001^((t - t0) / (T - t0)), i.e. exponential decay toward 3e-7 at T;
Adam beta1 drops from 0.9 to 0.5 at t0. DaRe's official code uses T=60k, t0=30k.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


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


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """Adam whose learning rate and beta1 follow the TriNet/DaRe schedules."""
  if cfg.name != "adam":
    raise ValueError(f"config.optimizer.name={cfg.name!r}: only 'adam' is implemented")
  lr = exponential_decay_after(cfg.lr, cfg.end_lr, cfg.decay_start, total_steps)
  b1 = step_change(cfg.b1, cfg.b1_after_decay, cfg.decay_start)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.get("weight_decay", 0.0):
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  return tx
