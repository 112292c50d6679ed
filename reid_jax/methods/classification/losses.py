"""Losses of the classification family, each `(outputs, batch, cfg) -> (loss, metrics)`.

`batch` holds `label` (the training-identity class, 0..C-1) and, per method, `label_b`
and `same` (pairs) or `attributes` / `attributes_valid` (APR).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from reid_jax.losses import triplet_loss
from reid_jax.losses.classification import cross_entropy, top1  # noqa: F401


def ide_loss(out: dict, batch: dict, cfg: ml_collections.ConfigDict):
  """Softmax over identities; optionally + a batch-hard triplet loss on the pre-BN
  (`bnneck`) or BN feature (with a PK sampler), weighted by `cfg.triplet_weight`."""
  loss = cross_entropy(out["logits"], batch["label"], cfg.label_smoothing)
  metrics = {"loss/id": loss, "top1/id": top1(out["logits"], batch["label"])}
  if cfg.triplet_weight:
    feat = out["pre_bn"] if cfg.bnneck else out["feature"]
    margin = "soft" if cfg.triplet_margin == "soft" else float(cfg.triplet_margin)
    tl, m = triplet_loss(feat, batch["label"], "batch_hard", margin)
    metrics.update({"loss/triplet": tl, "active/triplet": m["active"]})
    loss = loss + cfg.triplet_weight * tl
  return loss, metrics


def pcb_loss(out: dict, batch: dict, cfg: ml_collections.ConfigDict):
  """PCB (Sun et al. 2018, §3.1): the sum of the part classifiers' softmax losses."""
  per_part = jax.vmap(lambda lg: cross_entropy(lg, batch["label"], cfg.label_smoothing))(
      out["part_logits"])
  acc = top1(jnp.sum(jax.nn.softmax(out["part_logits"], -1), 0), batch["label"])
  return jnp.sum(per_part), {"loss/part_mean": jnp.mean(per_part), "top1/id": acc}


def verif_ident_loss(out: dict, batch: dict, cfg: ml_collections.ConfigDict):
  """Zheng et al. TOMM 2017: w_id * (CE(a) + CE(b)) + w_verif * CE(same | (f_a - f_b)^2)."""
  la, lb = jnp.split(out["logits"], 2)
  id_a = cross_entropy(la, batch["label"], cfg.label_smoothing)
  id_b = cross_entropy(lb, batch["label_b"], cfg.label_smoothing)
  verif = cross_entropy(out["verif_logits"], batch["same"])
  loss = cfg.id_weight * (id_a + id_b) + cfg.verif_weight * verif
  return loss, {"loss/id": 0.5 * (id_a + id_b), "loss/verif": verif,
                "top1/id": top1(la, batch["label"]),
                "top1/verif": top1(out["verif_logits"], batch["same"])}


def apr_loss(out: dict, batch: dict, cfg: ml_collections.ConfigDict):
  """APR (Lin et al. 2019): lambda * CE_id + (1/M) sum_j CE_attribute_j; images whose
  identity has no attribute annotation add nothing to the attribute terms."""
  ide = cross_entropy(out["logits"], batch["label"], cfg.label_smoothing)
  valid = batch["attributes_valid"].astype(jnp.float32)
  attrs = batch["attributes"]
  m = attrs.shape[-1]
  terms = [cross_entropy(out[f"attr/{j}"], jnp.maximum(attrs[:, j], 0), weights=valid)
           for j in range(m)]
  accs = [jnp.sum((jnp.argmax(out[f"attr/{j}"], -1) == attrs[:, j]) * valid)
          / jnp.maximum(jnp.sum(valid), 1.0) for j in range(m)]
  attr = sum(terms) / m
  loss = cfg.id_weight * ide + attr
  if cfg.get("normalize_weights", False):  # keeps the ID term's step near the IDE recipe's
    loss = loss / (cfg.id_weight + 1.0)
  return loss, {"loss/id": ide, "loss/attributes": attr,
                                      "top1/id": top1(out["logits"], batch["label"]),
                                      "accuracy/attributes": sum(accs) / m}


LOSSES = {"ide": ide_loss, "pcb": pcb_loss, "verif_ident": verif_ident_loss,
          "apr": apr_loss}
