"""Softmax classification over training identities, shared by the classification family
and the classification stage of Re-ID done right."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, smoothing: float = 0.0,
                  weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean softmax cross-entropy, optionally label-smoothed (Szegedy et al. 2016) and
  weighted per example (weights summing to 0 give 0)."""
  n = logits.shape[-1]
  targets = jax.nn.one_hot(labels, n)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  per = optax.softmax_cross_entropy(logits, targets)
  if weights is None:
    return jnp.mean(per)
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def top1(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Fraction of examples whose largest logit is their label."""
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
