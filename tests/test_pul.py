"""PUL (progressive unsupervised learning): the clustering round against numpy brute
force and hand counts, the no-target-labels guarantee, a tiny end-to-end run (2 rounds),
kill-and-resume bit-identical with the saved pseudo-labels reused, and cross-domain
evaluation (`evaluate --dataset`) against a brute-force ranking."""

from __future__ import annotations

import collections.abc
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import ide as ide_config
from configs import pul as pul_config
from reid_jax.core import embedding, loop
from reid_jax.data import pipeline, sources
from reid_jax.data import samplers as smp
from reid_jax.methods.pul import clustering, data, report
from reid_jax.methods.pul import train as pul

from method_cases import _Interrupt, _crash_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- clustering


def _blobs(seed=0, per=5, dim=8):
  """4 well-separated groups of `per` points (each near its own positive direction)."""
  rng = np.random.default_rng(seed)
  centres = 10.0 * np.eye(dim, dtype=np.float32)[:4] + 1.0
  x = np.concatenate([c + 0.3 * rng.normal(size=(per, dim)) for c in centres])
  return x.astype(np.float32), np.repeat(np.arange(4), per)


def test_kmeans_round_matches_brute_force(monkeypatch):
  x, group = _blobs()
  cl = clustering.cluster(x, 4, seed=0, n_init=2)
  # Each group is one cluster (any cluster numbering).
  assert len({(g, a) for g, a in zip(group, cl.assignment)}) == 4
  # Centre = the image nearest each (converged) centroid = mean of the cluster's members.
  cent = np.stack([x[cl.assignment == k].mean(0) for k in range(4)])
  d = np.linalg.norm(x[:, None, :] - cent[None], axis=-1)
  np.testing.assert_array_equal(cl.centres, d.argmin(0))
  # The block-wise search gives the same centres.
  monkeypatch.setattr(clustering, "_CHUNK", 3)
  np.testing.assert_array_equal(clustering.cluster(x, 4, seed=0, n_init=2).centres, cl.centres)
  monkeypatch.undo()

  # Reliable: cosine similarity to the own centre > lambda, vs numpy.
  f = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = f @ f[cl.centres].T                        # [N, K]
  own = cos[np.arange(len(x)), cl.assignment]
  lam = float(np.median(own))                      # half of them pass
  sel = clustering.select_reliable(x, cl.assignment, cl.centres, lam)
  np.testing.assert_allclose(sel.similarity, own, rtol=1e-6)
  np.testing.assert_array_equal(sel.reliable, own > lam)
  assert 0 < sel.reliable.sum() < len(x)
  assert sel.reliable[cl.centres].all()            # a centre is similar 1 to itself
  anyc = clustering.select_reliable(x, cl.assignment, cl.centres, lam, rule="any")
  np.testing.assert_array_equal(anyc.reliable, cos.max(1) > lam)
  with pytest.raises(ValueError, match=r"config.pul.reliable_rule='bogus'"):
    clustering.select_reliable(x, cl.assignment, cl.centres, lam, rule="bogus")
  with pytest.raises(ValueError, match=r"config.pul.num_clusters=21: must be in \[1, 20\]"):
    clustering.cluster(x, 21, seed=0)


def test_purity_by_hand():
  assignment = np.array([0, 0, 0, 1, 1, 2, 2])
  truth = np.array([5, 5, 7, 7, 7, 9, 5])
  # cluster 0: {5: 2, 7: 1} -> 2; cluster 1: {7: 2} -> 2; cluster 2: {9: 1, 5: 1} -> 1.
  assert clustering.purity(assignment, truth) == pytest.approx(5 / 7)
  mask = np.array([1, 0, 1, 1, 0, 1, 0], bool)
  # kept: c0 {5, 7} -> 1; c1 {7} -> 1; c2 {9} -> 1: 3 of 4.
  assert clustering.purity(assignment, truth, mask) == pytest.approx(3 / 4)
  assert np.isnan(clustering.purity(assignment, truth, np.zeros(7, bool)))


