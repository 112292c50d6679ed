"""The training system: pmap equivalence, exact resume, CLIs (multi-process runs:
tests/test_launch.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import dare
from reid_jax.core import checkpoint as ckpt_lib, parallel
from reid_jax.methods.dare import anytime, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, steps: int = 6):
  """DaRe on the tiny synthetic set with a very small network (seconds per step on CPU)."""
  c = dare.get_config("synthetic")
  c.dataset.builder_config = "tiny"
  c.dataset.data_dir = data_dir
  c.input.height, c.input.width = 32, 16
  c.input.P, c.input.K = 4, 2
  c.model.width = 8
  c.model.hidden_dim = 16
  c.model.embed_dim = 8
  c.train.steps = steps
  c.optimizer.decay_start = steps // 2
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.input.eval_batch_size = 32
  c.input.worker_count = 0  # a grain worker costs seconds to start; tiny batches need none
  c.eval.tta = ""
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  from reid_jax.data import sources
  sources.ensure_prepared(tiny_config(d).dataset)
  return d


def _run_steps(config, n_devices: int, batches) -> dict:
  """Runs the pmapped train step over the first n_devices devices on the given batches."""
  state = train.create_train_state(jax.random.key(0), config)
  model = train.training_model(config)
  step = jax.pmap(functools.partial(train.train_step, model=model, config=config),
                  axis_name=parallel.AXIS, devices=jax.devices()[:n_devices])
  state = parallel.replicate(state, devices=jax.devices()[:n_devices])
  for b in batches:
    state, metrics = step(state, parallel.shard(b, n_devices))
  return parallel.unreplicate(state), parallel.unreplicate(metrics)


def test_pmap_8_devices_equals_1_device():
  """Same global batch on 8 devices (sync BN, global mining) and on 1 device.

  Tolerance: 1e-5 relative + 1e-6 absolute on params after 2 Adam steps; the only
  differences are float32 summation orders in the cross-device means.
  """
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  c = tiny_config("/nonexistent")
  c.input.P, c.input.K = 4, 4
  c.optimizer.eps, c.optimizer.lr = 1.0, 1e-2  # see _train_cmd: linear updates
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 32, 16, 3)).astype(np.float32),
              "person_id": np.repeat(np.arange(4), 4).astype(np.int32)} for _ in range(2)]
  s8, m8 = _run_steps(c, 8, batches)
  s1, m1 = _run_steps(c, 1, batches)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  flat8 = jax.tree_util.tree_leaves_with_path(s8.params)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(s1.params))
  for path, leaf in flat8:
    np.testing.assert_allclose(leaf, flat1[path], rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      s8.batch_stats, s1.batch_stats)


def test_per_device_mining_is_the_mean_of_each_devices_own_loss():
  """mining='device' (as separate GPUs would mine): the loss is the mean over devices of
  the loss each device's slice gives alone (each slice here holds 2 identities x 4)."""
  c = tiny_config("/nonexistent")
  c.input.P, c.input.K = 4, 4
  c.loss.mining = "device"
  c.train.sync_bn = False  # each device's BatchNorm statistics its own, as on its own
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(16, 32, 16, 3)).astype(np.float32),
           "person_id": np.repeat(np.arange(4), 4).astype(np.int32)}
  _, m2 = _run_steps(c, 2, [batch])
  state = parallel.replicate(train.create_train_state(jax.random.key(0), c),
                             devices=jax.devices()[:1])
  step = jax.pmap(functools.partial(train.train_step, model=train.training_model(c), config=c),
                  axis_name=parallel.AXIS, devices=jax.devices()[:1])
  alone = [float(parallel.unreplicate(step(state, parallel.shard(
      {k: v[i * 8:(i + 1) * 8] for k, v in batch.items()}, 1))[1])["loss"]) for i in (0, 1)]
  np.testing.assert_allclose(float(m2["loss"]), np.mean(alone), rtol=1e-5)
  assert abs(alone[0] - alone[1]) > 1e-4  # two different slices, not one loss twice


class _Interrupt(Exception):
  pass


def _params(workdir, config):
  variables, step = train.load_variables(config, workdir)
  return variables, step


