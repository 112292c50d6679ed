"""The core's guarantees for every registered method, on tiny synthetic configs:
8-device pmap = 1 device, kill-and-resume bit-identical (inside and between stages),
and the training CLI ending with eval_results.json. Several processes: tests/test_launch.py
(the SLURM and TPU scripts, 2 processes x 4 devices = 1 x 8; the family-independent
process slicing of every batch is the data pipeline's, tested in test_pipeline)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from method_cases import METHODS, REPO, _env, data_dir, tiny_config  # noqa: F401 (fixture)
from reid_jax import methods
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import loop, parallel

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
