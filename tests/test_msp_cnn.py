"""MSP-CNN: the JSTL network's sizes and parameter counts (from the prototxt, by hand),
the pair losses against numpy, the CLI's two-stage run, and a kill inside stage 2 that
resumes bit-identically. The NCC loss itself is tested in test_msp_ncc.py; the 8-vs-1
device equivalence of stage 1's step in test_methods.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import msp_cnn
from reid_jax import methods
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import loop
from reid_jax.methods.msp_cnn import train as msp
from reid_jax.methods.msp_cnn.model import JSTLNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"dataset.builder_config": "tiny", "input.height": 32, "input.width": 16,
        "input.worker_count": 0, "input.batch_size": 8, "input.eval_batch_size": 32,
        "model.conv_channels": (8, 8, 8), "model.inception_channels": (8, 8),
        "model.fc_dim": 16, "train.steps": 4, "optimizer.decay_steps": (2,),
        "train.ncc_steps": 4, "train.log_every": 1, "train.checkpoint_every": 2,
        "eval.tta": ""}


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
  c = msp_cnn.get_config("synthetic")
  c.dataset.data_dir = data_dir
  for key, value in TINY.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  from reid_jax.data import sources
  sources.ensure_prepared(tiny_config(d).dataset)
  return d


def test_jstl_network_sizes_and_parameters_follow_the_prototxt():
  """At 144x56: Pool1 72x28x32, the 'b' modules halve (36x14, 18x7, 9x4, as Caffe's
  ceil-mode pools), channels 4C after 'a' and 2C + C_in after 'b'; parameter counts
  of conv1-3 and inception_1a by hand."""
  model = JSTLNet(num_classes=10)
  x = jax.ShapeDtypeStruct((2, 144, 56, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                                       mutable=["intermediates"]), variables, x)
  assert out["pool1"].shape == (2, 72, 28, 32) and out["fc7"].shape == (2, 256)
  assert out["logits"].shape == (2, 10)
  inter = state["intermediates"]
  shapes = {name: inter[name]["__call__"][0].shape for name in inter if name.startswith("inception")}
  assert shapes == {"inception_1a": (2, 72, 28, 256), "inception_1b": (2, 36, 14, 384),
                    "inception_2a": (2, 36, 14, 512), "inception_2b": (2, 18, 7, 768),
                    "inception_3a": (2, 18, 7, 1024), "inception_3b": (2, 9, 4, 1536)}
  p = variables["params"]
  size = lambda tree: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))
  # conv1-3: 3x3 kernels, no bias (BN follows), BN scale + bias of 32 each.
  assert size(p["conv1"]) == 3 * 3 * 3 * 32 + 2 * 32
  assert size(p["conv2"]) == size(p["conv3"]) == 3 * 3 * 32 * 32 + 2 * 32
  # inception_1a on 32 channels, C = 64: four 1x1 (32->64), three 3x3 (64->64), 7 BNs.
  assert size(p["inception_1a"]) == 4 * 32 * 64 + 3 * 9 * 64 * 64 + 7 * 2 * 64
  assert size(p["fc7"]) == 1536 * 256 + 256 and size(p["classifier"]) == 256 * 10 + 10


def _np_contrastive(fa, fb, same, margin):
  """Hadsell et al.'s loss on l2-normalised features, written out in numpy."""
  total = 0.0
  for a, b, y in zip(fa, fb, same):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    total += d ** 2 if y else max(margin - d, 0.0) ** 2
  return total / len(same)