def test_kill_and_resume_is_bit_identical(data_dir, tmp_path):
  c = tiny_config(data_dir, steps=6)
  full = str(tmp_path / "full")
  train.train_and_evaluate(c, full, evaluate_at_end=False)

  broken = str(tmp_path / "broken")

  def crash(step):
    if step == 5:
      raise _Interrupt()
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(c, broken, evaluate_at_end=False, step_callback=crash)
  assert ckpt_lib.Checkpointer(os.path.join(broken, "checkpoints")).latest_step() in (2, 4)
  train.train_and_evaluate(c, broken, evaluate_at_end=False)  # resumes

  va, sa = _params(full, c)
  vb, sb = _params(broken, c)
  assert sa == sb == 6
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), va, vb)


def test_resume_refuses_different_model(data_dir, tmp_path):
  """A workdir holding a checkpoint of another model is refused before any work (the
  saved run is faked: its config.json and a finished step folder are what is checked)."""
  c = tiny_config(data_dir, steps=2)
  wd = tmp_path / "run"
  (wd / "checkpoints" / "2").mkdir(parents=True)
  (wd / "config.json").write_text(c.to_json())
  c.model.embed_dim = 4
  with pytest.raises(ValueError, match="different config.model"):
    train.train_and_evaluate(c, str(wd), evaluate_at_end=False)
  assert sorted(os.listdir(wd / "checkpoints")) == ["2"]


def _train_cmd(data_dir, workdir, steps=3):
  return [sys.executable, "-m", "reid_jax.train", "--config=configs/dare.py:synthetic",
          f"--workdir={workdir}", "--config.dataset.builder_config=tiny",
          f"--config.dataset.data_dir={data_dir}", "--config.input.height=32",
          "--config.input.width=16", "--config.input.P=4", "--config.input.K=2",
          "--config.input.worker_count=0", "--config.eval.tta=",
          "--config.model.width=8", "--config.model.hidden_dim=16",
          "--config.model.embed_dim=8", f"--config.train.steps={steps}",
          "--config.optimizer.decay_start=1", "--config.train.checkpoint_every=3",
          # Adam with eps=1 and lr=1e-2: updates become linear in the gradient, so the
          # float32 reduction-order noise of different device layouts is not blown up
          # by Adam's 1/sqrt(v) (with eps=1e-8 a near-zero gradient of either sign moves
          # a weight by a full +-lr, i.e. any two runs differ by ~lr after one step).
          "--config.optimizer.eps=1.0", "--config.optimizer.lr=1e-2",
          "--config.train.eval_every=0", "--config.train.log_every=1"]


def _env(n_devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env


def test_load_ensemble_reads_saved_configs_and_refuses_duplicates(tmp_path):
  """--ensemble entries: WORKDIR (its config.json) or CONFIG@WORKDIR; members are named
  backbone[_stagesN], evaluated on the DaRe run's dataset; two equal networks or a
  workdir without config.json are one-line errors, raised before any embedding."""
  from configs import trinet
  for name, variant in (("s2", "mobilenetv2,stages2,market_cpu"), ("s2b", "mobilenetv2,stages2")):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "config.json").write_text(trinet.get_config(variant).to_json())
  dataset = dare.get_config("synthetic").dataset
  members = anytime.load_ensemble(
      [str(tmp_path / "s2"), f"configs/trinet.py:mobilenetv2@{tmp_path / 'x'}"], dataset)
  assert [anytime.member_name(c) for c, _ in members] == ["mobilenetv2_stages2", "mobilenetv2"]
  assert [wd for _, wd in members] == [str(tmp_path / "s2"), str(tmp_path / "x")]
  cfg = members[0][0]
  assert cfg.dataset.name == "synthetic_reid"  # the DaRe run's data, the member's model
  assert (cfg.model.num_stages, cfg.input.height, cfg.optimizer.lr) == (2, 64, 1e-3)
  with pytest.raises(ValueError, match=r"several members are \['mobilenetv2_stages2'\]"):
    anytime.load_ensemble([str(tmp_path / "s2"), str(tmp_path / "s2b")], dataset)
  with pytest.raises(ValueError, match="no .*config.json .* give CONFIG@WORKDIR"):
    anytime.load_ensemble([str(tmp_path / "absent")], dataset)