def _labels(n=6, settings=None):
  return clustering.PseudoLabels(
      assignment=np.arange(n, dtype=np.int32) % 2, centres=np.array([0, 1]),
      similarity=np.linspace(0, 1, n).astype(np.float32), reliable=np.arange(n) % 3 == 0,
      settings=settings or {"num_clusters": 2, "lam": 0.85})


def test_pseudo_labels_are_saved_atomically_and_checked(tmp_path, monkeypatch):
  path = clustering.labels_path(str(tmp_path / "checkpoints" / "round_01"))
  assert path.endswith(os.path.join("checkpoints", "round_01.pseudo_labels.npz"))
  lab = _labels()
  clustering.save(path, lab)
  back = clustering.load(path, lab.settings)
  for f in ("assignment", "centres", "similarity", "reliable"):
    np.testing.assert_array_equal(getattr(back, f), getattr(lab, f))
  np.testing.assert_array_equal(back.indices, [0, 3])
  np.testing.assert_array_equal(back.labels, [0, 1])
  with pytest.raises(ValueError, match=r"was clustered with other settings \(lam: saved 0.85, "
                                       r"now 0.5\); use the config that made it"):
    clustering.load(path, {"num_clusters": 2, "lam": 0.5})
  # A write that dies part-way leaves the old file intact and no temporary behind.
  def broken(f, **arrays):
    f.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(np, "savez", broken)
  with pytest.raises(OSError):
    clustering.save(path, _labels(n=9))
  assert len(clustering.load(path, lab.settings).assignment) == 6
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]


# ----------------------------------------------------------------------------- no labels


class _Poisoned(collections.abc.Mapping):
  """A record whose person_id must never be read."""

  def __init__(self, rec):
    self._rec = rec

  def __getitem__(self, key):
    if key == "person_id":
      raise AssertionError("the training path read a true target identity")
    return self._rec[key]

  def __iter__(self):
    return iter(self._rec)

  def __len__(self):
    return len(self._rec)


