"""Triplet losses on embeddings (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss", 2017).

Batch-hard: for every anchor, the furthest positive and the closest negative in the batch.
Batch-all: every valid (anchor, positive, negative) triplet. Margins: "soft" (softplus,
the TriNet/DaRe default) or a float hinge margin.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

Margin = Union[str, float]


def pairwise_distances(x: jnp.ndarray, y: jnp.ndarray | None = None,
                       squared: bool = False) -> jnp.ndarray:
  """Euclidean distances between rows, with a sqrt that has finite gradients at zero.

  The clamp at 1e-12 makes d(sqrt)/d(d2) finite on the diagonal (where d2 is 0 and
  the plain sqrt gradient is infinite); the clamped branch carries no gradient.
  """
  y = x if y is None else y
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  d2 = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
        - 2.0 * x @ y.T)
  d2 = jnp.maximum(d2, 0.0)
  if squared:
    return d2
  return jnp.sqrt(jnp.maximum(d2, 1e-12))


def _apply_margin(x: jnp.ndarray, margin: Margin) -> jnp.ndarray:
  """x = d(a,p) - d(a,n). Soft margin: softplus(x); hinge: max(x + m, 0)."""
  if margin == "soft":
    return jax.nn.softplus(x)
  if isinstance(margin, str):
    raise ValueError(f"loss margin {margin!r} is not 'soft' or a number; set "
                     "config.loss.margin to 'soft' or e.g. 0.2")
  return jnp.maximum(x + float(margin), 0.0)


def _active(x: jnp.ndarray, margin: Margin) -> jnp.ndarray:
  """A triplet is active when it violates the margin (soft margin: margin 0)."""
  m = 0.0 if margin == "soft" else float(margin)
  return (x + m > 0).astype(jnp.float32)


def batch_hard_triplet_loss(emb: jnp.ndarray, pids: jnp.ndarray,
                            margin: Margin = "soft",
                            valid: jnp.ndarray | None = None
                            ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Batch-hard triplet loss and its diagnostics.

  Args:
    emb: [B, D] embeddings.
    pids: [B] identity labels.
    margin: "soft" or a hinge margin.
    valid: optional [B] bool mask of real (non-padding) samples.

  Returns:
    (mean loss over anchors that have a positive and a negative,
     metrics: active fraction, in-batch top-1, mean hardest positive/negative distance).
  """
  b = emb.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  dist = pairwise_distances(emb)
  same = pids[:, None] == pids[None, :]
  eye = jnp.eye(b, dtype=bool)
  both = valid[:, None] & valid[None, :]
  pos = same & ~eye & both
  neg = ~same & both
  hardest_pos = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
  has = valid & jnp.any(pos, 1) & jnp.any(neg, 1)
  diff = jnp.where(has, hardest_pos - hardest_neg, 0.0)
  losses = _apply_margin(diff, margin)
  n = jnp.maximum(jnp.sum(has), 1)
  loss = jnp.sum(jnp.where(has, losses, 0.0)) / n
  # In-batch top-1: the nearest other valid sample shares the anchor's identity.
  nn_idx = jnp.argmin(jnp.where(both & ~eye, dist, jnp.inf), axis=1)
  top1 = jnp.take_along_axis(same, nn_idx[:, None], 1)[:, 0]
  metrics = {
      "active": jnp.sum(jnp.where(has, _active(diff, margin), 0.0)) / n,
      "top1": jnp.sum(jnp.where(has, top1, False)) / n,
      "hardest_pos": jnp.sum(jnp.where(has, hardest_pos, 0.0)) / n,
      "hardest_neg": jnp.sum(jnp.where(has, hardest_neg, 0.0)) / n,
  }
  return loss, metrics


def batch_all_triplet_loss(emb: jnp.ndarray, pids: jnp.ndarray,
                           margin: Margin = "soft",
                           valid: jnp.ndarray | None = None
                           ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Batch-all triplet loss: mean over every valid triplet (Hermans et al. "BA").

  With a hinge margin the mean is over active (non-zero) triplets ("BA≠0"), which is
  the variant Hermans et al. found to work; with the soft margin, over all triplets.
  """
  b = emb.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  dist = pairwise_distances(emb)
  same = pids[:, None] == pids[None, :]
  eye = jnp.eye(b, dtype=bool)
  both = valid[:, None] & valid[None, :]
  pos = same & ~eye & both
  neg = ~same & both
  mask = pos[:, :, None] & neg[:, None, :]  # [a, p, n]
  diff = dist[:, :, None] - dist[:, None, :]
  losses = _apply_margin(diff, margin)
  act = _active(diff, margin) * mask
  n_all = jnp.maximum(jnp.sum(mask), 1)
  if margin == "soft":
    loss = jnp.sum(jnp.where(mask, losses, 0.0)) / n_all
  else:
    loss = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(act), 1)
  nn_idx = jnp.argmin(jnp.where(both & ~eye, dist, jnp.inf), axis=1)
  top1 = jnp.take_along_axis(same, nn_idx[:, None], 1)[:, 0]
  nv = jnp.maximum(jnp.sum(valid), 1)
  metrics = {"active": jnp.sum(act) / n_all,
             "top1": jnp.sum(jnp.where(valid, top1, False)) / nv}
  return loss, metrics


def triplet_loss(emb: jnp.ndarray, pids: jnp.ndarray, kind: str = "batch_hard",
                 margin: Margin = "soft", valid: jnp.ndarray | None = None):
  """Dispatches on `kind` ("batch_hard" | "batch_all")."""
  if kind == "batch_hard":
    return batch_hard_triplet_loss(emb, pids, margin, valid)
  if kind == "batch_all":
    return batch_all_triplet_loss(emb, pids, margin, valid)
  raise ValueError(f"config.loss.kind={kind!r} is unknown; use 'batch_hard' or 'batch_all'")
