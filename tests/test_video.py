"""Video re-ID training: the tracklet sampler and loader, temporal pooling, the video
protocols' pooling modes, the settings' one-line errors, and an end-to-end tiny training
of configs/video.py (IDE on the fake MARS archive, TriNet on synthetic_video_reid)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import video as video_configs
from reid_jax import evaluation
from reid_jax.core import evaluators, video
from reid_jax.data import pipeline
from reid_jax.data import samplers as smp
from reid_jax.evaluation import protocols
from reid_jax.methods.classification import models
from reid_jax.methods.classification import train as cls_train
from reid_jax.methods.dare import train as dare_train
from reid_jax.models.temporal import temporal_pool
from tests import fake_archives as fa

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (person_id, camera, frames) per tracklet; tracklet 3 and 7 are shorter than T=3.
TRACKS = [(1, 0, 5), (1, 1, 4), (2, 0, 3), (2, 2, 2), (3, 1, 6), (3, 0, 3), (4, 2, 4),
          (4, 1, 1), (5, 0, 3), (0, 1, 4)]


def _labels(shuffle_seed: int = 0) -> dict[str, np.ndarray]:
  """Frame labels of TRACKS with records in a shuffled order (frames not contiguous)."""
  rows = [(p, c, t, f) for t, (p, c, n) in enumerate(TRACKS) for f in range(n)]
  rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
  a = np.asarray(rows, np.int32)
  return {"person_id": a[:, 0], "camera_id": a[:, 1], "tracklet_id": a[:, 2] + 100,
          "frame_index": a[:, 3]}


def _sampler(labels, **kw):
  args = dict(P=3, K=2, T=3, seed=7)
  args.update(kw)
  return smp.TrackletSampler(labels["person_id"], labels["tracklet_id"],
                             labels["frame_index"], **args)


def test_tracklet_sampler_layout_over_many_batches():
  lab = _labels()
  s = _sampler(lab)
  lengths = {100 + t: n for t, (_, _, n) in enumerate(TRACKS)}
  for step in range(40):
    plan = s[step]
    idx, tr = plan["index"], plan["tracklet"]
    assert idx.shape == (6, 3) and tr.shape == (6,)
    pids = lab["person_id"][idx]
    assert (pids == pids[:, :1]).all() and (pids >= 1).all()     # distractor 0 never drawn
    assert len(np.unique(pids[:, 0])) == 3                        # P identities ...
    assert (pids[:, 0].reshape(3, 2) == pids[::2, :1]).all()      # ... x K rows each
    assert (lab["tracklet_id"][idx] == tr[:, None]).all()         # one tracklet per row
    frames = lab["frame_index"][idx]
    assert (np.diff(frames, axis=1) >= 0).all()                   # temporal order
    for row, t in enumerate(tr):
      if lengths[t] >= 3:
        assert len(np.unique(frames[row])) == 3                   # distinct frames
      else:  # padded by repetition: every frame, repeats to T
        assert set(frames[row]) == set(range(lengths[t]))
  # K=2 tracklets of identity 4 are distinct when it has 2 (the PK rule).
  assert "num_tracklets=9" in repr(s)


def test_tracklet_sampler_seed_determinism_and_drop():
  lab = _labels()
  a, b, c = _sampler(lab), _sampler(lab), _sampler(lab, seed=8)
  for step in (0, 3, 11):
    np.testing.assert_array_equal(a[step]["index"], b[step]["index"])
  assert any((a[k]["index"] != c[k]["index"]).any() for k in range(5))
  # The records' order does not matter, only the tracklets and frame indices.
  other = _labels(shuffle_seed=1)
  o = _sampler(other)
  for step in range(5):
    np.testing.assert_array_equal(lab["frame_index"][a[step]["index"]],
                                  other["frame_index"][o[step]["index"]])
    np.testing.assert_array_equal(a[step]["tracklet"], o[step]["tracklet"])
  d = _sampler(lab, short="drop")
  assert d.num_tracklets == 7  # 10 minus distractor 9 and the short tracklets 3 and 7
  drawn = np.unique(np.concatenate([d[k]["tracklet"] for k in range(60)]))
  assert 103 not in drawn and 107 not in drawn
  with pytest.raises(ValueError, match=r"config.input.video.short='bogus'"):
    _sampler(lab, short="bogus")
  with pytest.raises(ValueError, match=r"config.input.P=6: PK sampling needs .* has 5"):
    _sampler(lab, P=6, short="drop")  # identities 1..5 keep a tracklet of >= 3 frames
  bad = dict(lab, person_id=lab["person_id"].copy())
  bad["person_id"][np.flatnonzero(lab["tracklet_id"] == 104)[0]] = 9
  with pytest.raises(ValueError, match="tracklet_id 104 holds frames of several"):
    _sampler(bad)


def test_tracklet_frames_against_brute_force():
  rng = np.random.default_rng(0)
  # consecutive: every window 0..n-T equally likely; short tracklets cycle.
  counts = {}
  for _ in range(3000):
    w = tuple(smp.tracklet_frames(6, 3, "consecutive", rng))
    counts[w] = counts.get(w, 0) + 1
  assert set(counts) == {(0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5)}
  assert all(abs(v / 3000 - 0.25) < 0.04 for v in counts.values())
  np.testing.assert_array_equal(smp.tracklet_frames(2, 5, "consecutive", rng), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(smp.tracklet_frames(1, 3, "consecutive", rng), [0, 0, 0])
  # random: each T-subset of n frames equally likely (brute force over all C(4,2) = 6).
  counts = {}
  for _ in range(6000):
    w = tuple(smp.tracklet_frames(4, 2, "random", rng))
    counts[w] = counts.get(w, 0) + 1
  want = {(i, j) for i in range(4) for j in range(i + 1, 4)}
  assert set(counts) == want and all(abs(v / 6000 - 1 / 6) < 0.03 for v in counts.values())
  # random, short: every frame once plus T - n repeats, sorted: for n=2, T=3 the outcomes
  # are (0,0,1) and (0,1,1), each with probability 1/2.
  counts = {}
  for _ in range(2000):
    w = tuple(smp.tracklet_frames(2, 3, "random", rng))
    counts[w] = counts.get(w, 0) + 1
  assert set(counts) == {(0, 0, 1), (0, 1, 1)}
  assert abs(counts[(0, 0, 1)] / 2000 - 0.5) < 0.05


def _source():
  """Frame records of TRACKS, each frame a solid colour (its record number)."""
  lab = _labels()
  return [{"image": fa.solid(i, 12, 6), **{k: int(v[i]) for k, v in lab.items()}}
          for i in range(len(lab["person_id"]))]


def test_tracklet_loader_layout_resume_and_process_slices():
  src = _source()
  kw = dict(sampler="tracklets", P=2, K=2, T=3, height=12, width=6, seed=3,
            augment={"resize_scale": 1.0, "flip_prob": 0.0}, normalize=False)
  it = pipeline.train_loader(src, **kw)
  batches = [next(it) for _ in range(5)]
  b = batches[0]
  assert b["image"].shape == (12, 12, 6, 3) and b["image"].dtype == np.uint8
  assert b["person_id"].shape == b["tracklet_id"].shape == b["camera_id"].shape == (4,)
  plan = pipeline.make_sampler(pipeline.smp.read_labels(src), sampler="tracklets", P=2, K=2,
                               T=3, seed=3)[0]
  # Without augmentation frame k of tracklet i is record plan[i, k]'s colour.
  want = np.stack([src[r]["image"] for r in plan["index"].reshape(-1)])
  np.testing.assert_array_equal(b["image"], want)
  np.testing.assert_array_equal(b["tracklet_id"], plan["tracklet"])
  np.testing.assert_array_equal(b["person_id"], [src[r]["person_id"] for r in plan["index"][:, 0]])
  # Resume from the state after 2 batches: the same batches 2..4.
  state = pipeline.train_loader(src, **kw)
  next(state), next(state)
  saved = state.get_state()
  resumed = pipeline.train_loader(src, **kw)
  resumed.set_state(saved)
  for want_b in batches[2:]:
    got = next(resumed)
    for k in want_b:
      np.testing.assert_array_equal(got[k], want_b[k])
  other = pipeline.train_loader(src, **dict(kw, T=2))
  with pytest.raises(ValueError, match="different sampler"):
    other.set_state(saved)
  # Two processes' slices (whole tracklets) make up the one-process batch.
  aug = dict(kw, augment={"resize_scale": 1.125, "flip_prob": 0.5})
  full = next(pipeline.train_loader(src, **aug))
  parts = [next(pipeline.train_loader(src, process_index=i, process_count=2, **aug))
           for i in range(2)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_tracklet_sampler_needs_a_video_split():
  lab = {"person_id": np.array([1, 1, 2, 2]), "camera_id": np.array([0, 1, 0, 1])}
  with pytest.raises(ValueError, match="needs a video dataset whose records have tracklet_id"):
    pipeline.make_sampler(lab, sampler="tracklets", P=2, K=1, T=2)


def test_temporal_pool_values_and_gradients():
  x = np.random.default_rng(0).normal(size=(2 * 4, 5)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
  y = x.reshape(2, 4, 5)
  np.testing.assert_allclose(temporal_pool(jnp.asarray(x), 4, "mean"), y.mean(1), rtol=1e-6)
  np.testing.assert_array_equal(temporal_pool(jnp.asarray(x), 4, "max"), y.max(1))
  np.testing.assert_array_equal(temporal_pool(jnp.asarray(x), 1, "max"), x)
  g_mean = jax.grad(lambda v: jnp.sum(w * temporal_pool(v, 4, "mean")))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g_mean).reshape(2, 4, 5), np.repeat(w[:, None] / 4, 4, 1),
                             rtol=1e-6)
  g_max = np.asarray(jax.grad(lambda v: jnp.sum(w * temporal_pool(v, 4, "max")))(
      jnp.asarray(x))).reshape(2, 4, 5)
  hit = y.argmax(1)[:, None, :] == np.arange(4)[None, :, None]  # the argmax frame only
  np.testing.assert_array_equal(g_max, np.where(hit, w[:, None], 0.0))
  with pytest.raises(ValueError, match="config.model.temporal_pool='sum'"):
    temporal_pool(jnp.asarray(x), 4, "sum")


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_ide_head_classifies_the_pooled_bn_feature(mode):
  """IDE head on B*T frames: its feature is the per-frame BN feature pooled per tracklet
  and the logits are the classifier applied to that pooled feature (eval mode)."""
  block = models.ClassBlock(3, bottleneck=6, dropout=0.5, temporal_pool=mode)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4 * 3, 7)), jnp.float32)
  v = block.init(jax.random.PRNGKey(0), x)
  _, frame_feat, _ = block.apply(v, x)
  pre, feat, logits = block.apply(v, x, frames=3)
  ff = np.asarray(frame_feat).reshape(4, 3, 6)
  np.testing.assert_allclose(feat, ff.mean(1) if mode == "mean" else ff.max(1), rtol=1e-5,
                             atol=1e-6)
  k = v["params"]["classifier"]
  np.testing.assert_allclose(logits, np.asarray(feat) @ np.asarray(k["kernel"]) + np.asarray(k["bias"]),
                             rtol=1e-5, atol=1e-6)
  assert pre.shape == (4, 6)


@pytest.mark.parametrize("name,method", [("video", "mean"), ("video_max", "max")])
def test_video_protocols_pool_like_numpy(name, method):
  rng = np.random.default_rng(3)
  def split(n_tracks, pid0):
    tid = np.repeat(np.arange(n_tracks), 3)
    pid = np.repeat(pid0 + np.arange(n_tracks) % 3, 3)
    cam = np.repeat(np.arange(n_tracks) % 2, 3)
    return rng.normal(size=(len(tid), 4)).astype(np.float32), {
        "tracklet_id": tid, "person_id": pid, "camera_id": cam}
  qe, ql = split(4, 1)
  ge, gl = split(9, 1)
  res, scored, n = evaluators.PROTOCOLS[name]({"e": qe}, ql, {"e": ge}, gl)
  pool = lambda e: getattr(e.reshape(-1, 3, 4), method)(1)
  tr = lambda lab: {k: v[::3] for k, v in lab.items()}
  dist = np.asarray(evaluation.pairwise_distance(pool(qe), pool(ge), metric="euclidean"))
  want = evaluation.evaluate_rank(dist, tr(ql)["person_id"], tr(gl)["person_id"],
                                  tr(ql)["camera_id"], tr(gl)["camera_id"], max_rank=50)
  assert n == 4 and scored == want["num_valid_queries"]
  assert res["e"]["mAP"] == pytest.approx(float(want["mAP"]))
  assert res["e"]["rank1"] == pytest.approx(float(want["cmc"][0]))


def test_video_settings_errors():
  c = video_configs.get_config("synthetic")
  cls_train.validate(c)
  c.eval.protocol = "video_max"
  with pytest.raises(ValueError, match="config.eval.protocol=video_max: .*temporal_pool=mean"):
    cls_train.validate(c)
  c = video_configs.get_config("max,synthetic")
  c.eval.protocol = "market"
  with pytest.raises(ValueError, match="use video_max"):
    cls_train.validate(c)
  c = video_configs.get_config("synthetic")
  c.input.sampler = "shuffle"
  with pytest.raises(ValueError, match="config.input.sampler='shuffle': video training"):
    cls_train.validate(c)
  c = video_configs.get_config("trinet,synthetic")
  dare_train.validate(c)
  c.input.video.sample = "evenly"
  with pytest.raises(ValueError, match="config.input.video.sample='evenly'"):
    dare_train.validate(c)
  c = video_configs.get_config("trinet,synthetic")
  c.input.video.T = 0
  with pytest.raises(ValueError, match="config.input.video.T=0"):
    dare_train.validate(c)
  assert video.frames(ml_collections.ConfigDict({"input": {}})) == 0


_E2E = """
import json, sys
from configs import video
import reid_jax.methods as methods
data_dir, manual, out = sys.argv[1:4]
runs = [("synthetic", "mars", manual), ("trinet,synthetic,max", "", "")]
for variant, dataset, manual_dir in runs:
  c = video.get_config(variant)
  c.dataset.data_dir = data_dir
  if dataset:  # IDE on the fake MARS archive: 2 train ids (P=2, K=2, T=3 pads)
    c.dataset.name, c.dataset.builder_config, c.dataset.manual_dir = dataset, "", manual_dir
    c.input.P, c.input.K = 2, 2
  c.train.steps = 3
  methods.get(c.method).train_and_evaluate(c, out + "/" + variant.replace(",", "_"))
