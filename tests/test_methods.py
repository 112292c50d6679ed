"""The core's guarantees for every registered method, on tiny synthetic configs:
8-device pmap = 1 device, kill-and-resume bit-identical (inside and between stages),
and the training CLI ending with eval_results.json. Several processes: tests/test_launch.py
(the SLURM and TPU scripts, 2 processes x 4 devices = 1 x 8; the family-independent
process slicing of every batch is the data pipeline's, tested in test_pipeline)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from reid_jax import methods
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import loop, parallel

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


def _steps(stage: loop.Stage, n_devices: int, batches: list[dict]):
  """Runs the stage's step on the first n_devices devices over the given host batches."""
  devices = jax.devices()[:n_devices]
  state = parallel.replicate(stage.init_state(None), devices=devices)
  step = jax.pmap(stage.step_fn, axis_name=parallel.AXIS, devices=devices)
  for i, b in enumerate(batches, start=1):
    keys = parallel.replicate(loop.step_key(0, i), devices=devices)
    state, metrics = step(state, parallel.shard(b, n_devices), keys)
  return parallel.unreplicate(state), parallel.unreplicate(metrics)


# DaRe's is in test_train; TriNet runs the same train step on a one-exit head, so it is
# not repeated here (26 s). Re-ID done right's classification stage is the classification
# family's step on a GMP head; its own (ranking) step's device equivalence is tested in
# test_done_right (one update, frozen BatchNorm). Here a second step differed by ~1e-3
# (measured): the float32 summation order of 8 devices vs 1 flips near-ties of GMP's
# arg-max, which routes each gradient to one position. PUL's stages are IDE's: stage 0 is
# the ide stage and every round runs classification.train_step (passed here, 84 s).
@pytest.mark.parametrize("method", [m for m in METHODS
                                    if m not in ("dare", "trinet", "done_right", "pul")])
def test_pmap_8_devices_equals_1_device(method, data_dir):
  """The same two global batches on 8 devices and on 1: equal loss and parameters.

  Parameter tolerance 1e-5 relative + 1e-6 absolute (float32 summation order of the cross-device
  means). Dropout is set to 0: its masks are drawn per device (each device folds its
  index into the step key), so with dropout the runs differ by design. Adam runs with
  eps=1 (updates linear in the gradient, as in test_train).
  """
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  c = tiny_config(method, data_dir)
  if method in ("dare", "trinet"):
    c.optimizer.eps, c.optimizer.lr = 1.0, 1e-2
  else:
    c.model.dropout = 0.0
    c.model.verif_dropout = 0.0
  stage = methods.get(method).stages(c)[0]
  it = stage.make_iterator()
  batches = [stage.prepare_batch(next(it), s) for s in (1, 2)]
  s8, m8 = _steps(stage, 8, batches)
  s1, m1 = _steps(stage, 1, batches)
  # Loss: 5e-5 relative; a hinge over hard-mined distances amplifies the float32
  # summation-order error (TriNet's 0.806857 vs 0.806865 was 1.02e-5 apart).
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=5e-5)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(s1.params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(s8.params):
    np.testing.assert_allclose(leaf, flat1[path], rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         s8.batch_stats, s1.batch_stats)
  assert int(s8.step) == int(s1.step) == 2


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


# DaRe's resume is tested in test_train (TriNet is DaRe with one exit). IDE, APR and PCB
# share one loop, sampler and checkpointed iterator: PCB's cases below resume that
# iterator inside a stage (kill 9) and between stages (kill 6), so IDE's own case (55 s)
# is not repeated. Verification+identification has its own (pair) sampler, whose state
# must come back too.
RESUME_CASES = [("verif_ident", {}, 5)] + [
    # PCB + RPP: 6 PCB steps then 4 RPP steps; killed inside the RPP stage, and right
    # after the PCB stage's last (saved) step, i.e. between the stages.
    ("pcb", {"rpp": True}, 9), ("pcb", {"rpp": True}, 6)]


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


@pytest.mark.parametrize("method,model_overrides,crash", RESUME_CASES,
                         ids=[f"{m}{'_rpp' if o else ''}_kill{k}" for m, o, k in RESUME_CASES])
def test_kill_and_resume_is_bit_identical(method, model_overrides, crash, data_dir, tmp_path,
                                          uninterrupted):
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


def _env(n_devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env


def _cli(method: str, data_dir: str, workdir: str, steps: int, extra=()) -> list[str]:
  cmd = [sys.executable, "-m", "reid_jax.train", f"--config=configs/{method}.py:synthetic",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
         f"--config.train.steps={steps}", "--config.train.checkpoint_every=0"] + TINY_FLAGS
  cmd += ["--config.input.batch_size=8", "--config.model.bottleneck=16",
          "--config.model.reduce_dim=8", "--config.model.num_parts=2",
          f"--config.optimizer.decay_steps={steps}"]
  return cmd + list(extra)


EXITS = {"ide": {"ide"}, "pcb": {"pcb", "pcb_g"}, "verif_ident": {"verif_ident"},
         "apr": {"apr"}}


@pytest.mark.parametrize("method", CLASSIFICATION)
def test_cli_trains_and_writes_results(method, data_dir, tmp_path):
  """`python -m reid_jax.train --config=configs/<m>.py:synthetic` ends with
  eval_results.json in the shared format, exits named by the method; only the final
  checkpoint is saved with checkpoint_every=0."""
  wd = str(tmp_path / method)
  r = subprocess.run(_cli(method, data_dir, wd, 2), cwd=REPO, env=_env(1),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(wd, "eval_results.json")))
  assert res["step"] == 2 and res["dataset"] == "synthetic_reid/tiny"
  assert set(res["exits"]) == EXITS[method]
  for m in res["exits"].values():
    assert set(m) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
  assert res["num_valid_queries"] <= res["num_queries"] == 16
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["method"] == method and saved["model"]["num_classes"] > 0
  if method == "apr":
    assert set(res["attributes"]["per_attribute"]) == set(
        __import__("reid_jax.data.attributes", fromlist=["x"]).ATTRIBUTES)
    assert 0.0 <= res["attributes"]["mean"] <= 1.0
  if method == "ide":
    # Evaluating this IDE checkpoint with another method's config: one line naming both.
    r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                        "--config=configs/dare.py:synthetic", f"--workdir={wd}"],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "holds a config.method='ide' run but --config is config.method='dare'" in (
        r.stderr.strip().splitlines()[-1])
    # ... and with its own config, the same numbers as at the end of training.
    r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                        "--config=configs/ide.py:synthetic", f"--workdir={wd}",
                        f"--config.dataset.data_dir={data_dir}"] + TINY_FLAGS
                       + ["--config.model.bottleneck=16"],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # evaluate writes its own file; training's is left as it was.
    again = json.load(open(os.path.join(wd, "evaluate_results.json")))
    np.testing.assert_allclose(again["exits"]["ide"]["mAP"], res["exits"]["ide"]["mAP"],
                               atol=1e-9)
    assert json.load(open(os.path.join(wd, "eval_results.json"))) == res


