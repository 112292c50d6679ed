"""The `cuhk_sysu` builder, run on a tiny fake release in the authors' layout."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax import prepare as prepare_cli
from reid_jax.data import cuhk_sysu
from reid_jax.data.common import ReidDataError
from tests import fake_sysu as fs
from tests.test_builders import build, records

tfds.disable_progress_bar()

SPLITS = ("train", "query", "gallery")


def check_split(got: dict[str, dict], expected: dict) -> None:
  """Names, ids, cameras and exact pixels (crops of the decoded scene, stored as PNG)."""
  assert sorted(got) == sorted(expected)
  for name, exp in expected.items():
    r = got[name]
    assert r["image"].dtype == np.uint8 and r["image"].shape == exp.pixels.shape, name
    np.testing.assert_array_equal(r["image"], exp.pixels, err_msg=name)
    assert (int(r["person_id"]), int(r["camera_id"])) == (exp.person_id, exp.camera_id), name


def one_line(err: pytest.ExceptionInfo) -> str:
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def _rel(top: str, path: str) -> str:
  return f"{top}/{path}" if top else path


def test_fake_nests_as_the_public_loaders_read_it(tmp_path):
  """The fake .mat files answer the indexing of psdb.py / SeqNet's loaders.

  Those loaders run on the real release, so this pins the fake to the real nesting.
  """
  fs.make_cuhk_sysu(tmp_path, "folder")
  ann = tmp_path / "dataset" / "annotation"
  train = scipy.io.loadmat(ann / "test/train_test/Train.mat")["Train"].squeeze()
  got = []
  for item in train:
    scenes = item[0, 0][2].squeeze()
    for im_name, box, _ in scenes:
      got.append((str(item[0, 0][0][0]), str(im_name[0]), tuple(box.squeeze().astype(int))))
  assert got == [(p, s, b) for p, sc in fs.TRAIN.items() for s, b in sc]
  assert train.shape == (3,) and scipy.io.loadmat(
      ann / "test/train_test/Train.mat")["Train"][:, 0].shape == (3,)

  protoc = scipy.io.loadmat(ann / "test/train_test/TestG50.mat")["TestG50"].squeeze()
  assert [str(q["imname"][0, 0][0]) for q in protoc["Query"]] == ["s4.jpg", "s5.jpg", "s6.jpg"]
  assert list(protoc["Query"][0]["idlocate"][0, 0][0]) == [5, 5, 10, 20]
  for item, (pid, (_, gallery)) in zip(protoc, fs.TEST.items()):
    assert str(item["Query"][0, 0][3][0]) == pid
    positives = []
    for im_name, box, _ in item["Gallery"].squeeze():
      if box.size == 0:
        break
      positives.append((str(im_name[0]), tuple(box.squeeze().astype(int))))
    assert positives == [(s, b) for s, b in gallery if b is not None]
    assert [int(e[1][0].size) for e in item["Gallery"].squeeze()] == [
        0 if b is None else 4 for _, b in gallery]

  images = scipy.io.loadmat(ann / "Images.mat")["Img"].squeeze()
  s4 = [im for im in images if str(im[0][0]) == "s4.jpg"][0]
  boxes = np.asarray([b[0] for b in s4[2][0]]).reshape(-1, 4)
  assert boxes.tolist() == [[5, 5, 10, 20], [30, 6, 12, 24], [50, 25, 8, 16], [12, 40, 0, 5]]
  pool = scipy.io.loadmat(ann / "pool.mat")["pool"].squeeze()
  assert [str(a[0]) for a in pool] == list(fs.TEST_SCENES)


@pytest.mark.parametrize("form,top", [("zip", "dataset"), ("folder", "cuhk_sysu"),
                                      ("folder", "")])
def test_cuhk_sysu(tmp_path, form, top):
  fake = fs.make_cuhk_sysu(tmp_path / "manual", form, top=top)
  builder = build("cuhk_sysu", tmp_path / "manual", tmp_path / "data")
  assert {s: builder.info.splits[s].num_examples for s in SPLITS} == {
      "train": 6, "query": 3, "gallery": 5}
  got = {s: records("cuhk_sysu", s, tmp_path / "data") for s in SPLITS}
  for split in SPLITS:
    check_split(got[split], fake.splits["default"][split])
  # Ids are idname numbers; every scene s{n} is camera n - 1.
  assert sorted((int(r["person_id"]), int(r["camera_id"])) for r in got["query"].values()) == [
      (21, 3), (22, 4), (23, 5)]
  assert sorted((int(r["person_id"]), int(r["camera_id"])) for r in got["gallery"].values()) == [
      (21, 4), (21, 5), (22, 3), (22, 6), (23, 7)]
  assert sorted(int(r["person_id"]) for r in got["train"].values()) == [11, 11, 12, 12, 13, 13]
  # Each crop is the person's solid rectangle (JPEG keeps it within a few levels).
  for split in SPLITS:
    for name, r in got[split].items():
      inner = r["image"][2:-2, 2:-2].reshape(-1, 3).astype(int)
      assert np.abs(np.median(inner, 0) - fake.colours[name]).max() <= 3, name
      assert np.abs(inner - fake.colours[name]).max() <= 12, name
  # Boxes past the scene edge are clipped: p12 in s3 (52, -4, 20, 30) -> columns 52..63,
  # rows 0..25; p23 in s8 (3, 30, 10, 30) -> rows 30..47.
  clipped = got["train"]["s3_52_-4_20_30.png"]["image"]
  assert clipped.shape == (26, 12, 3)
  np.testing.assert_array_equal(clipped, fake.scenes["s3.jpg"][0:26, 52:64])
  assert got["gallery"]["s8_3_30_10_30.png"]["image"].shape == (18, 10, 3)
  # Exact pixels of one crop against the scene decoded here.
  np.testing.assert_array_equal(got["query"]["s5_40_8_12_24.png"]["image"],
                                fake.scenes["s5.jpg"][8:32, 40:52])


def test_cuhk_sysu_distractors(tmp_path):
  fake = fs.make_cuhk_sysu(tmp_path / "manual", "zip", zip_name="cuhk_sysu.zip")
  build("cuhk_sysu/distractors", tmp_path / "manual", tmp_path / "data")
  got = {s: records("cuhk_sysu/distractors", s, tmp_path / "data") for s in SPLITS}
  for split in SPLITS:
    check_split(got[split], fake.splits["distractors"][split])
  # 5 matches + the other 6 people of gallery scenes s4..s8; the zero-size box of s4
  # is dropped and no box appears twice.
  ids = sorted(int(r["person_id"]) for r in got["gallery"].values())
  assert ids == [0, 0, 0, 21, 21, 21, 22, 22, 22, 23, 23]
  assert "s4_12_40_0_5.png" not in got["gallery"]


def test_box_and_clip():
  where = "x.mat"
  assert cuhk_sysu.box(np.zeros((1, 0)), where) is None  # no person in this scene
  assert cuhk_sysu.box(np.zeros((1, 4)), where) is None
  assert cuhk_sysu.box(np.array([[3.0, 4.0, 5.0, 6.0]]), where) == (3, 4, 5, 6)
  with pytest.raises(ReidDataError, match="x.mat: idlocate should be 4 numbers"):
    cuhk_sysu.box(np.array([[1.0, 2.0, 3.0]]), where)
  assert cuhk_sysu.clip((-3, 5, 10, 50), height=40, width=30) == (5, 40, 0, 7)
  assert cuhk_sysu.clip((30, 5, 10, 10), height=40, width=30) is None
  assert cuhk_sysu.scene_camera("s1.jpg") == 0 and cuhk_sysu.scene_camera("s18184.jpg") == 18183
  assert cuhk_sysu.person_number("p1234", where) == 1234
  with pytest.raises(ReidDataError, match="expected names like p1234"):
    cuhk_sysu.person_number("1234", where)


def test_cuhk_sysu_missing_files(tmp_path):
  data = tmp_path / "data"
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("x")
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "empty", data)
  msg = one_line(err)
  assert "Missing CUHK-SYSU" in msg and "dataset.zip" in msg and "person_search" in msg

  fs.make_cuhk_sysu(tmp_path / "m1", "zip", skip=("annotation/test/train_test/TestG50.mat",))
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m1", data)
  msg = one_line(err)
  assert "dataset.zip:dataset/annotation/test/train_test/TestG50.mat: file is missing" in msg
  assert "download the zip again" in msg

  fs.make_cuhk_sysu(tmp_path / "m2", "folder", skip=("Image/SSM/s7.jpg",))
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m2", data)
  msg = one_line(err)
  scene = tmp_path / "m2" / "dataset" / "Image" / "SSM" / "s7.jpg"
  assert f"{scene}: scene image is missing (1 of the 8 scenes to crop are)" in msg
  assert "re-extract the archive" in msg

  fs.make_cuhk_sysu(tmp_path / "m3", "folder", skip=("annotation/Images.mat",))
  build("cuhk_sysu", tmp_path / "m3", data)  # The default config does not need it.
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu/distractors", tmp_path / "m3", data)
  assert "annotation/Images.mat: file is missing" in one_line(err)
  config = cuhk_sysu.CuhkSysuConfig(name="g100", gallery_size=100)
  with pytest.raises(ReidDataError) as err:
    cuhk_sysu.CuhkSysu(config=config, data_dir=str(data)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "m3")))
  assert "TestG100.mat: file is missing" in one_line(err)
  config = cuhk_sysu.CuhkSysuConfig(name="g7", gallery_size=7)
  with pytest.raises(ReidDataError, match="gallery_size must be one of 50, 100"):
    cuhk_sysu.CuhkSysu(config=config, data_dir=str(data)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "m3")))


def test_cuhk_sysu_bad_inputs(tmp_path):
  data = tmp_path / "data"
  bad = {**fs.TRAIN, "p12": [("s2.jpg", (5, 8, 10, 22)), ("s3.jpg", (52, 4, 0, 30))]}
  fs.make_cuhk_sysu(tmp_path / "m1", "folder", train=bad)
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m1", data)
  msg = one_line(err)
  assert ("Train.mat: Train{2}.scene(2): labelled box (x, y, w, h) = (52, 4, 0, 30) has no "
          "area") in msg

  outside = {**fs.TRAIN, "p13": [("s1.jpg", (70, 20, 8, 16))]}
  fs.make_cuhk_sysu(tmp_path / "m2", "folder", train=outside)
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m2", data)
  msg = one_line(err)
  assert "Train{3}.scene(1): box (70, 20, 8, 16) lies outside scene" in msg and "s1.jpg" in msg

  fs.make_cuhk_sysu(tmp_path / "m3", "folder")
  (tmp_path / "m3" / "dataset" / "Image" / "SSM" / "s4.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m3", data)
  assert "s4.jpg: corrupt or unreadable image" in one_line(err)

  (tmp_path / "m4").mkdir()
  with zipfile.ZipFile(tmp_path / "m4" / "dataset.zip", "w") as zf:
    zf.writestr("dataset/readme.txt", "no annotation here")
  with pytest.raises(ReidDataError) as err:
    build("cuhk_sysu", tmp_path / "m4", data)
  assert "dataset.zip: wrong layout" in one_line(err)


def test_cuhk_sysu_any_top_folder_in_zip(tmp_path):
  fake = fs.make_cuhk_sysu(tmp_path / "manual", "zip", top="CUHK-SYSU", zip_name="dataset.zip")
  build("cuhk_sysu", tmp_path / "manual", tmp_path / "data")
  check_split(records("cuhk_sysu", "query", tmp_path / "data"),
              fake.splits["default"]["query"])


def test_prepare_cli_cuhk_sysu(tmp_path):
  """`python -m reid_jax.prepare cuhk_sysu/distractors --manual_dir=... --data_dir=...`."""
  fs.make_cuhk_sysu(tmp_path / "manual", "zip")
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
  run = subprocess.run(
      [sys.executable, "-m", "reid_jax.prepare", "cuhk_sysu/distractors",
       f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}"],
      cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  assert lines[0].startswith("cuhk_sysu/distractors 1.0.0")
  rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
  # images, identities (id > 0), cameras (scenes), distractors (id 0), junk (id -1)
  assert rows == {"train": ["6", "3", "3", "0", "0"], "query": ["3", "3", "3", "0", "0"],
                  "gallery": ["11", "3", "5", "3", "0"]}
  assert prepare_cli.main(["cuhk_sysu", f"--manual_dir={tmp_path}",
                           f"--data_dir={tmp_path / 'data'}"]) == 1  # No release there.