"""


def test_end_to_end_video_training(tmp_path):
  """IDE + mean pooling on the fake MARS archive and TriNet + max pooling on
  synthetic_video_reid train 3 steps each and write a video-protocol eval_results.json
  (one CPU device, in one subprocess: compiling for the suite's 8 fake devices costs more)."""
  fa.make_mars(tmp_path / "manual", "zip")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_E2E), str(tmp_path / "data"),
                         str(tmp_path / "manual"), str(tmp_path / "runs")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ide = json.loads((tmp_path / "runs/synthetic/eval_results.json").read_text())
  assert ide["protocol"] == "video" and ide["dataset"] == "mars" and ide["step"] == 3
  # The fake archive's query tracks (rows 1 and 5), each with a cross-camera match.
  assert ide["num_queries"] == ide["num_valid_queries"] == len(fa.MARS_QUERY_ROWS)
  tri = json.loads((tmp_path / "runs/trinet_synthetic_max/eval_results.json").read_text())
  assert tri["protocol"] == "video_max" and tri["dataset"] == "synthetic_video_reid/tiny"
  assert tri["num_queries"] == 6  # one query tracklet per test identity
  for res, exit_name in ((ide, "ide"), (tri, "final")):
    m = res["exits"][exit_name]
    assert 0.0 <= m["mAP"] <= 1.0 and 0.0 <= m["rank1"] <= m["rank5"] <= m["rank10"] <= 1.0
  saved = json.loads((tmp_path / "runs/synthetic/config.json").read_text())
  assert saved["model"]["num_classes"] == 2  # fake MARS train ids 1 and 3
