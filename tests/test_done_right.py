"""Re-ID done right: the loss, sizes, mining, the sequential accumulated step (against
batched and per-triplet references), the compiled-shape bound, bad input, and
kill-and-resume inside an accumulation window and a mining round."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reid_jax.core import parallel
from reid_jax.core import state as state_lib
from reid_jax.data import augment as aug
from reid_jax.methods import done_right
from reid_jax.methods.done_right import mining, sizes
from reid_jax.methods.done_right import step as st
from reid_jax.methods.done_right import train as dr
from reid_jax.methods.done_right.model import DoneRightModel
from reid_jax.methods.done_right.stream import TripletStream

MARGIN = 0.5


def tiny_config(data_dir: str):
  """configs/done_right.py:synthetic on the tiny synthetic set with a tiny network."""
  c = importlib.import_module("configs.done_right").get_config("synthetic")
  c.dataset.builder_config = "tiny"
  c.dataset.data_dir = data_dir
  c.input.height, c.input.width = 32, 16
  c.input.longer_side = 32
  c.input.worker_count = 0
  c.input.batch_size = 8
  c.input.eval_batch_size = 32
  c.model.width = 8
  c.model.embed_dim = 8
  c.train.steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.optimizer.decay_steps = (1,)
  c.ranking.steps = 6
  c.ranking.triplets_per_update = 8
  c.ranking.optimizer.lr = 1e-3
  c.ranking.augment.cutout_ramp_steps = 4
  c.mining.every = 2
  c.mining.pool = 40
  c.mining.top = 5
  c.mining.start = 1
  c.mining.ramp = 2
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  from reid_jax.data import sources
  sources.ensure_prepared(tiny_config(d).dataset)
  return d


class TinyBackbone(nn.Module):
  """Two strided convs with a BatchNorm between (compiles in milliseconds)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return [nn.Conv(8, (3, 3), strides=2)(x)]


def _model(embed_dim: int = 8) -> tuple[DoneRightModel, dict]:
  m = DoneRightModel(TinyBackbone(), embed_dim=embed_dim)
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 16, 3)))
  # Non-trivial running statistics, so frozen BatchNorm is visible in the results.
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: a + 0.3, v["batch_stats"])}
  return m, v


def _state(m, v, devices):
  tx = optax.sgd(0.1)
  return parallel.replicate(state_lib.create(m.apply, v, tx), devices=devices)


def _embed(m):
  return lambda variables, x: m.apply(variables, x, train=False)["embedding"]


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------------------- loss, sizes


def test_loss_equals_numpy_formula():
  rng = np.random.default_rng(0)
  q, p, n = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3))
  expected = 0.5 * np.maximum(0, 0.1 + ((q - p) ** 2).sum(1) - ((q - n) ** 2).sum(1))
  got = [float(st.triplet_loss(q[i], p[i], n[i], 0.1)) for i in range(6)]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(st.batched_triplet_loss(q, p, n, 0.1)), expected.mean(),
                             rtol=1e-6)
  # A hand case: q=0, p=(1,0), n=(0,2): 0.5 * max(0, 0.1 + 1 - 4) = 0; and with n=(0,1): 0.05.
  z = jnp.zeros(2)
  assert float(st.triplet_loss(z, jnp.array([1., 0.]), jnp.array([0., 2.]), 0.1)) == 0.0
  np.testing.assert_allclose(
      float(st.triplet_loss(z, jnp.array([1., 0.]), jnp.array([0., 1.]), 0.1)), 0.05, rtol=1e-6)