def test_pair_losses_match_numpy():
  rng = np.random.default_rng(0)
  fa, fb = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  fb[4] = fa[4] * 3.0  # a negative at distance 0: the full margin^2 penalty
  same = np.array([1, 0, 0, 1, 0, 0])
  got = msp.contrastive_loss(jnp.asarray(fa, jnp.float32), jnp.asarray(fb, jnp.float32),
                             jnp.asarray(same), 1.0)
  np.testing.assert_allclose(float(got), _np_contrastive(fa, fb, same, 1.0), rtol=1e-5)
  # pair_loss = id_weight * CE(both images) + euclid_weight * contrastive (+ NCC).
  cfg = msp_cnn.get_config().loss
  cfg.id_weight, cfg.euclid_weight, cfg.ncc_weight = 0.5, 2.0, 3.0
  logits = rng.normal(size=(12, 4))
  labels = rng.integers(0, 4, size=12)
  out = {"logits": jnp.asarray(logits, jnp.float32), "fc7": jnp.asarray(
      np.concatenate([fa, fb]), jnp.float32),
         "pool1": jnp.asarray(rng.normal(size=(12, 8, 6, 2)), jnp.float32)}
  batch = {"label": jnp.asarray(labels[:6]), "label_b": jnp.asarray(labels[6:]),
           "same": jnp.asarray(same)}
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -logp[np.arange(12), labels].mean()
  loss, m = msp.pair_loss(out, batch, cfg, use_ncc=False)
  np.testing.assert_allclose(float(loss), 0.5 * ce + 2.0 * _np_contrastive(fa, fb, same, 1.0),
                             rtol=1e-5)
  loss_ncc, m_ncc = msp.pair_loss(out, batch, cfg, use_ncc=True)
  np.testing.assert_allclose(float(loss_ncc), float(loss) + 3.0 * float(m_ncc["ncc_loss"]),
                             rtol=1e-6)
  assert "ncc_loss" not in m and float(m_ncc["ncc_loss"]) > 0


def _cli(data_dir, workdir, extra=()):
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  return [sys.executable, "-m", "reid_jax.train", "--config=configs/msp_cnn.py:synthetic",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"] + flags + list(extra)


class _Interrupt(Exception):
  pass


def test_cli_runs_both_stages_and_a_kill_in_stage_2_resumes_bit_identically(data_dir, tmp_path):
  """`python -m reid_jax.train --config=configs/msp_cnn.py:synthetic` trains both stages
  and writes eval_results.json (stage 1's numbers included). In process, a run killed
  at the 3rd step of stage 2 resumes from its checkpoint and ends with the same
  parameters, bit for bit, as the CLI's uninterrupted one; the finished stage 1 is
  restored, not retrained."""
  full = str(tmp_path / "cli")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}  # conftest's 8 devices
  r = subprocess.run(_cli(data_dir, full), cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(full, "eval_results.json")))
  assert res["step"] == 8 and set(res["exits"]) == {"msp_cnn"}
  assert set(res["similarity_stage"]["exits"]) == {"msp_cnn"}
  assert res["similarity_stage"]["step"] == 4
  for stage in ("similarity", "ncc"):
    assert ckpt_lib.Checkpointer(loop.stage_dir(full, stage)).latest_step() == 4
  metrics = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  assert any("train/ncc/ncc_loss" in m for m in metrics)
  assert not any("train/similarity/ncc_loss" in m for m in metrics)

  c = tiny_config(data_dir)
  family = methods.get("msp_cnn")
  calls = {"n": 0}

  def crash(step):
    calls["n"] += 1
    if calls["n"] == 3:
      raise _Interrupt()
  # The broken run starts from the CLI run's finished stage 1 (restored, not retrained:
  # resuming a finished stage is the core's, tested for every method in test_methods).
  broken = str(tmp_path / "broken")
  shutil.copytree(loop.stage_dir(full, "similarity"), loop.stage_dir(broken, "similarity"))
  with pytest.raises(_Interrupt):
    family.train_and_evaluate(c, broken, evaluate_at_end=False, step_callback=crash)
  assert ckpt_lib.Checkpointer(loop.stage_dir(broken, "ncc")).latest_step() == 2
  family.train_and_evaluate(c, broken, evaluate_at_end=False)
  va, sa = family.load_variables(c, full)  # the CLI's run: same devices, same program
  vb, sb = family.load_variables(c, broken)
  assert sa == sb == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)


def test_bad_settings_are_one_line_errors(data_dir):
  c = tiny_config(data_dir)
  c.input.height, c.input.width = 8, 8  # Pool1 4x4 < the 5x5 NCC patch
  with pytest.raises(ValueError, match=r"config.input.height/width=8x8 .*ncc_patch"):
    msp.validate(c)
  c = tiny_config(data_dir)
  c.model.inception_channels = (8, 8, 8)
  with pytest.raises(ValueError, match="config.model.inception_channels=.*pairs"):
    msp.validate(c)
  c = tiny_config(data_dir)
  c.input.augment.resize_scale = 0.9
  with pytest.raises(ValueError, match="config.input.augment.resize_scale=0.9: the random crop"):
    msp.validate(c)
  c = tiny_config(data_dir)
  c.input.batch_size = 12
  with pytest.raises(ValueError, match="config.input.batch_size"):
    msp.validate(c)
