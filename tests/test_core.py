"""The shared core against independent references: optimisers (PyTorch SGD semantics,
parameter groups, step decay, accumulation), the learning rate read from the state,
evaluation protocols by name, and fit's divergence guard / final save."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from reid_jax import config_lib, evaluation
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import evaluators, loop, optim, state as state_lib
from reid_jax.core.writer import MetricWriter


def _sgd_cfg(**kw) -> ml_collections.ConfigDict:
  c = config_lib.base_config().optimizer
  c.name = "sgd"
  c.lr, c.momentum, c.nesterov, c.weight_decay = 0.05, 0.9, True, 5e-4
  c.decay_steps, c.decay_factor = (2,), 0.1
  c.update(kw)
  return c


def _torch_sgd_reference(params, grads_seq, lrs_seq, momentum, wd, nesterov):
  """torch.optim.SGD(momentum, nesterov, weight_decay, dampening=0) written out in numpy:
  g += wd*p; buf = g (first step) or momentum*buf + g; g = g + momentum*buf (nesterov)
  or buf; p -= lr*g. One lr per group and step."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = {}
  for grads, lrs in zip(grads_seq, lrs_seq):
    for k in p:
      g = np.asarray(grads[k], np.float64) + wd * p[k]
      buf[k] = g if k not in buf else momentum * buf[k] + g
      d = g + momentum * buf[k] if nesterov else buf[k]
      p[k] = p[k] - lrs[k] * d
  return p


def test_sgd_groups_step_decay_match_torch_semantics():
  """Backbone at 0.1x the head's lr, Nesterov, coupled weight decay, x0.1 after step 2."""
  rng = np.random.default_rng(0)
  params = {"backbone": rng.normal(size=(3, 2)).astype(np.float32),
            "head": rng.normal(size=(4,)).astype(np.float32)}
  cfg = _sgd_cfg()
  cfg.lr_mult = ml_collections.ConfigDict({"backbone": 0.1})
  tx = optim.make_optimizer(cfg, 10, params)
  opt_state = tx.init(params)
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(4)]
  p = params
  seen_lrs = []
  for g in grads_seq:
    updates, opt_state = tx.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
    seen_lrs.append(optim.current_learning_rates(opt_state))
  # Updates 1-2 at the base rate, 3-4 after the x0.1 step (PyTorch MultiStepLR at 2).
  lrs_seq = [{"head": 0.05 * f, "backbone": 0.005 * f} for f in (1, 1, 0.1, 0.1)]
  ref = _torch_sgd_reference(params, grads_seq, lrs_seq, 0.9, 5e-4, True)
  for k in params:
    np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-7)
  # The rate read from the optimiser state is the one the last update used.
  np.testing.assert_allclose([s["lr/default"] for s in seen_lrs], [0.05, 0.05, 0.005, 0.005],
                             rtol=1e-6)
  np.testing.assert_allclose([s["lr/backbone"] for s in seen_lrs],
                             [0.005, 0.005, 0.0005, 0.0005], rtol=1e-6)


def test_adam_schedule_and_single_group_lr():
  """TriNet/DaRe Adam: lr constant to t0 then base*(end/base)^((t-t0)/(T-t0))."""
  c = config_lib.base_config().optimizer
  c.lr, c.end_lr, c.decay_start = 1e-3, 1e-6, 2
  tx = optim.make_optimizer(c, 5)
  params = {"w": jnp.ones(3)}
  s = tx.init(params)
  lrs = []
  for _ in range(5):
    _, s = tx.update({"w": jnp.ones(3)}, s, params)
    lrs.append(optim.current_learning_rates(s)["lr"])
  expected = [1e-3 * (1e-3) ** min(max(t - 2, 0) / 3, 1) for t in range(5)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-5)