def test_target_shape_keeps_aspect_within_rounding_and_bound():
  rng = np.random.default_rng(1)
  longer, mult, low = 416, 16, 32
  seen = set()
  worst = 0.0
  for h, w in rng.integers(20, 900, size=(500, 2)):
    shape = sizes.target_shape(int(h), int(w), longer, mult, low)
    seen.add(shape)
    assert max(shape) == longer and shape[0] % mult == 0 and shape[1] % mult == 0
    assert min(shape) >= low
    if min(h, w) * longer / max(h, w) >= low:  # not raised to the minimum
      worst = max(worst, sizes.distortion(int(h), int(w), shape))
      # rounding moves a side by at most half a multiple
      assert abs(shape[0] - h * longer / max(h, w)) <= mult / 2 + 1e-9
  assert len(seen) <= sizes.shape_bound(longer, mult, low) == 2 * ((416 - 32) // 16 + 1) - 1
  assert worst < 0.25  # a 20-px side upscaled is the worst case; typical crops below:
  assert sizes.distortion(128, 64, sizes.target_shape(128, 64, 416, 16, 32)) == 0.0
  assert sizes.target_shape(100, 37, 416, 16, 32) == (416, 160)  # 153.9 -> 160 (4.0 %)
  # Too thin to reach the backbone's minimum: upscaled to it, never dropped.
  assert sizes.target_shape(10, 400, 416, 16, 32) == (32, 416)


# ----------------------------------------------------------------------------- mining


def test_mined_pairs_are_the_top_hardest_of_a_brute_force_enumeration():
  rng = np.random.default_rng(2)
  n, top = 60, 7
  e = rng.normal(size=(n, 6))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  pids = rng.integers(0, 9, n)
  records = rng.permutation(1000)[:n]
  table = mining.mine(e, pids, records, top, chunk=17)  # several chunks
  rec_to_row = {int(r): i for i, r in enumerate(records)}
  d2 = ((e[:, None] - e[None]) ** 2).sum(-1)
  expected_anchors = [i for i in range(n) if ((pids == pids[i]).sum() > 1)]
  assert sorted(rec_to_row[int(a)] for a in table.anchors) == sorted(expected_anchors)
  for a_rec, pairs, count in zip(table.anchors, table.pairs, table.counts):
    a = rec_to_row[int(a_rec)]
    brute = sorted(((0.5 * max(0.0, MARGIN + d2[a, p] - d2[a, q]), d2[a, p] - d2[a, q], p, q)
                    for p in range(n) if p != a and pids[p] == pids[a]
                    for q in range(n) if pids[q] != pids[a]), key=lambda t: -t[1])
    assert count == min(top, len(brute))
    got = [(rec_to_row[int(p)], rec_to_row[int(q)]) for p, q in pairs[:count]]
    assert got == [(p, q) for _, _, p, q in brute[:count]]  # the same pairs, hardest first
    assert (pairs[count:] == -1).all()
    kth = brute[count - 1][0]
    assert all(0.5 * max(0.0, MARGIN + d2[a, p] - d2[a, q]) >= kth - 1e-12 for p, q in got)
  draw_rng = np.random.default_rng(3)
  for _ in range(20):  # a drawn triplet is one of its anchor's mined pairs
    a, p, q = table.draw(draw_rng)
    i = int(np.flatnonzero(table.anchors == a)[0])
    assert [p, q] in table.pairs[i, :table.counts[i]].tolist()


# ----------------------------------------------------------------------------- the step


def _triplets(rng, shapes):
  return [tuple(rng.normal(size=s + (3,)).astype(np.float32) for s in trip) for trip in shapes]


def test_accumulated_gradient_equals_the_batched_mean_loss_gradient():
  """N triplets of one size, one at a time, accumulated / N == grad of the mean loss of
  the N triplets in one batch (same frozen-BN model). Tolerance 1e-6 absolute on
  gradients of magnitude ~0.1-1 (float32 summation order)."""
  m, v = _model()
  f = _embed(m)
  trips = _triplets(np.random.default_rng(0), [((32, 16),) * 3] * 4)
  devs = jax.local_devices()[:1]
  step = st.SequentialTripletStep(f, margin=MARGIN, triplets_per_update=4, seed=0,
                                  devices=devs)
  acc, loss_sum, active = jax.device_get(step.accumulate(_state(m, v, devs), [trips]))

  def mean_loss(p):
    var = {"params": p, "batch_stats": v["batch_stats"]}
    q, pos, neg = (f(var, jnp.stack([t[i] for t in trips])) for i in range(3))
    return st.batched_triplet_loss(q, pos, neg, MARGIN)
  ref = jax.jit(jax.grad(mean_loss))(v["params"])
  assert float(active[0]) > 0
  np.testing.assert_allclose(float(loss_sum[0]) / 4, float(jax.jit(mean_loss)(v["params"])),
                             rtol=1e-5)
  assert _max_diff(jax.tree_util.tree_map(lambda a: a[0] / 4, acc), ref) < 1e-6


def test_mixed_sizes_accumulate_to_the_sum_of_per_triplet_gradients():
  """Triplets whose three images have different sizes: the accumulator equals the sum,
  in order, of each triplet's gradient computed on its own (jax.grad of the whole
  triplet loss, summed in numpy float64)."""
  m, v = _model()
  f = _embed(m)
  shapes = [((32, 16), (48, 16), (16, 32)), ((16, 32), (32, 16), (48, 16)),
            ((48, 16), (48, 16), (32, 16))]
  trips = _triplets(np.random.default_rng(4), shapes)
  devs = jax.local_devices()[:1]
  step = st.SequentialTripletStep(f, margin=2.0, triplets_per_update=3, seed=0,
                                  devices=devs)
  acc, _, active = jax.device_get(step.accumulate(_state(m, v, devs), [trips]))
  assert float(active[0]) == 3  # margin 2: every triplet contributes

  def one(p, t):
    var = {"params": p, "batch_stats": v["batch_stats"]}
    e = [f(var, jnp.asarray(x)[None])[0] for x in t]
    return st.triplet_loss(e[0], e[1], e[2], 2.0)
  total = None
  grad_one = jax.jit(jax.grad(one))
  for t in trips:
    g = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), grad_one(v["params"], t))
    total = g if total is None else jax.tree_util.tree_map(np.add, total, g)
  assert _max_diff(jax.tree_util.tree_map(lambda a: a[0], acc), total) < 2e-6
  assert step.shapes == {(32, 16), (48, 16), (16, 32)}
  assert len(step.compiled) == 2 * 3 + 1  # embed + grad per shape, one loss