def test_unknown_method_is_one_line():
  with pytest.raises(ValueError, match=r"config.method='bogus' is not a registered method; "
                                       r"choose one of \['apr', 'dare', 'done_right', 'ide', "
                                       r"'msp_cnn', 'pcb', 'pul', 'trinet', 'verif_ident'\]"):
    methods.get("bogus")


def test_core_imports_no_method_and_no_cli():
  """reid_jax/core imports nothing from reid_jax.methods, reid_jax.train or .evaluate."""
  import ast
  core = os.path.join(REPO, "reid_jax", "core")
  for name in os.listdir(core):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(core, name)).read())
    for node in ast.walk(tree):
      mods = []
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for mod in mods:
        assert not mod.startswith(("reid_jax.methods", "reid_jax.train",
                                   "reid_jax.evaluate")) or mod.startswith(
            "reid_jax.evaluation"), f"{name} imports {mod}"


def test_bad_settings_are_one_line_errors_before_any_work(tmp_path):
  """A bad setting ends `train` with one `error:` line naming the field, exit 1, no
  traceback, and nothing written; an unknown method lists the registered ones."""
  wd = str(tmp_path / "run")
  for flag, message in (("--config.eval.tta=bogus",
                         "error: config.eval.tta='bogus': use none, flip or five_crop"),
                        ("--config.method=bogus",
                         "error: config.method='bogus' is not a registered method"),
                        ("--config.train.steps=-5",
                         "error: config.train.steps=-5: must be at least 1"),
                        ("--config.train.nan_policy=bogus",
                         "error: config.train.nan_policy='bogus': use 'stop'")):
    r = subprocess.run([sys.executable, "-m", "reid_jax.train",
                        "--config=configs/ide.py:synthetic", f"--workdir={wd}", flag],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not os.path.exists(wd)


def test_too_few_identities_is_one_line_and_leaves_the_workdir_reusable(data_dir, tmp_path):
  """P larger than the training split's identities: one line naming config.input.P,
  raised before any model is built; no checkpoint, so a corrected config is accepted."""
  from reid_jax.core import experiment
  c = tiny_config("dare", data_dir)
  c.input.P = 500
  wd = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"^config.input.P=500: PK sampling needs at least P "
                                       r"identities with id >= 1 in the training split, "
                                       r"which has \d+; lower --config.input.P$"):
    methods.get("dare").train_and_evaluate(c, wd, evaluate_at_end=False)
  assert ckpt_lib.Checkpointer(loop.stage_dir(wd)).all_steps() == []
  experiment.check_workdir_config(tiny_config("dare", data_dir), wd)  # accepted


def test_dare_settings_are_checked_before_the_step(data_dir):
  """loss.mining and loss.name are checked by validate (before any work), not inside
  the jitted step."""
  from reid_jax.methods.dare import train as dare_train
  c = tiny_config("dare", data_dir)
  c.loss.mining = "bogus"
  with pytest.raises(ValueError, match=r"^config.loss.mining='bogus': use 'global' or "
                                       r"'device'$"):
    dare_train.validate(c)
  c = tiny_config("dare", data_dir)
  c.loss.name = "bogus"
  with pytest.raises(ValueError, match=r"^config.loss.name='bogus': method dare trains "):
    dare_train.validate(c)