def test_poly_schedule_is_caffes():
  """schedule='poly': Caffe's lr_policy "poly", base * (1 - t / T)^power (JSTL solver)."""
  c = config_lib.base_config().optimizer
  c.name, c.schedule, c.lr, c.power = "sgd", "poly", 0.01, 0.5
  sched = optim.make_schedule(c, 20)
  got = [float(sched(t)) for t in (0, 5, 10, 19, 20, 25)]
  want = [0.01 * (1 - min(t, 20) / 20) ** 0.5 for t in (0, 5, 10, 19, 20, 25)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_accumulation_equals_mean_gradient_step():
  """optax.MultiSteps over k calls == one step on the mean of the k gradients."""
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(5,)).astype(np.float32)}
  grads = [{"w": rng.normal(size=(5,)).astype(np.float32)} for _ in range(3)]
  cfg = _sgd_cfg(decay_steps=(), accumulate_steps=3)
  tx = optim.make_optimizer(cfg, 10, params)
  s, p = tx.init(params), params
  for i, g in enumerate(grads):
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    if i < 2:
      np.testing.assert_array_equal(p["w"], params["w"])  # nothing applied yet
  mean = {"w": np.mean([g["w"] for g in grads], 0)}
  ref = _torch_sgd_reference(params, [mean], [{"w": 0.05}], 0.9, 5e-4, True)
  np.testing.assert_allclose(p["w"], ref["w"], rtol=1e-5, atol=1e-7)


def test_optimizer_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.optimizer.name='lamb': use one of"):
    optim.make_optimizer(_sgd_cfg(name="lamb"), 10)
  cfg = _sgd_cfg()
  cfg.lr_mult = ml_collections.ConfigDict({"trunk": 0.1})
  with pytest.raises(ValueError, match=r"lr_mult names \['trunk'\], which are not top-level"):
    optim.make_optimizer(cfg, 10, {"backbone": jnp.ones(1), "head": jnp.ones(1)})


def test_market_protocol_equals_evaluate_rank_and_counts_skipped_queries():
  """The registry's 'market' protocol on embeddings == evaluate_rank on their euclidean
  distances; a query whose identity has no cross-camera gallery match is skipped and
  counted."""
  rng = np.random.default_rng(0)
  q = {"a": rng.normal(size=(6, 4)).astype(np.float32)}
  g = {"a": rng.normal(size=(10, 4)).astype(np.float32)}
  ql = {"person_id": np.array([1, 2, 3, 4, 5, 9]), "camera_id": np.zeros(6, int)}
  gl = {"person_id": np.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        "camera_id": np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 0])}  # id 9 only in camera 0
  config = config_lib.base_config()
  config.dataset.name = "x"
  res = evaluators.evaluate_embeddings(config, (q, ql, g, gl), step=3)
  dist = np.sqrt(((q["a"][:, None] - g["a"][None]) ** 2).sum(-1))
  ref = evaluation.evaluate_rank(dist, ql["person_id"], gl["person_id"], ql["camera_id"],
                                 gl["camera_id"])
  assert res["num_queries"] == 6 and res["num_valid_queries"] == ref["num_valid_queries"] == 5
  np.testing.assert_allclose(res["exits"]["a"]["mAP"], ref["mAP"], rtol=1e-6)
  np.testing.assert_allclose(res["exits"]["a"]["rank1"], ref["cmc"][0], rtol=1e-6)
  assert "1 without a cross-camera match" in evaluators.format_table(res)
  config.eval.protocol = "market,nope"
  with pytest.raises(ValueError, match=r"unknown \['nope'\]; registered protocols"):
    evaluators.evaluate_embeddings(config, (q, ql, g, gl), step=3)


class _Ones:
  """An endless iterator of constant batches with the get/set_state checkpoints need."""

  def __init__(self, n: int, nan_at: tuple[int, ...] = ()):
    self.n, self.pos, self.nan_at = n, 0, nan_at

  def __iter__(self):
    return self

  def __next__(self):
    self.pos += 1
    return {"x": np.full(self.n, np.nan if self.pos in self.nan_at else 1.0, np.float32)}

  def get_state(self) -> bytes:
    return str(self.pos).encode()

  def set_state(self, state: bytes) -> None:
    self.pos = int(state)

  def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after restoring
    pass


def _toy_fit(tmp_path, lr: float, steps: int, checkpoint_every: int, nan_at=(), **cfg_kw):
  """fit() on a 1-parameter quadratic with SGD: a minimal, method-free state. The data
  is all ones, NaN at the steps in `nan_at` (the injected fault)."""
  def step_fn(state, batch, rng):
    loss, g = jax.value_and_grad(lambda p: jnp.sum((p["w"] - batch["x"].mean()) ** 2))(
        state.params)
    g = jax.lax.pmean(g, "batch")
    return state.apply_gradients(grads=g), {"loss": jax.lax.pmean(loss, "batch")}

  tx = optax.sgd(lr)
  state = state_lib.create(None, {"params": {"w": jnp.zeros(())}}, tx)
  cfg = loop.FitConfig(steps=steps, log_every=cfg_kw.pop("log_every", 1),
                       checkpoint_every=checkpoint_every, **cfg_kw)
  n = jax.local_device_count()
  it = _Ones(n, nan_at)
  return loop.fit(state, step_fn, it, ckpt_dir=str(tmp_path / "ck"), cfg=cfg,
                  prepare_batch=lambda b, s: b, examples_per_step=n,
                  writer=MetricWriter(str(tmp_path), steps, enabled=False))