def _poisoned_target(n_ids=4, per=6):
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 255, size=(n_ids, 3))
  recs = []
  for i in range(n_ids * per):
    img = np.clip(colours[i // per] + rng.normal(0, 8, (32, 16, 3)), 0, 255).astype(np.uint8)
    recs.append(_Poisoned({"image": img, "person_id": i // per + 1, "camera_id": i % 3}))
  return recs


def _tiny(data_dir: str, **pul_overrides) -> ml_collections.ConfigDict:
  """configs/pul.py:synthetic at test size: 32x16, width 8, 4 source steps, 2 x 3 steps."""
  c = pul_config.get_config("synthetic")
  c.dataset.data_dir = data_dir
  c.input.height, c.input.width = 32, 16
  c.input.worker_count = 0
  c.input.eval_batch_size = 32
  c.input.batch_size = 8
  c.model.width = 8
  c.model.bottleneck = 16
  c.train.steps = 4
  c.optimizer.decay_steps = (2,)
  c.train.log_every = 2
  c.train.checkpoint_every = 1
  c.eval.tta = ""
  c.pul.steps = 3
  c.pul.batch_size = 8
  c.pul.kmeans_n_init = 1
  c.pul.lam = 0.5
  c.pul.update(pul_overrides)
  return c


def _ide_source(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The IDE config stage 0 of `c` trains (configs/ide.py with the same settings)."""
  s = ide_config.get_config("synthetic")
  for section in ("input", "model", "optimizer", "train", "loss", "eval"):
    s[section] = ml_collections.ConfigDict(c[section].to_dict())
  s.dataset = pul.source_dataset(c)
  s.seed = c.seed
  return s


def test_training_path_never_reads_target_identities():
  """Clustering and the fine-tuning batches of a round, on records whose person_id
  raises when read: nothing raises, and the batches carry the cluster labels."""
  recs = _poisoned_target()
  with pytest.raises(AssertionError, match="read a true target identity"):
    next(iter(pipeline.eval_loader(recs, height=32, width=16, batch_size=8)))  # the poison works
  target = data.Unlabelled(recs)
  assert all(target[i]["person_id"] == data.UNKNOWN for i in range(len(target)))
  c = _tiny("", num_clusters=4)
  # Random weights of the right shapes (running variance 1), without compiling an init.
  zero = pul._template(pul.round_config(c), 12, c.pul.optimizer, 1)
  rng = np.random.default_rng(0)
  variables = {"params": jax.tree_util.tree_map(
      lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype), zero.params),
      "batch_stats": jax.tree_util.tree_map_with_path(
          lambda p, x: np.ones_like(x) if "var" in jax.tree_util.keystr(p) else x,
          zero.batch_stats)}
  labels = pul.compute_pseudo_labels(c, 1, target, variables, 12)
  assert labels.assignment.shape == (24,) and labels.reliable.any()
  it = pul.round_iterator(c, 1, target, labels)
  batch = pul.prepare_round_batch(next(it), 1)
  assert batch["image"].shape == (8, 32, 16, 3)
  members = set(labels.labels.tolist())
  assert set(batch["label"].tolist()) <= members
  # The sampler sees the cluster labels (+1) of the reliable images, and nothing else.
  view = data.PseudoLabelled(target, labels.indices, labels.labels)
  assert sorted(view.labels()) == ["person_id"]
  np.testing.assert_array_equal(view.labels()["person_id"], labels.labels + 1)


def test_tfds_target_records_lose_their_identity(data_dir):
  c = _tiny(data_dir)
  raw = sources.open_split(c.dataset, "train")
  target = data.open_target(c)
  assert len(target) == len(raw) == 72
  assert {target[i]["person_id"] for i in range(len(target))} == {data.UNKNOWN}
  assert min(smp.read_labels(raw)["person_id"]) >= 1
  assert sorted(target[0]) == ["camera_id", "image", "person_id"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  c = _tiny(d)
  sources.ensure_prepared(c.dataset)
  sources.ensure_prepared(pul.source_dataset(c))
  return d


@pytest.fixture(scope="module")
def pul_run(data_dir, tmp_path_factory):
  """One command: stage 0 (IDE on synthetic_reid/tiny), then 2 rounds on the unlabelled
  synthetic_reid/varied, evaluated after every round."""
  wd = str(tmp_path_factory.mktemp("pul"))
  c = _tiny(data_dir)
  c.train.checkpoint_every = 0
  results = pul.train_and_evaluate(c, wd)
  return c, wd, results


def _brute_force_market(q, qp, qc, g, gp, gc):
  """rank-1 and mAP by a per-query loop: same-camera matches and junk (-1) left out."""
  r1, aps = [], []
  for i in range(len(q)):
    keep = ~(((gp == qp[i]) & (gc == qc[i])) | (gp == -1))
    d = np.linalg.norm(g[keep] - q[i], axis=1)
    good = (gp[keep] == qp[i])[np.argsort(d, kind="stable")]
    if not good.any():
      continue
    r1.append(float(good[0]))
    hits = np.flatnonzero(good)
    aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
  return float(np.mean(r1)), float(np.mean(aps))


def test_two_rounds_end_to_end(pul_run, data_dir):
  c, wd, results = pul_run
  rows = report.load_rows(wd)
  assert sorted(rows) == [0, 1, 2]
  truth = report.true_target_labels(c)
  for r in (1, 2):
    lab = clustering.load(clustering.labels_path(loop.stage_dir(wd, pul.round_name(r))),
                          pul.label_settings(c, r, 72))
    # The row's numbers, recomputed from the saved labels and the true identities.
    assert rows[r]["num_reliable"] == int((lab.similarity > c.pul.lam).sum())
    assert rows[r]["num_images"] == 72
    counts = collections.Counter(zip(lab.assignment[lab.reliable], truth[lab.reliable]))
    best = collections.defaultdict(int)
    for (k, _), n in counts.items():
      best[k] = max(best[k], n)
    assert rows[r]["purity_reliable"] == pytest.approx(sum(best.values()) / lab.reliable.sum())
    assert 0 < rows[r]["purity_all"] <= 1
    assert set(np.unique(lab.assignment)) <= set(range(12))
  # Every round ranked the target test split; the last one is eval_results.json.
  assert all(rows[r]["rank1"] is not None for r in (0, 1, 2))
  saved = json.load(open(os.path.join(wd, "eval_results.json")))
  assert saved["exits"]["pul"]["mAP"] == rows[2]["mAP"] == results["exits"]["pul"]["mAP"]
  assert saved["dataset"] == "synthetic_reid/varied" and saved["step"] == 3  # round 2's
  # Round 2 clustered with round 1's model: its labels are reproduced from that model.
  c1 = ml_collections.ConfigDict(c.to_dict())
  c1.pul.rounds = 1
  v1, _ = pul.load_variables(c1, wd)
  again = pul.compute_pseudo_labels(c, 2, data.open_target(c), v1, c.pul.num_clusters)
  lab2 = clustering.load(clustering.labels_path(loop.stage_dir(wd, "round_02")),
                         pul.label_settings(c, 2, 72))
  np.testing.assert_array_equal(again.assignment, lab2.assignment)
  np.testing.assert_array_equal(again.reliable, lab2.reliable)
  # Every round starts from the source model with a new 12-way classifier.
  source = pul.load_source(_tiny(data_dir, source_workdir=wd))  # its stage 0
  assert source.classes == 12
  state = pul.round_stage(c, 2, source, data.open_target(c), lab2).init_state(None)
  assert state.params["head"]["classifier"]["kernel"].shape == (16, 12)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["backbone"],
                         source.variables["params"]["backbone"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats,
                         source.variables["batch_stats"])
  table = report.format_table(rows)
  assert table.splitlines()[0].split() == ["round", "reliable", "images", "pur.rel",
                                           "pur.all", "rank1", "mAP"]


def test_kill_and_resume_is_bit_identical(pul_run, data_dir, tmp_path, monkeypatch):
  """From the finished stage 0 of the uninterrupted run (`pul.source_workdir`), killed
  between round 1 and 2 (after round 1's last step) and inside round 2: the resumed run
  reuses the saved pseudo-labels (no clustering) and ends with the uninterrupted run's
  weights and round figures."""
  c_full, full, _ = pul_run
  c = _tiny(data_dir, source_workdir=full, eval_each_round=False)
  c.train.checkpoint_every = 2
  wd = str(tmp_path / "broken")
  with pytest.raises(_Interrupt):  # the 3 steps of round 1
    pul.train_and_evaluate(c, wd, evaluate_at_end=False, step_callback=_crash_at(3))
  assert not os.path.exists(clustering.labels_path(loop.stage_dir(wd, "round_02")))
  with pytest.raises(_Interrupt):  # round 1 restored; round 2 clustered, killed at step 2
    pul.train_and_evaluate(c, wd, evaluate_at_end=False, step_callback=_crash_at(2))
  before = {r: open(clustering.labels_path(loop.stage_dir(wd, f"round_0{r}")), "rb").read()
            for r in (1, 2)}

  def no_clustering(*a, **k):
    raise AssertionError("clustered again on resume")
  monkeypatch.setattr(clustering, "cluster", no_clustering)
  pul.train_and_evaluate(c, wd, evaluate_at_end=False)
  for r in (1, 2):
    assert open(clustering.labels_path(loop.stage_dir(wd, f"round_0{r}")), "rb").read() == (
        before[r])
  va, sa = pul.load_variables(c_full, full)
  vb, sb = pul.load_variables(c, wd)
  assert sa == sb == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)
  rows_a, rows_b = report.load_rows(full), report.load_rows(wd)
  for r in (1, 2):
    for k in ("num_reliable", "purity_reliable", "purity_all"):
      assert rows_a[r][k] == rows_b[r][k]
  # A changed clustering setting is refused on resume (one line, naming the section).
  bad = _tiny(data_dir, source_workdir=full, eval_each_round=False, lam=0.6)
  with pytest.raises(ValueError, match=r"holds a run with a different config.pul"):
    pul.train_and_evaluate(bad, wd, evaluate_at_end=False)


def test_settings_are_one_line_errors(data_dir):
  for field, value, message in (
      ("rounds", 0, r"config.pul.rounds=0: must be at least 1"),
      ("num_clusters", 0, r"config.pul.num_clusters=0: must be at least 1"),
      ("feature", "bogus", r"config.pul.feature='bogus': use 'pool'"),
      ("reliable_rule", "x", r"config.pul.reliable_rule='x': use 'own' or 'any'"),
      ("batch_size", 7, r"global batch config.pul.batch_size=7 is not divisible by 8")):
    with pytest.raises(ValueError, match=message):
      pul.validate(_tiny(data_dir, **{field: value}))
  with pytest.raises(ValueError, match=r"config.pul.source_workdir=/nonexistent: no "):
    pul.source_classes(_tiny(data_dir, source_workdir="/nonexistent"))


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_on_another_dataset(pul_run, data_dir, tmp_path):
  """`evaluate --dataset=synthetic_reid/varied` of an IDE run trained on tiny (PUL's
  stage 0, which is one: its checkpoints and IDE config): the numbers of a brute-force
  ranking of that dataset's embeddings; the classifier is still built from the training
  dataset (tiny's 12 identities)."""
  c_pul, pul_wd, _ = pul_run
  ide_run = str(tmp_path / "ide")
  shutil.copytree(loop.stage_dir(pul_wd, pul.SOURCE), loop.stage_dir(ide_run))
  c = _ide_source(c_pul)
  saved = json.loads(c.to_json())
  saved["model"]["num_classes"] = 12
  json.dump(saved, open(os.path.join(ide_run, "config.json"), "w"))
  out = str(tmp_path / "varied.json")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  flags = [f"--config.{k}={v}" for k, v in (
      ("dataset.builder_config", "tiny"), ("dataset.data_dir", data_dir),
      ("input.height", 32), ("input.width", 16), ("input.worker_count", 0),
      ("input.eval_batch_size", 32), ("model.width", 8), ("model.bottleneck", 16),
      ("eval.tta", ""))]
  r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                      "--config=configs/ide.py:synthetic", f"--workdir={ide_run}",
                      "--dataset=synthetic_reid/varied", f"--output={out}"] + flags,
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out))
  assert res["dataset"] == "synthetic_reid/varied"
  # The same weights and feature (the BN feature, L2-normalised, no flip) embedded here.
  variables = pul.load_source(_tiny(data_dir, source_workdir=pul_wd)).variables
  embed = pul.make_embedder(c_pul, "", 12)
  varied = c_pul.dataset  # synthetic_reid/varied
  q, ql = embedding.embed_split(varied, "query", embed, variables, height=32, width=16,
                                batch_size=32)
  g, gl = embedding.embed_split(varied, "gallery", embed, variables, height=32, width=16,
                                batch_size=32)
  r1, m_ap = _brute_force_market(q["pul"], ql["person_id"], ql["camera_id"], g["pul"],
                                 gl["person_id"], gl["camera_id"])
  assert res["exits"]["ide"]["rank1"] == pytest.approx(r1, abs=1e-9)
  assert res["exits"]["ide"]["mAP"] == pytest.approx(m_ap, abs=1e-6)
  r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                      "--config=configs/ide.py:synthetic", f"--workdir={ide_run}",
                      "--dataset=/x"] + flags, cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 1
  assert "--dataset=/x: give NAME or NAME/CONFIG, e.g. market1501" in (
      r.stderr.strip().splitlines()[-1])