def test_cli_train_then_evaluate_writes_results(data_dir, tmp_path):
  wd = str(tmp_path / "cli")
  r = subprocess.run(_train_cmd(data_dir, wd, steps=2), cwd=REPO, env=_env(1),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 2/2" in r.stdout
  with open(os.path.join(wd, "eval_results.json")) as f:
    res = json.load(f)
  assert res["step"] == 2 and res["dataset"] == "synthetic_reid/tiny"
  assert set(res["exits"]) == {"stage1", "stage2", "stage3", "stage4", "fused"}
  for m in res["exits"].values():
    assert set(m) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("train/loss/stage1" in l for l in lines)
  os.remove(os.path.join(wd, "eval_results.json"))
  # A sequential-ensemble member: ResNet cut after stage 1 (a TriNet head on stage 1),
  # evaluated (flip TTA, as the DaRe model below) at the end of its training.
  member = str(tmp_path / "member")
  cmd = _train_cmd(data_dir, member, steps=2)
  cmd[3] = "--config=configs/trinet.py:synthetic,stages1"
  cmd[cmd.index("--config.eval.tta=")] = "--config.eval.tta=flip"
  r = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  member_res = json.load(open(os.path.join(member, "eval_results.json")))
  r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                      "--config=configs/dare.py:synthetic", f"--workdir={wd}",
                      "--checkpoint=2", "--tta=flip", "--budget=anytime,stream",
                      f"--ensemble={member}"]
                     + _train_cmd(data_dir, wd)[5:16],
                     cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not os.path.exists(os.path.join(wd, "eval_results.json"))  # training's, removed
  res2 = json.load(open(os.path.join(wd, "evaluate_results.json")))
  assert res2["tta"] == "flip" and set(res2["exits"]) == set(res["exits"])
  assert "fused" in r.stdout
  # Anytime curve: one point per exit, costs increasing, from the model's own MACs.
  assert list(res2["budget"]) == ["anytime", "stream"]  # one embedding pass for both
  budget = res2["budget"]["anytime"]
  costs = budget["exit_costs_macs"]
  assert costs["stage1"] < costs["stage2"] < costs["stage3"] < costs["stage4"] <= costs["fused"]
  curve = budget["curves"]["DaRe"]
  # The deepest stage answers with the fused embedding (official DARENet code).
  assert [p["exit"] for p in curve] == ["stage1", "stage2", "stage3", "fused"]
  np.testing.assert_allclose(curve[-1]["rank1"], res2["exits"]["fused"]["rank1"], atol=1e-9)
  assert os.path.getsize(os.path.join(wd, "anytime.png")) > 1000
  # The member (its config read from its workdir) costs exactly DaRe's stage-1 exit
  # (same trunk, same MLP) and scores what its own evaluation gave.
  [point] = budget["curves"]["ensemble"]
  assert point["exit"] == "resnet_small_stages1" and point["cost"] == costs["stage1"]
  np.testing.assert_allclose(point["rank1"], member_res["exits"]["final"]["rank1"], atol=1e-9)
  np.testing.assert_allclose(point["mAP"], member_res["exits"]["final"]["mAP"], atol=1e-9)
  # --ensemble feeds only the anytime curve: without it the command refuses to run.
  r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                      "--config=configs/dare.py:synthetic", f"--workdir={wd}",
                      "--budget=stream", f"--ensemble={member}"],
                     cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode != 0 and "add --budget=anytime" in r.stderr.strip().splitlines()[-1]
  # Stream curves from the same embeddings: at the smallest budget every query exits at
  # stage 1 and at the largest every query takes the fused exit, whatever the rule.
  stream = res2["budget"]["stream"]["curves"]
  assert set(stream) == {"distance", "margin", "random"}
  for rule, points in stream.items():
    assert len(points) == 9 and points[0]["budget"] == costs["stage1"]
    np.testing.assert_allclose(points[0]["rank1"], res2["exits"]["stage1"]["rank1"], atol=1e-9)
    np.testing.assert_allclose(points[-1]["rank1"], res2["exits"]["fused"]["rank1"], atol=1e-9)
  assert os.path.getsize(os.path.join(wd, "stream.png")) > 1000
