"""The classification family's pieces against numpy re-derivations: stripe and refined
part pooling, the IDE / PCB / verification / APR losses, identity-to-class labels, and
the one-line setting errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import apr, ide, pcb, verif_ident
from reid_jax.losses import batch_hard_triplet_loss
from reid_jax.methods.classification import losses, models, train


def _np_ce(logits, labels, smoothing=0.0):
  logits = np.asarray(logits, np.float64)
  n = logits.shape[-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  t = np.full_like(logp, smoothing / n)
  t[np.arange(len(labels)), labels] += 1.0 - smoothing
  return -(t * logp).sum(-1)


def test_stripe_pool_equals_loop():
  x = np.random.default_rng(0).normal(size=(2, 6, 3, 4)).astype(np.float32)
  out = np.asarray(models.stripe_pool(jnp.asarray(x), 3))
  for b in range(2):
    for p in range(3):
      np.testing.assert_allclose(out[b, p], x[b, 2 * p:2 * p + 2].mean((0, 1)), rtol=1e-5,
                                 atol=1e-7)
  with pytest.raises(ValueError, match="model.num_parts=4 does not divide"):
    models.stripe_pool(jnp.asarray(x), 4)


def test_refined_pool_equals_loop_and_hard_assignment_gives_stripes():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  logits = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
  out = np.asarray(models.refined_pool(jnp.asarray(f), jnp.asarray(logits)))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for b in range(2):
    for i in range(2):
      w = p[b, :, :, i]
      ref = (w[..., None] * f[b]).sum((0, 1)) / w.sum()
      np.testing.assert_allclose(out[b, i], ref, rtol=1e-5, atol=1e-6)
  # Rows 0-1 sent to part 0 and rows 2-3 to part 1 with near-certainty: PCB's stripes.
  hard = np.zeros((2, 4, 3, 2), np.float32)
  hard[:, :2, :, 0] = hard[:, 2:, :, 1] = 50.0
  np.testing.assert_allclose(models.refined_pool(jnp.asarray(f), jnp.asarray(hard)),
                             models.stripe_pool(jnp.asarray(f), 2), rtol=1e-5, atol=1e-6)


def _loss_cfg(**kw):
  c = ml_collections.ConfigDict({"label_smoothing": 0.0, "triplet_weight": 0.0,
                                 "triplet_margin": "soft", "bnneck": True, "id_weight": 1.0,
                                 "verif_weight": 1.0, "normalize_weights": False})
  c.update(kw)
  return c


def test_ide_loss_smoothing_and_triplet_option():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 5)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  pre = rng.normal(size=(8, 4)).astype(np.float32)
  out = {"logits": jnp.asarray(logits), "pre_bn": jnp.asarray(pre),
         "feature": jnp.asarray(pre * 2)}
  batch = {"label": jnp.asarray(labels)}
  loss, _ = losses.ide_loss(out, batch, _loss_cfg(label_smoothing=0.1))
  np.testing.assert_allclose(loss, _np_ce(logits, labels, 0.1).mean(), rtol=1e-5)
  loss, m = losses.ide_loss(out, batch, _loss_cfg(triplet_weight=0.5))
  tl, _ = batch_hard_triplet_loss(jnp.asarray(pre), jnp.asarray(labels), "soft")
  np.testing.assert_allclose(loss, _np_ce(logits, labels).mean() + 0.5 * float(tl), rtol=1e-5)
  assert "loss/triplet" in m


def test_pcb_loss_is_sum_of_part_losses():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 4, 6)).astype(np.float32)  # parts, batch, classes
  labels = np.array([1, 5, 0, 2])
  loss, _ = losses.pcb_loss({"part_logits": jnp.asarray(logits)},
                            {"label": jnp.asarray(labels)}, _loss_cfg())
  np.testing.assert_allclose(loss, sum(_np_ce(l, labels).mean() for l in logits), rtol=1e-5)


def test_verif_ident_loss_weights():
  rng = np.random.default_rng(4)
  la, lb = rng.normal(size=(2, 3, 5)).astype(np.float32)
  v = rng.normal(size=(3, 2)).astype(np.float32)
  a, b, same = np.array([0, 1, 2]), np.array([0, 3, 4]), np.array([1, 0, 0])
  out = {"logits": jnp.asarray(np.concatenate([la, lb])), "verif_logits": jnp.asarray(v)}
  batch = {"label": jnp.asarray(a), "label_b": jnp.asarray(b), "same": jnp.asarray(same)}
  loss, _ = losses.verif_ident_loss(out, batch, _loss_cfg(id_weight=0.5, verif_weight=1.0))
  ref = 0.5 * _np_ce(la, a).mean() + 0.5 * _np_ce(lb, b).mean() + _np_ce(v, same).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_apr_loss_masks_unannotated_identities():
  rng = np.random.default_rng(5)
  m, bsz = 3, 4
  out = {"logits": jnp.asarray(rng.normal(size=(bsz, 6)).astype(np.float32))}
  attr_logits = [rng.normal(size=(bsz, 2 if j else 4)).astype(np.float32) for j in range(m)]
  out.update({f"attr/{j}": jnp.asarray(a) for j, a in enumerate(attr_logits)})
  attrs = np.array([[3, 1, 0], [0, 0, 1], [-1, -1, -1], [2, 1, 1]])
  valid = np.array([True, True, False, True])
  labels = np.array([0, 1, 2, 3])
  batch = {"label": jnp.asarray(labels), "attributes": jnp.asarray(attrs),
           "attributes_valid": jnp.asarray(valid)}
  loss, _ = losses.apr_loss(out, batch, _loss_cfg(id_weight=8.0))
  attr_ref = np.mean([_np_ce(attr_logits[j][valid], attrs[valid, j]).mean() for j in range(m)])
  ref = 8.0 * _np_ce(np.asarray(out["logits"]), labels).mean() + attr_ref
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  loss_n, _ = losses.apr_loss(out, batch, _loss_cfg(id_weight=8.0, normalize_weights=True))
  np.testing.assert_allclose(loss_n, ref / 9.0, rtol=1e-5)


def test_class_labels_rank_training_identities():
  ids = np.array([2, 7, 10, 1500], np.int32)
  np.testing.assert_array_equal(train.class_labels(ids, np.array([10, 2, 1500, 7, 2])),
                                [2, 0, 3, 1, 0])
  with pytest.raises(ValueError, match="not training classes"):
    train.class_labels(ids, np.array([2, 3]))


def test_settings_are_checked_before_any_work():
  c = ide.get_config("synthetic")
  c.input.sampler = "pairs"
  with pytest.raises(ValueError, match="verif_ident trains on 'pairs'"):
    train.validate(c)
  c = ide.get_config("synthetic")
  c.loss.triplet_weight = 1.0
  with pytest.raises(ValueError, match="set --config.input.sampler=pk"):
    train.validate(c)
  c = ide.get_config("synthetic")
  c.eval.tta = "bogus"
  with pytest.raises(ValueError, match=r"config.eval.tta='bogus': use none, flip or five_crop"):
    train.validate(c)
  c = pcb.get_config("synthetic,rpp")
  c.train.rpp_steps = 0
  with pytest.raises(ValueError, match="config.train.rpp_steps must be >= 1"):
    train.validate(c)
  for cfg in (ide.get_config("triplet"), pcb.get_config(), verif_ident.get_config(),
              apr.get_config("synthetic")):
    train.validate(cfg)


def test_ide_model_outputs_and_dropout_needs_a_key():
  """Shapes of every output; dropout active in training (two keys, two results),
  inactive at test time."""
  c = ide.get_config("synthetic")
  c.model.width, c.model.bottleneck = 8, 16
  c.input.height, c.input.width = 32, 16
  model = train.build_model(c, 7)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 16, 3)), jnp.float32)
  v = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, x)
  out = model.apply(v, x)
  assert out["feature"].shape == (2, 16) and out["logits"].shape == (2, 7)
  run = lambda k: model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)},
                              mutable=["batch_stats"])[0]["logits"]
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(model.apply(v, x)["logits"], out["logits"])