def test_two_devices_equal_one_device():
  """A whole update: 4 triplets on 2 devices (2 each, gradients summed across devices)
  equals the same 4 on 1 device (1e-6: summation order). The devices' first triplets
  differ in shape, so that position runs as two masked calls."""
  m, v = _model()
  f = _embed(m)
  one = ((32, 16),) * 3
  trips = _triplets(np.random.default_rng(5),
                    [one, one, ((48, 16), (32, 16), (16, 32)), one])
  out = {}
  for n in (1, 2):
    devs = jax.local_devices()[:n]
    step = st.SequentialTripletStep(f, margin=MARGIN, triplets_per_update=4, seed=0,
                                    devices=devs)
    state = _state(m, v, devs)
    state, metrics = step(state, {"triplets": trips, "mining_s": 0.0},
                          np.full(n, 1, np.int32))
    out[n] = (parallel.unreplicate(state.params), parallel.unreplicate(metrics))
  assert _max_diff(out[1][0], out[2][0]) < 1e-6
  np.testing.assert_allclose(out[1][1]["loss"], out[2][1]["loss"], rtol=1e-6)
  assert out[1][1]["nonfinite"] == out[2][1]["nonfinite"] == 0.0


def test_compiled_shapes_stay_within_the_configured_bound():
  """Windows drawn from a split of varied crop sizes: every image reaches the step at a
  shape the config allows, and the compiled programs are 2 per shape (+1 loss)."""
  rng = np.random.default_rng(6)
  records = []
  for i in range(60):
    h, w = int(rng.integers(30, 90)), int(rng.integers(12, 60))
    records.append({"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                    "person_id": i // 4 + 1, "camera_id": i % 3})
  mcfg = type("M", (), dict(every=2, pool=20, top=3, start=10**9, ramp=1,
                            hard_fraction=0.0))()
  longer, mult, low = 32, 8, 16
  stream = TripletStream(records, triplets_per_update=4, seed=0, longer_side=longer,
                         size_multiple=mult, min_side=low, augment=aug.AugmentConfig(
                             resize_scale=1.0, flip_prob=0.0), mining_cfg=mcfg,
                         pool_size=(32, 16))
  m, v = _model()
  step = st.SequentialTripletStep(_embed(m), margin=MARGIN, triplets_per_update=4, seed=0,
                                  devices=jax.local_devices()[:1])
  state = _state(m, v, jax.local_devices()[:1])
  allowed = {sizes.target_shape(r["image"].shape[0], r["image"].shape[1], longer, mult, low)
             for r in records}
  for k in range(3):
    window = next(stream)
    for trip in window["triplets"]:
      assert all(x.shape[:2] in allowed for x in trip)
    state, _ = step(state, window, np.full(1, k + 1, np.int32))
  assert step.shapes <= allowed
  assert 2 <= len(step.shapes) <= sizes.shape_bound(longer, mult, low)
  assert len(step.compiled) == 2 * len(step.shapes) + 1


# ----------------------------------------------------------------------------- stream state


def test_stream_state_round_trip_keeps_the_mined_table(data_dir):
  c = tiny_config(data_dir)
  a, b = dr.ranking_stream(c), dr.ranking_stream(c)
  rng = np.random.default_rng(0)
  embed = lambda x: rng.normal(size=(len(x), 4))
  next(a)
  a.refresh(1, embed, 16)
  assert a.table is not None and a.table_round == 0
  b.set_state(a.get_state())
  assert b.position == 1 and b.table_round == 0
  for k in ("anchors", "pairs", "counts"):
    np.testing.assert_array_equal(getattr(a.table, k), getattr(b.table, k))
  wa, wb = next(a), next(b)
  np.testing.assert_array_equal(wa["index"], wb["index"])
  assert wa["hard"].any()  # update 2 mixes in mined triplets (start 1, ramp 2)
  for ta, tb in zip(wa["triplets"], wb["triplets"]):
    for x, y in zip(ta, tb):
      np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("ranking.triplets_per_update", 12, "config.ranking.triplets_per_update=12 is not divisible"),
    ("input.longer_side", 8, "config.input.longer_side=8 is below the backbone's minimum"),
    ("mining.pool", 10_000, "config.mining.pool=10000 is larger than the training split"),
    ("ranking.mode", "batched", "config.ranking.mode='batched'"),
])
def test_bad_settings_fail_with_one_line_naming_the_field(field, value, match, data_dir,
                                                          tmp_path):
  c = tiny_config(data_dir)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match) as e:
    done_right.train_and_evaluate(c, str(tmp_path / "w"), evaluate_at_end=False)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ----------------------------------------------------------------------------- resume