def _w(step: int, skipped: int = 0) -> float:
  """The toy's parameter after `step` steps of w <- w - 0.2 (w - 1) from 0, `skipped`
  of them dropped: 1 - 0.8 ** (applied steps)."""
  return 1 - 0.8 ** (step - skipped)


def test_fit_stops_on_divergence_and_never_saves_a_nan_state(tmp_path):
  # lr = NaN: the loss of step 1 is finite (computed before the update), its update is
  # not; it is never applied and nothing is saved.
  with pytest.raises(loop.TrainingDiverged,
                     match=r"^training diverged at step 1: the update \(parameters, or a "
                           r"loss on another device\) not finite \(the update was not "
                           r"applied and nothing non-finite was saved; no checkpoint was "
                           r"saved\); lower the learning rate and re-run, or set "
                           r"--config.train.nan_policy=skip$"):
    _toy_fit(tmp_path, float("nan"), 4, 2)
  assert ckpt_lib.Checkpointer(str(tmp_path / "ck")).all_steps() == []


def test_nan_at_a_step_stops_keeps_good_checkpoints_and_resumes(tmp_path):
  """NaN data at step 7 of 10 (checkpoints every 2, keep 2): the run stops naming step 7,
  the loss and the last good checkpoint (6); the checkpoints left are 4 and 6, finite;
  a re-run on sane data resumes from 6 and ends where an uninterrupted run does."""
  ck = str(tmp_path / "ck")
  with pytest.raises(loop.TrainingDiverged,
                     match=r"^training diverged at step 7: loss not finite .*the last good "
                           r"checkpoint is step 6 in .*ck\)"):
    _toy_fit(tmp_path, 0.1, 10, 2, nan_at=(7,), keep_checkpoints=2, log_every=3)
  ckpt = ckpt_lib.Checkpointer(ck)
  assert ckpt.all_steps() == [4, 6]
  template = state_lib.create(None, {"params": {"w": jnp.zeros(())}}, optax.sgd(0.1))
  for step in (4, 6):
    np.testing.assert_allclose(ckpt.restore(step, template).params["w"], _w(step),
                               rtol=1e-6)
  ckpt.close()
  final = _toy_fit(tmp_path, 0.1, 10, 2, keep_checkpoints=2)
  np.testing.assert_allclose(final.params["w"], _w(10), rtol=1e-6)
  assert int(final.step) == 10


def test_nan_policy_skip_drops_updates_up_to_the_limit(tmp_path):
  """nan_policy=skip: NaN data at steps 3 and 5 -> those two updates are dropped (w as
  after 6 of 8 steps), the log says 2 skipped; with nan_skip_limit=1 the second skip
  ends the run."""
  final = _toy_fit(tmp_path / "a", 0.1, 8, 4, nan_at=(3, 5), nan_policy="skip")
  np.testing.assert_allclose(final.params["w"], _w(8, skipped=2), rtol=1e-6)
  assert np.isfinite(final.params["w"])
  with pytest.raises(loop.TrainingDiverged,
                     match=r"^training diverged: 2 non-finite updates skipped by step 5, "
                           r"more than config.train.nan_skip_limit=1 \(the last good "
                           r"checkpoint is step 4 in "):
    _toy_fit(tmp_path / "b", 0.1, 8, 4, nan_at=(3, 5), nan_policy="skip", nan_skip_limit=1)
  c = config_lib.base_config()
  c.train.nan_policy = "ignore"
  with pytest.raises(ValueError, match=r"config.train.nan_policy='ignore': use 'stop'"):
    loop.FitConfig.from_config(c)


