"""Using a trained model (issue 15): embedding a folder of images with a run's saved
config (the embed CLI against a direct `Run.embed` of the evaluation's preprocessing,
then search and ONNX export of the same trained run chained on its output),
exact blocked top-k against a brute-force stable sort (ties included), re-ranking,
faiss recall, refusing features of another run, colours from Market names, and
loading a classification run whose dataset is gone."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reid_jax import methods
from reid_jax.data import augment as aug
from reid_jax.data import sources
from reid_jax.evaluation import distance, rerank
from reid_jax.inference import images, run as run_lib, search

from method_cases import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["PYTHONPATH"] = REPO
  return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  sources.ensure_prepared(tiny_config("dare", d).dataset)
  return d


@pytest.fixture(scope="module")
def dare_run(data_dir, tmp_path_factory):
  """A 2-step tiny DaRe run (32x16)."""
  wd = str(tmp_path_factory.mktemp("runs") / "dare")
  methods.get("dare").train_and_evaluate(tiny_config("dare", data_dir, steps=2), wd,
                                         evaluate_at_end=False)
  return wd


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
  """12 PNGs of assorted sizes with Market-style names (3 in a subfolder), a corrupt
  PNG and a text file."""
  root = tmp_path_factory.mktemp("crops")
  os.makedirs(root / "sub")
  rng = np.random.default_rng(0)
  names = []
  for i in range(12):
    h, w = (32, 16) if i % 4 == 0 else (40 + 3 * i, 18 + i)
    name = f"{'sub/' if i % 4 == 1 else ''}{i % 3:04d}_c{i % 2 + 1}s1_{i:06d}_00.png"
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / name)
    names.append(name)
  (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
  (root / "readme.txt").write_text("not an image\n")
  return str(root), sorted(names)


def test_embed_cli_equals_run_embed(dare_run, crops, tmp_path):
  """The CLI's features are Run.embed of eval_transform + normalize of each file (<= 1e-5),
  names sorted, the two bad files skipped, counted and named in one warning line."""
  root, names = crops
  out = str(tmp_path / "feats.npz")
  r = subprocess.run([sys.executable, "-m", "reid_jax.embed", f"--workdir={dare_run}",
                      f"--images={root}", f"--output={out}", "--batch_size=5"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "skipped 2 file" in warnings[0]
  assert "broken.png" in warnings[0] and "readme.txt" in warnings[0]
  assert "embedded 12 images, 2 skipped" in r.stdout
  assert "resizing images to 32x16 as in the run's evaluation" in r.stdout
  assert sorted(os.listdir(tmp_path)) == ["feats.npz"]  # no partial file left
  feats = images.read_features(out, "--gallery")
  assert feats.names == names and feats.root == root
  run = run_lib.load_run(dare_run)
  assert feats.run == json.loads(json.dumps(run.identity()))
  x = np.stack([aug.normalize(aug.eval_transform(open(os.path.join(root, n), "rb").read(),
                                                 32, 16)) for n in names])
  ref = run.embed(x)
  assert set(feats.features) == set(ref) == {"stage1", "stage2", "stage3", "stage4", "fused"}
  for k, v in ref.items():
    assert feats.features[k].dtype == np.float32 and feats.features[k].shape == (12, 8)
    assert np.abs(feats.features[k] - v).max() <= 1e-5, k

  # The search CLI on these features: the query folder's images embedded again, the
  # top 4 per query equal a stable argsort of evaluation's full distance matrix, and
  # the Market names give evaluation's colours (green / red / grey frames).
  res_dir = str(tmp_path / "search")
  r = subprocess.run([sys.executable, "-m", "reid_jax.search", f"--gallery={out}",
                      f"--query={root}/sub", f"--workdir={dare_run}", "--top=4",
                      "--exit=stage2", f"--output={res_dir}"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.load(open(os.path.join(res_dir, "results.json")))
  q_names = [n for n in names if n.startswith("sub/")]
  assert list(results) == [n[len("sub/"):] for n in q_names]
  g = feats.features["stage2"]
  q = g[[names.index(n) for n in q_names]]
  d = distance.pairwise_distance(q, g, metric="euclidean")
  gp = np.array([int(n.split("/")[-1][:4]) for n in names])
  gc = np.array([int(n.split("_c")[1][0]) for n in names])
  for qi, (qn, row) in enumerate(results.items()):
    order = np.argsort(d[qi], kind="stable")[:4]
    assert [it["name"] for it in row] == [names[j] for j in order]
    np.testing.assert_allclose([it["distance"] for it in row], d[qi, order], atol=1e-5)
    qp, qc = int(qn[:4]), int(qn.split("_c")[1][0])
    want = ["junk" if (gp[j] == qp and gc[j] == qc) else
            "correct" if gp[j] == qp else "wrong" for j in order]
    assert [it["match"] for it in row] == want
    png = np.asarray(Image.open(os.path.join(res_dir, search.picture_name(qi, qn))))
    colours = {"correct": (0, 170, 0), "wrong": (220, 0, 0), "junk": (150, 150, 150)}
    cell = 64 + 8
    for r_, m in enumerate(want):  # the top-left frame pixel of each ranked tile
      assert tuple(png[0, cell * (r_ + 1) + 12]) == colours[m]

  # ... and the same trained run exported to ONNX: onnxruntime on the uint8 images the
  # embed command fed the model gives its features (<= 1e-4), every exit.
  if any(importlib.util.find_spec(m) is None for m in ("jax2onnx", "onnx", "onnxruntime")):
    return  # the optional export packages (tests/test_export.py says which are missing)
  from reid_jax.inference import export  # pylint: disable=import-outside-toplevel
  onnx_path = str(tmp_path / "model.onnx")
  export.export_onnx(run, onnx_path)
  u8 = np.stack([aug.eval_transform(open(os.path.join(root, n), "rb").read(), 32, 16)
                 for n in names])
  served = export.onnx_embedder(onnx_path)(u8)
  assert set(served) == set(feats.features)
  for k, v in feats.features.items():
    assert np.abs(np.asarray(served[k]) - v).max() <= 1e-4, k


def test_search_refuses_features_of_another_run(dare_run, tmp_path):
  """A copy of the run saved at another input size is another run: its identity differs
  in workdir and input size, and `refuse_other_run` names both runs and the fields."""
  other = str(tmp_path / "dare_48x24")
  shutil.copytree(dare_run, other)
  cfg = json.load(open(os.path.join(other, "config.json")))
  cfg["input"]["height"], cfg["input"]["width"] = 48, 24
  json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
  a, b = run_lib.load_run(dare_run), run_lib.load_run(other)
  assert b.input_size(100, 50) == (48, 24)
  assert set(b.embed(np.zeros((2, 48, 24, 3), np.float32))["fused"].shape) == {2, 8}
  with pytest.raises(ValueError) as e:
    search.refuse_other_run("--gallery=g.npz", a.identity(), f"--workdir={other}",
                            b.identity())
  msg = str(e.value)
  assert "\n" not in msg and dare_run in msg and other in msg
  assert "32x16" in msg and "48x24" in msg and "differ in workdir, input_hw" in msg
  search.refuse_other_run("--gallery=g.npz", a.identity(), "--workdir", a.identity())
  # five_crop loads at x resize_scale (1.125) and crops, as evaluation's load_size.
  assert run_lib.load_run(dare_run, tta="five_crop").input_size(10, 10) == (36, 18)


def _brute(q, g, k):
  d = distance.pairwise_distance(q, g, metric="euclidean")
  order = np.argsort(d, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(d, order, axis=1)


def test_exact_topk_equals_brute_force_with_ties():
  """Integer features (exact float32 distances, many ties, duplicated rows): the blocked
  top-k equals a stable argsort of the full matrix, ties by lower gallery index, for
  tiny blocks as for one block."""
  rng = np.random.default_rng(1)
  g = rng.integers(-2, 3, size=(53, 4)).astype(np.float32)
  g[30:40] = g[0]  # duplicates of row 0: equal distances, several blocks apart
  q = np.concatenate([rng.integers(-2, 3, size=(9, 4)).astype(np.float32), g[:1]])
  for k, blocks in ((7, ((1024, 16384), (1, 1))), (80, ((4, 5),))):
    want_i, want_d = _brute(q, g, min(k, 53))
    for bq, bg in blocks:
      idx, d = search.exact_topk(q, g, k, block_q=bq, block_g=bg)
      np.testing.assert_array_equal(idx, want_i, err_msg=f"k={k} blocks {bq}x{bg}")
      np.testing.assert_array_equal(d, want_d)
  assert idx.shape == (10, 53)  # k capped at the gallery size
  assert list(idx[-1][:11]) == [0, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]


def test_exact_topk_random_and_bad_input():
  rng = np.random.default_rng(2)
  q, g = rng.normal(size=(37, 16)), rng.normal(size=(1000, 16))
  idx, d = search.exact_topk(q, g, 10, block_q=8, block_g=64)
  want_i, want_d = _brute(q, g, 10)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="dimension 8 but the other set has 16"):
    search.exact_topk(q, g[:, :8], 3)
  with pytest.raises(ValueError, match="--top=0"):
    search.exact_topk(q, g, 0)


def test_rerank_topk_equals_evaluation():
  """The top k of evaluation's re-ranked matrix (re_ranking of the three distance
  matrices, stably sorted)."""
  rng = np.random.default_rng(3)
  q, g = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
  idx, d = search.rerank_topk(q, g, 5)
  pd = lambda a, b: distance.pairwise_distance(a, b, metric="euclidean")
  ref = rerank.re_ranking(pd(q, g), pd(q, q), pd(g, g))
  order = np.argsort(ref, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(idx, order)
  np.testing.assert_allclose(d, np.take_along_axis(ref, order, axis=1), atol=1e-5)


def test_faiss_recall_at_10():
  """IndexIVFFlat with the default nlist/nprobe: recall@10 >= 0.9 against exact search
  on clustered data, distances equal to the exact ones where found."""
  try:
    import faiss  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("faiss not installed (optional: pip install faiss-cpu)")
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(200, 32)).astype(np.float32)
  g = centres[rng.integers(0, 200, 20000)] + 0.5 * rng.normal(size=(20000, 32))
  q = centres[rng.integers(0, 200, 200)] + 0.5 * rng.normal(size=(200, 32))
  exact_i, exact_d = search.exact_topk(q, g, 10)
  index = search.FaissIVF(g)
  assert index.nlist == search.default_nlist(20000) == 2 * 141
  idx, d = index.search(q, 10)
  recall = search.recall_at_k(idx, exact_i)
  assert recall >= 0.9, recall
  same = idx == exact_i
  np.testing.assert_allclose(d[same], exact_d[same], rtol=1e-4)


def test_faiss_missing_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)
  with pytest.raises(ValueError, match=r"pip install faiss-cpu \(or faiss-gpu\)"):
    search.import_faiss()


def test_names_and_matches():
  """Market names -> (id, camera); evaluation's rule for correct / wrong / junk."""
  names = ["a/0001_c1s1_000151_01.jpg", "0001_c2s1_000301_01.jpg", "-1_c1s1_0.jpg",
           "0000_c3s1_1.jpg", "0001_c1s2_2.jpg"]
  pids, cams = search.parse_names(names)
  assert list(pids) == [1, 1, -1, 0, 1] and list(cams) == [1, 2, 1, 3, 1]
  assert search.parse_names(names + ["person.jpg"]) is None
  assert [list(a) for a in search.parse_names(["p7_cam2.jpg"], r"p(\d+)_cam(\d+)")] == [
      [7], [2]]
  with pytest.raises(ValueError, match="needs two groups"):
    search.parse_names(names, r"(\d+)")
  m = search.match_labels((np.array([1]), np.array([1])), (pids, cams),
                          np.array([[1, 2, 3, 4, 0]]))
  assert list(m[0]) == ["correct", "junk", "wrong", "junk", "junk"]


