"""Shared by the test_methods*.py files: tiny synthetic configs of every registered
method, the prepared tiny dataset fixture and the environment of CLI subprocesses."""

from __future__ import annotations

import importlib
import os

import jax
import ml_collections
import numpy as np
import pytest

from reid_jax import methods
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import loop

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


class _Interrupt(Exception):
  pass


def _crash_at(n: int):
  """A step callback raising at the n-th step of the whole run (all stages counted)."""
  calls = {"n": 0}

  def callback(step):
    calls["n"] += 1
    if calls["n"] == n:
      raise _Interrupt()
  return callback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The uninterrupted reference run of a resume case, trained once per module."""
  runs = {}

  def get(method: str, c: ml_collections.ConfigDict) -> str:
    key = (method, c.to_json())
    if key not in runs:
      runs[key] = str(tmp_path_factory.mktemp(f"full_{method}"))
      methods.get(method).train_and_evaluate(c, runs[key], evaluate_at_end=False)
    return runs[key]
  return get


def check_kill_and_resume(method: str, model_overrides: dict, crash: int, data_dir: str,
                          tmp_path, uninterrupted) -> None:
  """A run killed at step `crash` and re-run ends bit-identical to an uninterrupted one."""
  c = tiny_config(method, data_dir)
  c.model.update(model_overrides)
  if model_overrides.get("rpp"):
    c.train.rpp_steps = 4
  family = methods.get(method)
  full = uninterrupted(method, c)
  broken = str(tmp_path / "broken")
  with pytest.raises(_Interrupt):
    family.train_and_evaluate(c, broken, evaluate_at_end=False, step_callback=_crash_at(crash))
  family.train_and_evaluate(c, broken, evaluate_at_end=False)  # resumes
  va, sa = family.load_variables(c, full)
  vb, sb = family.load_variables(c, broken)
  assert sa == sb == (4 if model_overrides.get("rpp") else 6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)
  if model_overrides.get("rpp"):  # the finished PCB stage was restored, not retrained
    pcb_dir = loop.stage_dir(broken, "pcb")
    assert ckpt_lib.Checkpointer(pcb_dir).latest_step() == 6