def test_finite_guard_leaves_finite_steps_bit_identical():
  """The guard's select is exact: a finite step's state equals the unguarded step's."""
  def step_fn(state, batch, rng):
    g = jax.grad(lambda p: jnp.sum((p["w"] - batch["x"]) ** 2))(state.params)
    return state.apply_gradients(grads=g), {"loss": jnp.sum(batch["x"])}
  state = state_lib.create(None, {"params": {"w": jnp.linspace(0.0, 1.0, 5)}},
                           optax.adam(0.3))
  batch = {"x": jnp.linspace(-2.0, 3.0, 5)[None]}
  f = jax.pmap(step_fn, axis_name="batch")
  g = jax.pmap(loop.finite_guard(step_fn), axis_name="batch")
  rep = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], state)
  a, b = f(rep, batch, jnp.zeros((1, 2), jnp.uint32)), g(rep, batch, jnp.zeros((1, 2),
                                                                            jnp.uint32))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a[0], b[0])
  assert float(b[1]["nonfinite"][0]) == 0.0


def test_old_checkpoints_rotate_out_only_after_the_new_one_reads_back(tmp_path, monkeypatch,
                                                                      capfd):
  """keep=2: a new checkpoint that cannot be read back is moved aside and costs no older
  one; the next good save rotates the oldest out."""
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  state = state_lib.create(None, {"params": {"w": jnp.zeros(())}}, optax.sgd(0.1))
  for step in (2, 4):
    assert ck.save(step, state, None)
  real = ckpt_lib.Checkpointer.readable
  monkeypatch.setattr(ckpt_lib.Checkpointer, "readable",
                      lambda self, step: step != 6 and real(self, step))
  assert not ck.save(6, state, None)
  assert ck.all_steps() == [2, 4]
  assert "checkpoint 6 in" in capfd.readouterr().err
  assert os.listdir(str(tmp_path / "ck") + ".unreadable")[0].startswith("6-")
  assert ck.save(8, state, None)
  assert ck.all_steps() == [4, 8]
  ck.close()


def test_a_failed_read_back_with_several_processes_leaves_the_checkpoint_in_place(
    tmp_path, monkeypatch, capfd):
  """With several processes a failed read-back may be a peer dying mid-read, not damage:
  the new checkpoint stays where it is (and restores), nothing is moved aside."""
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  state = state_lib.create(None, {"params": {"w": jnp.ones(())}}, optax.sgd(0.1))
  assert ck.save(2, state, None)
  real = ckpt_lib.Checkpointer.readable
  monkeypatch.setattr(ckpt_lib.Checkpointer, "readable",
                      lambda self, step: step != 4 and real(self, step))
  monkeypatch.setattr(ckpt_lib, "_several_processes", lambda: True)
  assert not ck.save(4, state, None)
  assert "left in place" in capfd.readouterr().err
  assert ck.all_steps() == [2, 4] and not os.path.exists(str(tmp_path / "ck") + ".unreadable")
  monkeypatch.setattr(ckpt_lib.Checkpointer, "readable", real)
  restored, step = ck.restore_newest_readable(state)
  assert step == 4 and float(restored.params["w"]) == 1.0
  ck.close()


_KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import orbax.checkpoint as ocp
import test_core
real = ocp.CheckpointManager.save
def save(self, step, *a, **k):
  out = real(self, step, *a, **k)
  if step == 4:  # the write of checkpoint 4 may be in flight (orbax saves asynchronously)
    os.kill(os.getpid(), signal.SIGKILL)
  return out
ocp.CheckpointManager.save = save
import pathlib
test_core._toy_fit(pathlib.Path({wd!r}), 0.1, 6, 2)
"""


def test_kill_9_during_a_save_resumes_from_a_complete_checkpoint(tmp_path):
  """A process SIGKILLed inside the save of checkpoint 4: the next run resumes from a
  complete checkpoint (2, or 4 if its write had finished) and ends as an uninterrupted
  run does."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  script = _KILLED_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)),
                               wd=str(tmp_path))
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == -9, r.stderr[-2000:]
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  assert set(ck.all_steps()) in ({2}, {2, 4})
  ck.close()
  final = _toy_fit(tmp_path, 0.1, 6, 2)
  np.testing.assert_allclose(final.params["w"], _w(6), rtol=1e-6)
  assert int(final.step) == 6


def test_fit_checkpoint_every_0_saves_only_the_end(tmp_path):
  final = _toy_fit(tmp_path, 0.1, 3, 0)
  assert ckpt_lib.Checkpointer(str(tmp_path / "ck")).all_steps() == [3]
  np.testing.assert_allclose(final.params["w"], _w(3), rtol=1e-6)


def test_fit_config_rejects_bad_steps():
  c = config_lib.base_config()
  c.train.steps = -5
  with pytest.raises(ValueError, match=r"config.train.steps=-5: must be at least 1"):
    loop.FitConfig.from_config(c)