def test_list_images(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  for n in ("a/b/2.jpg", "a/1.jpg", "a/x.png"):
    (tmp_path / n).write_bytes(b"")
  root, names = images.list_images(str(tmp_path))
  assert root == str(tmp_path) and names == ["a/1.jpg", "a/b/2.jpg", "a/x.png"]
  root, names = images.list_images(str(tmp_path / "a" / "**" / "*.jpg"))
  assert root == str(tmp_path / "a") and names == ["1.jpg", "b/2.jpg"]
  assert images.list_images(str(tmp_path / "a" / "1.jpg")) == (str(tmp_path / "a"), ["1.jpg"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no files"):
    images.list_images(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="matches no file"):
    images.list_images(str(tmp_path / "*.bmp"))


def test_ide_run_loads_without_its_dataset(data_dir, tmp_path):
  """An IDE run whose data folder was moved away still loads and embeds as its own
  embedder did with the dataset (the class count read from the checkpoint)."""
  data = str(tmp_path / "tfds")
  shutil.copytree(data_dir, data)
  config = tiny_config("ide", data, steps=2)
  config.train.checkpoint_every = 0
  wd = str(tmp_path / "ide")
  family = methods.get("ide")
  family.train_and_evaluate(config, wd, evaluate_at_end=False)
  x = np.random.default_rng(5).normal(size=(3, 32, 16, 3)).astype(np.float32)
  variables, _ = family.load_variables(config, wd)
  ref = family.make_embedder(config)(variables, x)
  os.rename(data, data + ".moved")
  run = run_lib.load_run(wd)
  assert run.method == "ide" and run.step == 2 and run.input_size(99, 7) == (32, 16)
  out = run.embed(x)
  assert set(out) == {"ide"}
  np.testing.assert_allclose(out["ide"], np.asarray(ref["ide"]), atol=1e-6)
