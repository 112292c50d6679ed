"""Shared by the test_methods*.py files: tiny synthetic configs of every registered
method, the prepared tiny dataset fixture and the environment of CLI subprocesses."""

from __future__ import annotations

import importlib
import os

import ml_collections
import pytest

from reid_jax import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = sorted(methods.METHODS)
CLASSIFICATION = ("ide", "pcb", "verif_ident", "apr")
TINY_FLAGS = ["--config.dataset.builder_config=tiny", "--config.input.height=32",
              "--config.input.width=16", "--config.input.worker_count=0",
              "--config.eval.tta=", "--config.model.width=8",
              "--config.train.eval_every=0", "--config.train.log_every=1",
              "--config.input.eval_batch_size=32"]


def tiny_config(method: str, data_dir: str, steps: int = 6) -> ml_collections.ConfigDict:
  """configs/<method>.py:synthetic on the tiny synthetic set with a tiny network."""
  module = importlib.import_module(f"configs.{method}")
  c = module.get_config("synthetic")
  c.dataset.builder_config = "tiny"
  c.dataset.data_dir = data_dir
  c.input.height, c.input.width = 32, 16
  c.input.worker_count = 0
  c.input.eval_batch_size = 32
  c.model.width = 8
  c.train.steps = steps
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.eval.tta = ""
  if method in ("dare", "trinet"):
    c.input.P, c.input.K = 4, 2
    c.model.hidden_dim, c.model.embed_dim = 16, 8
    c.optimizer.decay_start = steps // 2
  else:
    if method == "done_right":  # the tiny set has 72 training images
      c.input.longer_side, c.mining.pool, c.mining.top = 32, 40, 5
      c.model.embed_dim = 8
    if method == "msp_cnn":  # one inception pair instead of three: a third of the compile
      c.model.conv_channels, c.model.inception_channels, c.model.fc_dim = (8, 8, 8), (8, 8), 16
      c.train.ncc_steps = 4
      c.optimizer.decay_steps = (steps // 2,)
    c.input.batch_size = 8
    c.model.bottleneck = 16
    c.model.reduce_dim = 8
    c.model.num_parts = 2
    c.optimizer.decay_steps = (steps // 2,)
    c.input.neg_ramp_steps = steps
  return c



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  from reid_jax.data import sources
  sources.ensure_prepared(tiny_config("ide", d).dataset)
  return d


def _env(n_devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env