def test_cuhk_and_video_protocols_by_name():
  """'cuhk_single_shot' == evaluate_cuhk03 on euclidean distances; 'video' mean-pools
  frames per tracklet first (== pool_by_tracklet then evaluate_rank)."""
  rng = np.random.default_rng(3)
  q = {"e": rng.normal(size=(8, 3)).astype(np.float32)}
  g = {"e": rng.normal(size=(12, 3)).astype(np.float32)}
  ql = {"person_id": np.arange(8) % 4 + 1, "camera_id": np.zeros(8, int)}
  gl = {"person_id": np.arange(12) % 4 + 1, "camera_id": np.ones(12, int)}
  config = config_lib.base_config()
  config.dataset.name = "x"
  config.eval.protocol = "cuhk_single_shot"
  res = evaluators.evaluate_embeddings(config, (q, ql, g, gl), step=0)
  dist = np.sqrt(((q["e"][:, None] - g["e"][None]) ** 2).sum(-1))
  ref = evaluation.evaluate_cuhk03(dist, ql["person_id"], gl["person_id"], ql["camera_id"],
                                   gl["camera_id"])
  np.testing.assert_allclose(res["exits"]["e"]["rank1"], ref["cmc"][0], rtol=1e-6)
  # Video: 2 frames per tracklet.
  ql["tracklet_id"], gl["tracklet_id"] = np.arange(8) // 2, np.arange(12) // 2
  ql["person_id"], gl["person_id"] = np.arange(8) // 2 + 1, (np.arange(12) // 2) % 4 + 1
  config.eval.protocol = "video"
  res = evaluators.evaluate_embeddings(config, (q, ql, g, gl), step=0)
  pq, _, qp, qc = evaluation.pool_by_tracklet(q["e"], ql["tracklet_id"], ql["person_id"],
                                              ql["camera_id"])
  pg, _, gp, gc = evaluation.pool_by_tracklet(g["e"], gl["tracklet_id"], gl["person_id"],
                                              gl["camera_id"])
  d = np.sqrt(((pq[:, None] - pg[None]) ** 2).sum(-1))
  ref = evaluation.evaluate_rank(d, qp, gp, qc, gc)
  assert res["num_queries"] == 4
  np.testing.assert_allclose(res["exits"]["e"]["mAP"], ref["mAP"], rtol=1e-6)


def _damage_newest(ckpt_dir: str, step: int) -> None:
  """Truncates every array data file of checkpoint `step` (as a cut copy would)."""
  root = os.path.join(ckpt_dir, str(step), "state")
  for dirpath, _, files in os.walk(root):
    for f in files:
      if "/d" in dirpath.replace(root, ""):
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.truncate(3)


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, capfd):
  """A truncated newest checkpoint: training resumes from the previous one (saying so
  in one line, the damaged folder moved aside, not deleted) and ends bit-identical to
  an uninterrupted run; evaluating that step names it in one line."""
  full = _toy_fit(tmp_path / "full", 0.1, 6, 2)
  _toy_fit(tmp_path / "cut", 0.1, 4, 2)
  ck = str(tmp_path / "cut" / "ck")
  _damage_newest(ck, 4)
  template = state_lib.create(None, {"params": {"w": jnp.zeros(())}}, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"checkpoint 4 in .* is unreadable \(damaged\).*"
                                       r"available: \[2, 4\]"):
    from reid_jax.core import experiment
    experiment.restore_variables(ck, template, 4)
  resumed = _toy_fit(tmp_path / "cut", 0.1, 6, 2)
  err = capfd.readouterr().err
  assert "checkpoint 4 in" in err and "is unreadable" in err and "trying the previous" in err
  np.testing.assert_array_equal(resumed.params["w"], full.params["w"])
  assert os.listdir(ck + ".unreadable")[0].startswith("4-")
  assert ckpt_lib.Checkpointer(ck).all_steps() == [2, 4, 6]


def test_evaluating_a_mistyped_workdir_creates_nothing(tmp_path):
  from reid_jax.core import experiment
  template = state_lib.create(None, {"params": {"w": jnp.zeros(())}}, optax.sgd(0.1))
  ck = str(tmp_path / "no" / "such" / "checkpoints")
  with pytest.raises(FileNotFoundError, match=r"^no checkpoint in .*no/such/checkpoints; "
                                              r"train first"):
    experiment.restore_variables(ck, template)
  assert not os.path.exists(tmp_path / "no")
