"""The `folder` builder (own crops: split folders + pattern, or a CSV manifest), unknown
cameras in the evaluation protocol, and the `msmt17` builder on fake archives."""

from __future__ import annotations

import pathlib
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax import evaluation
from reid_jax import prepare as prepare_cli
from reid_jax.data import folder, sources
from reid_jax.data.common import ReidDataError
from reid_jax.evaluation import metrics, protocols
from tests import fake_archives as fa

tfds.disable_progress_bar()


def one_line(err: pytest.ExceptionInfo) -> str:
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def records(name: str, split: str, data_dir: pathlib.Path) -> dict[str, dict]:
  source = tfds.data_source(name, split=split, data_dir=str(data_dir))
  out = {}
  for i in range(len(source)):
    r = source[i]
    out[r["file_name"].decode()] = r
  assert len(out) == len(source)
  return out


def check(got: dict[str, dict], expected: dict[str, fa.Expected]) -> None:
  assert sorted(got) == sorted(expected)
  for name, exp in expected.items():
    np.testing.assert_array_equal(got[name]["image"], exp.pixels, err_msg=name)
    assert int(got[name]["person_id"]) == exp.person_id, name
    assert int(got[name]["camera_id"]) == exp.camera_id, name


def build_folder(data_dir: pathlib.Path, **options) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("folder", config=folder.make_config(**options), data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


# ------------------------------------------------------------------------ folder: inputs

# Market-style names; cameras 2, 5, 9 (numbered 0, 1, 2 in sorted order), subfolders.
TREE = {
    "train": ["0001_c2_a.png", "sub/0001_c5_b.png", "0002_c9_x.png", "-1_c2_junk.png"],
    "query": ["0003_c2.png"],
    "gallery": ["0003_c5.png", "deep/er/0004_c9.png"],
}
CAMERA_OF = {"2": 0, "5": 1, "9": 2}


def write_images(root: pathlib.Path, names: list[str], start: int = 0
                ) -> dict[str, np.ndarray]:
  out = {}
  for i, rel in enumerate(names, start):
    img = fa.pattern(i, h=6, w=4)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(fa.png_bytes(img))
    out[rel] = img
  return out


def make_tree(root: pathlib.Path, tree=None) -> dict[str, dict[str, fa.Expected]]:
  expected, i = {}, 0
  for split, names in (tree or TREE).items():
    imgs = write_images(root / split, names, i)
    i += len(names)
    expected[split] = {}
    for rel, img in imgs.items():
      pid, cam = rel.rsplit("/", 1)[-1].split("_")[:2]
      expected[split][rel] = fa.Expected(int(pid), CAMERA_OF.get(cam[1:].split(".")[0], -1),
                                         img)
    (root / split / "Thumbs.db").write_bytes(b"\x00not an image")
  return expected


def test_folder_tree_via_prepare_cli(tmp_path, capsys):
  expected = make_tree(tmp_path / "mine")
  data = tmp_path / "data"
  assert prepare_cli.main(["folder", f"--manual_dir={tmp_path / 'mine'}",
                           f"--data_dir={data}"]) == 0
  out = capsys.readouterr().out
  name = folder.make_config(tmp_path / "mine").name
  assert name.startswith("tree_") and f"folder/{name} 1.0.0" in out
  assert f"--config.dataset.name=folder --config.dataset.builder_config={name}" in out
  assert "train         4           3        3" in out  # ids -1, 1, 2; cameras 2, 5, 9
  for split in folder.SPLITS:
    check(records(f"folder/{name}", split, data), expected[split])
  # Preparing the same inputs again reuses the prepared dataset (read from its files).
  assert prepare_cli.main([f"folder/{name}", f"--data_dir={data}"]) == 0
  # Training opens it by name (tfds reads a config not in code from its files).
  cfg = ml_collections.ConfigDict({"name": "folder", "builder_config": name,
                                   "data_dir": str(data), "manual_dir": ""})
  assert len(sources.open_split(cfg, "gallery")) == 2
  cfg.builder_config = "tree_0123456789"
  with pytest.raises(ReidDataError) as err:
    sources.open_split(cfg, "train")
  assert "folder/tree_0123456789 is not prepared" in one_line(err)
  # Other inputs never share it: another pattern, another folder.
  other = {folder.make_config(tmp_path / "mine", pattern=r"^(?P<pid>\d+)_").name,
           folder.make_config(tmp_path / "mine", pattern=r"(?P<pid>\d+)_c").name,
           folder.make_config(tmp_path / "data").name, name}
  assert len(other) == 4


def test_folder_pattern_without_cameras(tmp_path):
  """One folder per person, no camera in the names: camera_id -1 everywhere."""
  root = tmp_path / "mine"
  tree = {"train": ["0007/a.jpg", "0007/b.png", "0008/x.bmp"], "query": ["0009/q.png"],
          "gallery": ["0009/g.png", "0010/g.png"]}
  for split, names in tree.items():
    write_images(root / split, names)
  builder = build_folder(tmp_path / "data", manual_dir=root, pattern=r"^(?P<pid>\d+)/")
  name = f"folder/{builder.builder_config.name}"
  for split, names in tree.items():
    got = records(name, split, tmp_path / "data")
    assert sorted(got) == sorted(names)
    for rel, r in got.items():
      assert int(r["person_id"]) == int(rel.split("/")[0]) and int(r["camera_id"]) == -1
      assert r["image"].shape == (6, 4, 3)


def write_manifest(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def test_folder_manifest(tmp_path):
  root = tmp_path / "crops"
  imgs = write_images(root, ["a.png", "b/c.png", "d.png", "e.png", "f.png"])
  manifest = write_manifest(root / "list.csv", (
      "split,file,camera_id,person_id\n"
      "train,a.png,cam10,5\n"
      "train,b/c.png,cam2,6\n"
      "\n"
      "query,d.png,cam2,7\n"
      "gallery,e.png,cam10,7\n"
      "gallery,a.png,cam2,5\n"))  # a file may serve two splits
  builder = build_folder(tmp_path / "data", manifest=manifest)
  name = f"folder/{builder.builder_config.name}"
  assert builder.builder_config.name.startswith("manifest_")
  cam = {"cam10": 0, "cam2": 1}  # not all integers: sorted as strings
  want = {"train": {"a.png": (5, "cam10"), "b/c.png": (6, "cam2")},
          "query": {"d.png": (7, "cam2")},
          "gallery": {"e.png": (7, "cam10"), "a.png": (5, "cam2")}}
  for split, rows in want.items():
    check(records(name, split, tmp_path / "data"),
          {f: fa.Expected(p, cam[c], imgs[f]) for f, (p, c) in rows.items()})
  # No camera column: camera_id -1. A changed manifest is another dataset.
  before = folder.make_config(manifest=manifest).name
  write_manifest(manifest, "file,person_id,split\na.png,1,train\nd.png,2,query\n"
                           "e.png,2,gallery\n")
  assert folder.make_config(manifest=manifest).name != before
  builder = build_folder(tmp_path / "data2", manual_dir=root, manifest="list.csv")
  got = records(f"folder/{builder.builder_config.name}", "gallery", tmp_path / "data2")
  assert [(int(r["person_id"]), int(r["camera_id"])) for r in got.values()] == [(2, -1)]


def _tree_case(tmp_path, change):
  root = tmp_path / "mine"
  make_tree(root)
  change(root)
  return dict(manual_dir=root)


def _manifest_case(tmp_path, text):
  root = tmp_path / "crops"
  write_images(root, ["a.png", "d.png", "e.png"])
  return dict(manifest=write_manifest(root / "m.csv", text))


BAD_TREES = {
    "bad name": (lambda r: (r / "train" / "img_7.png").write_bytes(fa.png_bytes(fa.solid(1))),
                 ["img_7.png", "does not match --config.pattern", "^(?P<pid>"]),
    "empty split": (lambda r: [p.unlink() for p in (r / "query").iterdir()],
                    ["query holds no images", "query split"]),
    "non-image": (lambda r: (r / "gallery" / "notes.txt").write_text("hi"),
                  ["notes.txt: not an image file", "remove it"]),
    "corrupt": (lambda r: (r / "gallery" / "0005_c2.jpg").write_bytes(b"\xff\xd8junk"),
                ["0005_c2.jpg: corrupt or unreadable image"]),
    "no images": (lambda r: [p.unlink() for p in r.rglob("*.png")],
                  ["no images at all in train/, query/ or gallery/"]),
    "no gallery": (lambda r: shutil.rmtree(r / "gallery"),
                   ["no gallery/ folder", "train/, query/"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_folder_bad_tree(tmp_path, case):
  change, needles = BAD_TREES[case]
  options = _tree_case(tmp_path, change)
  with pytest.raises(ReidDataError) as err:
    build_folder(tmp_path / "data", **options)
  msg = one_line(err)
  for needle in needles:
    assert needle in msg, (needle, msg)
  assert not (tmp_path / "data" / "folder").exists() or not any(
      (tmp_path / "data" / "folder").rglob("dataset_info.json"))


BAD_MANIFESTS = {
    "missing file": ("file,person_id,camera_id,split\na.png,1,,train\nzz.png,2,,query\n",
                     ["m.csv line 3", "zz.png is missing", "remove the row"]),
    "no split column": ("file,person_id,camera_id\na.png,1,3\n",
                        ["no split column", "add one", "train, query or gallery"]),
    "pid not integer": ("file,person_id,split\na.png,1,train\nd.png,bob,query\ne.png,2,gallery\n",
                        ["m.csv line 3", "person id 'bob'", "not an integer"]),
    "empty split": ("file,person_id,split\na.png,1,train\nd.png,2,query\n",
                    ["no row has split gallery"]),
    "no rows": ("file,person_id,split\n", ["no rows, so no images at all"]),
    "mixed cameras": ("file,person_id,camera_id,split\na.png,1,4,train\nd.png,2,,query\n"
                      "e.png,2,5,gallery\n", ["m.csv line 3: no camera", "every row"]),
    "bad split": ("file,person_id,split\na.png,1,test\n", ["split 'test' is not one of"]),
    "unknown column": ("file,person_id,split,colour\na.png,1,train,red\n",
                       ["unknown column(s) ['colour']"]),
    "short row": ("file,person_id,split\na.png,1\n", ["line 2: 2 fields, the header has 3"]),
    "non-image": ("file,person_id,split\nm.csv,1,train\n", ["not an image file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_folder_bad_manifest(tmp_path, case):
  text, needles = BAD_MANIFESTS[case]
  with pytest.raises(ReidDataError) as err:
    build_folder(tmp_path / "data", **_manifest_case(tmp_path, text))
  msg = one_line(err)
  for needle in needles:
    assert needle in msg, (needle, msg)


def test_folder_bad_options(tmp_path, capsys):
  make_tree(tmp_path / "mine")
  (tmp_path / "mine" / "train" / "bob_c2_q.png").write_bytes(fa.png_bytes(fa.solid(2)))
  cases = [
      (dict(manual_dir=tmp_path / "mine", pattern=r"^(?P<pid>[^_]+)_c"),
       ["bob_c2_q.png", "person id 'bob'", "not an integer"]),
      (dict(manual_dir=tmp_path / "mine", pattern="(?P<pid"), ["not a valid regular expression"]),
      (dict(manual_dir=tmp_path / "mine", pattern=r"^(\d+)_"), ["no named group pid"]),
      (dict(manual_dir=tmp_path / "mine", pattern="x", manifest="m.csv"), ["exclude each other"]),
      (dict(manifest=tmp_path / "nope.csv"), ["no such file"]),
      (dict(), ["no --manual_dir given"]),
  ]
  for options, needles in cases:
    with pytest.raises(ReidDataError) as err:
      build_folder(tmp_path / "data", **options)
    msg = one_line(err)
    for needle in needles:
      assert needle in msg, (options, msg)
  # The CLI: options for a builder without any, and a folder config never prepared.
  assert prepare_cli.main(["market1501", "--config.pattern=x", f"--data_dir={tmp_path}"]) == 1
  assert "--config.pattern: only for the builders that take options" in capsys.readouterr().err
  assert prepare_cli.main(["folder/tree_0123456789", f"--data_dir={tmp_path}"]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "folder/tree_0123456789 is not prepared" in err


# ------------------------------------------------------------------ unknown cameras: protocol


def brute_force(dist, qp, gp, qc, gc):
  """CMC (ranks 1..G), mAP, mINP and valid count, straight from the protocol's words:
  junk = same id and same KNOWN camera, or gallery id -1; unknown (-1) cameras differ
  from every camera."""
  cmc, aps, inps = np.zeros(dist.shape[1]), [], []
  for i in range(len(qp)):
    same_cam = (qc[i] == gc) & (qc[i] != -1) & (gc != -1)
    junk = ((gp == qp[i]) & same_cam) | (gp == -1)
    pos = (gp == qp[i]) & ~junk
    if not pos.any():
      continue
    order = [j for j in sorted(range(len(gp)), key=lambda j: (dist[i, j], j)) if not junk[j]]
    hits = np.array([pos[j] for j in order])
    ranks = np.flatnonzero(hits) + 1
    aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    inps.append(len(ranks) / ranks[-1])
    cmc[ranks[0] - 1:] += 1
  return cmc / len(aps), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def test_unknown_cameras_match_brute_force(capsys, monkeypatch):
  rng = np.random.default_rng(3)
  nq, ng = 9, 25
  qp, gp = rng.integers(0, 4, nq), rng.integers(-1, 4, ng)
  dist = rng.integers(0, 6, (nq, ng)).astype(np.float32)  # many ties
  for qc, gc in [(np.full(nq, -1), np.full(ng, -1)),           # no cameras at all
                 (rng.integers(-1, 2, nq), rng.integers(-1, 2, ng)),  # some unknown
                 (rng.integers(0, 2, nq), rng.integers(0, 2, ng))]:   # all known
    cmc, m_ap, m_inp, valid = brute_force(dist, qp, gp, qc, gc)
    res = evaluation.evaluate_rank(dist, qp, gp, qc, gc, max_rank=ng)
    np.testing.assert_allclose(res["cmc"], cmc, rtol=0, atol=1e-12)
    np.testing.assert_allclose([res["mAP"], res["mINP"]], [m_ap, m_inp], rtol=1e-12)
    assert res["num_valid_queries"] == valid
  # With no cameras, a same-id pair is never junk: every same-id item is a positive.
  qc, gc = metrics.distinct_unknown_cameras(np.full(nq, -1), np.full(ng, -1))
  pos, junk = metrics.positive_and_junk(qp, qc, gp, gc)
  np.testing.assert_array_equal(pos, (qp[:, None] == gp[None, :]) & (gp != -1)[None, :])
  # The protocol says so once per process, in one line.
  monkeypatch.setattr(protocols, "_UNKNOWN_CAMERA_NOTED", [])
  emb = {"e": rng.normal(size=(nq, 3)).astype(np.float32)}
  gemb = {"e": rng.normal(size=(ng, 3)).astype(np.float32)}
  q_labels = {"person_id": qp, "camera_id": np.full(nq, -1)}
  g_labels = {"person_id": gp, "camera_id": np.full(ng, -1)}
  for _ in range(2):
    out, scored, total = protocols.market(emb, q_labels, gemb, g_labels, max_rank=5)
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"note: {nq} query and {ng} gallery items have no camera id (camera_id -1): "
                 "every gallery item counts as another camera, so no same-camera match is "
                 "excluded"]
  d = np.linalg.norm(emb["e"][:, None] - gemb["e"][None], axis=-1)
  assert out["e"]["mAP"] == pytest.approx(brute_force(d, qp, gp, np.full(nq, -1),
                                                      np.full(ng, -1))[1], rel=1e-6)
  assert folder.UNKNOWN_CAMERA == metrics.UNKNOWN_CAMERA


# ------------------------------------------------------------------------------- MSMT17


@pytest.mark.parametrize("form,release", [("zip", "V1"), ("folder", "V2")])
def test_msmt17(tmp_path, form, release):
  expected = fa.make_msmt17(tmp_path / "manual", form, release)
  builder = tfds.builder(f"msmt17/{release.lower()}", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / "manual")))
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 6, "query": 2, "gallery": 4}
  name = f"msmt17/{release.lower()}"
  check(records(name, "train", tmp_path / "data"), {**expected["train"], **expected["val"]})
  for split in ("query", "gallery"):
    check(records(name, split, tmp_path / "data"), expected[split])
  got = records(name, "train", tmp_path / "data")
  assert sorted({int(r["camera_id"]) for r in got.values()}) == [0, 1, 2, 6, 14]
  assert sorted({int(r["person_id"]) for r in got.values()}) == [0, 1, 2]


def test_msmt17_separate_val_and_cli(tmp_path, capsys):
  expected = fa.make_msmt17(tmp_path / "manual", "zip", "V2")
  assert prepare_cli.main(["msmt17/v2_separate_val", f"--manual_dir={tmp_path / 'manual'}",
                           f"--data_dir={tmp_path / 'data'}"]) == 0
  out = capsys.readouterr().out
  assert "val           2           2        2" in out, out
  for split in ("train", "val", "query", "gallery"):
    check(records("msmt17/v2_separate_val", split, tmp_path / "data"), expected[split])
  # The other release's config names the one that is there.
  with pytest.raises(ReidDataError) as err:
    tfds.builder("msmt17/v1", data_dir=str(tmp_path / "data")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  assert "holds MSMT17_V2: prepare msmt17/v2" in one_line(err)


BAD_MSMT = {
    "missing image": (dict(drop=("0001/" + fa.msmt17_name(1, 0, 3),)),
                      ["list_train.txt line 3", "is missing from", "re-extract"]),
    "malformed line": (dict(lines={"query": ["0000/" + fa.msmt17_name(0, 0, 4) + " 0",
                                             "0001/only_a_path.jpg"]}),
                       ["list_query.txt line 2: malformed line", "relative/path.jpg PID"]),
    "pid not integer": (dict(lines={"gallery": ["0000/" + fa.msmt17_name(0, 1, 5) + " x"]}),
                        ["list_gallery.txt line 1: malformed line"]),
    "camera 16": (dict(lines={"val": ["0000/" + fa.msmt17_name(0, 2, 16) + " 0"]}),
                  ["list_val.txt line 1: camera 16", "outside 1..15"]),
    "listed twice": (dict(lines={"val": ["0000/" + fa.msmt17_name(0, 0, 1) + " 0"]}),
                     ["list_val.txt line 1", "listed twice", "list_train.txt line 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MSMT))
def test_msmt17_bad_inputs(tmp_path, case):
  kwargs, needles = BAD_MSMT[case]
  fa.make_msmt17(tmp_path / "manual", "zip", "V1", **kwargs)
  with pytest.raises(ReidDataError) as err:
    tfds.builder("msmt17/v1", data_dir=str(tmp_path / "data")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  msg = one_line(err)
  for needle in needles:
    assert needle in msg, (needle, msg)


def test_msmt17_missing_archive_and_folder(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "x.txt").write_text("x")
  with pytest.raises(ReidDataError) as err:
    tfds.builder("msmt17", data_dir=str(tmp_path / "data")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  assert "Missing MSMT17_V2.zip (or its extracted folder MSMT17_V2/)" in one_line(err)
  fa.make_msmt17(tmp_path / "m2", "folder", "V2")
  for p in sorted((tmp_path / "m2" / "MSMT17_V2" / "mask_test_v2").rglob("*"), reverse=True):
    p.rmdir() if p.is_dir() else p.unlink()
  (tmp_path / "m2" / "MSMT17_V2" / "mask_test_v2").rmdir()
  with pytest.raises(ReidDataError) as err:
    tfds.builder("msmt17/v2", data_dir=str(tmp_path / "d2")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "m2")))
  assert "wrong layout, no mask_test_v2/ folder" in one_line(err)