class _Interrupt(Exception):
  pass


def test_kill_inside_an_accumulation_window_resumes_bit_identically(data_dir, tmp_path,
                                                                    monkeypatch):
  """Both stages; killed in ranking update 5 between the backward passes it accumulates.
  Update 5 re-starts from the checkpoint of update 3, in the middle of mining round 1
  (its table comes back from the checkpoint), and round 2 is then mined by the resumed
  model. Final parameters equal the uninterrupted run's bit for bit; the uninterrupted
  run also writes eval_results.json with both exits and the classification stage's."""
  c = tiny_config(data_dir)
  c.train.checkpoint_every = 3
  full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
  results = done_right.train_and_evaluate(c, full)
  assert set(results["exits"]) == {"done_right", "gmp"}
  assert set(results["classification_stage"]["exits"]) == {"gmp"}
  with open(os.path.join(full, "eval_results.json")) as f:
    assert json.load(f)["step"] == 2 + 6
  with open(os.path.join(full, dr.STATS_NAME)) as f:
    stats = json.load(f)
  assert stats["num_shapes"] == 1 and stats["updates"] == 6 and stats["mining_s"] > 0
  # The matching-regions split (feature map, head) composes to the evaluated embedding.
  variables, _ = done_right.load_variables(c, full)
  fmap, head = done_right.matching_functions(c, variables)
  x = np.random.default_rng(0).normal(size=(1, 32, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(head(fmap(x))),
                             np.asarray(done_right.make_embedder(c)(variables, x)["done_right"]),
                             rtol=1e-5, atol=1e-6)

  calls = {"grad": 0}
  original = st.SequentialTripletStep._run
  per_update = 3 * c.ranking.triplets_per_update // jax.device_count()  # backward calls

  def counting(self, name, *args):
    if name == "grad":
      calls["grad"] += 1
      if calls["grad"] == 4 * per_update + 2:  # update 5, between its backward passes
        raise _Interrupt()
    return original(self, name, *args)
  monkeypatch.setattr(st.SequentialTripletStep, "_run", counting)
  # The broken run starts from the full run's finished classification stage (restored,
  # not retrained: that stage's resume is the core's, tested for every method).
  shutil.copytree(os.path.join(full, "checkpoints", "classification"),
                  os.path.join(broken, "checkpoints", "classification"))
  with pytest.raises(_Interrupt):
    done_right.train_and_evaluate(c, broken, evaluate_at_end=False)
  monkeypatch.setattr(st.SequentialTripletStep, "_run", original)
  from reid_jax.core.checkpoint import Checkpointer
  assert Checkpointer(os.path.join(broken, "checkpoints", "ranking")).all_steps() == [3]
  done_right.train_and_evaluate(c, broken, evaluate_at_end=False)
  va, sa = done_right.load_variables(c, full)
  vb, sb = done_right.load_variables(c, broken)
  assert sa == sb == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)
