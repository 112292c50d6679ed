"""Builders of the real re-ID datasets, run on tiny fake archives in the official layouts."""

from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax import prepare as prepare_cli
from reid_jax.data import cuhk01, cuhk03, market1501
from reid_jax.data.common import ReidDataError
from tests import fake_archives as fa

tfds.disable_progress_bar()


def build(name: str, manual_dir: pathlib.Path | None, data_dir: pathlib.Path,
          **kwargs) -> tfds.core.DatasetBuilder:
  """Prepares `name` from `manual_dir` into `data_dir`."""
  builder = tfds.builder(name, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir) if manual_dir else None))
  return builder


def records(name: str, split: str, data_dir: pathlib.Path) -> dict[str, dict]:
  """All records of a split read back with `tfds.data_source`, keyed by file name."""
  source = tfds.data_source(name, split=split, data_dir=str(data_dir))
  out = {}
  for i in range(len(source)):
    r = source[i]
    key = r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]
    assert key not in out, key
    out[key] = r
  return out


def check_split(got: dict[str, dict], expected: dict[str, fa.Expected]) -> None:
  assert sorted(got) == sorted(expected)
  for name, exp in expected.items():
    r = got[name]
    assert r["image"].dtype == np.uint8 and r["image"].shape == exp.pixels.shape, name
    if exp.exact:
      np.testing.assert_array_equal(r["image"], exp.pixels, err_msg=name)
    else:  # JPEG: a solid colour survives within a few levels.
      assert np.abs(r["image"].astype(int) - exp.pixels).max() <= 4, name
    assert int(r["person_id"]) == exp.person_id, name
    assert int(r["camera_id"]) == exp.camera_id, name
    if exp.tracklet_id is not None:
      assert int(r["tracklet_id"]) == exp.tracklet_id, name
      assert int(r["frame_index"]) == exp.frame_index, name


def one_line(err: pytest.ExceptionInfo) -> str:
  msg = str(err.value)
  assert "\n" not in msg
  return msg


# ---------------------------------------------------------------------- Market-1501 / Duke


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_market1501(tmp_path, form):
  expected = fa.make_market(tmp_path / "manual", form)
  builder = build("market1501", tmp_path / "manual", tmp_path / "data")
  assert set(builder.info.splits) == {"train", "query", "gallery"}
  assert builder.info.splits["gallery"].num_examples == 6  # Thumbs.db skipped.
  features = builder.info.features
  assert features["person_id"].np_dtype == np.int32
  assert features["camera_id"].np_dtype == np.int32
  for split in ("train", "query", "gallery"):
    check_split(records("market1501", split, tmp_path / "data"), expected[split])
  gallery = records("market1501", "gallery", tmp_path / "data")
  ids = sorted(int(r["person_id"]) for r in gallery.values())
  assert ids == [-1, -1, 0, 0, 2, 7]


def test_dukemtmc_reid(tmp_path):
  expected = fa.make_duke(tmp_path / "manual", "zip")
  build("dukemtmc_reid", tmp_path / "manual", tmp_path / "data")
  for split in ("train", "query", "gallery"):
    check_split(records("dukemtmc_reid", split, tmp_path / "data"), expected[split])
  assert "withdrawn" in market1501.DukemtmcReid.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "DukeMTMC-reID.zip" in market1501.DukemtmcReid.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_market_missing_archive(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "unrelated.txt").write_text("x")
  with pytest.raises(ReidDataError) as err:
    build("market1501", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "Market-1501-v15.09.15.zip" in msg and "zheng-lab" in msg


def test_market_no_manual_dir(tmp_path):
  with pytest.raises(ReidDataError) as err:
    build("market1501", None, tmp_path / "data")
  msg = one_line(err)
  assert "Market-1501-v15.09.15.zip" in msg and "--manual_dir" in msg


def test_market_wrong_layout(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with zipfile.ZipFile(manual / fa.MARKET_ZIP, "w") as zf:  # No query/ folder.
    zf.writestr(f"{fa.MARKET_TOP}/bounding_box_train/0002_c1s1_000451_03.jpg",
                fa.jpeg_bytes(fa.solid(0)))
    zf.writestr(f"{fa.MARKET_TOP}/bounding_box_test/0002_c1s1_000451_03.jpg",
                fa.jpeg_bytes(fa.solid(0)))
  with pytest.raises(ReidDataError) as err:
    build("market1501", manual, tmp_path / "data")
  assert f"{fa.MARKET_TOP}/query" in one_line(err)
  (manual / fa.MARKET_ZIP).unlink()
  with zipfile.ZipFile(manual / fa.MARKET_ZIP, "w") as zf:  # Files without the top folder.
    zf.writestr("bounding_box_train/0002_c1s1_000451_03.jpg", fa.jpeg_bytes(fa.solid(0)))
  with pytest.raises(ReidDataError) as err:
    build("market1501", manual, tmp_path / "data2")
  assert f"top-level folder {fa.MARKET_TOP}/" in one_line(err)


def test_market_bad_file_name(tmp_path):
  bad = f"{fa.MARKET_TOP}/bounding_box_train/img_0002.jpg"
  fa.make_market(tmp_path / "manual", "folder", extra={bad: fa.jpeg_bytes(fa.solid(0))})
  with pytest.raises(ReidDataError) as err:
    build("market1501", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "img_0002.jpg" in msg and "unexpected file name" in msg


def test_market_corrupt_image(tmp_path):
  name = f"{fa.MARKET_TOP}/query/0002_c6s1_000451_00.jpg"
  truncated = fa.jpeg_bytes(fa.solid(3, 64, 32))[:200]
  fa.make_market(tmp_path / "manual", "zip", extra={name: truncated})
  with pytest.raises(ReidDataError) as err:
    build("market1501", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "0002_c6s1_000451_00.jpg" in msg and "corrupt" in msg


def _assert_not_prepared(data_dir: pathlib.Path) -> None:
  builder = tfds.builder("market1501", data_dir=str(data_dir))
  assert not builder.is_prepared()
  with pytest.raises(Exception):
    tfds.data_source("market1501", split="train", data_dir=str(data_dir), download=False)
  leftovers = [p for p in (data_dir / "market1501").rglob("*") if p.is_file()]
  assert leftovers == []


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
  """A prepare that dies mid-way leaves no dataset that loads; the next one succeeds."""
  fa.make_market(tmp_path / "manual", "zip")
  data = tmp_path / "data"
  real = market1501.image_file
  calls = []

  def dies_on_fifth(data_bytes, where):
    calls.append(where)
    if len(calls) == 5:  # Train (3 images) is written, query is half done.
      raise KeyboardInterrupt
    return real(data_bytes, where)

  monkeypatch.setattr(market1501, "image_file", dies_on_fifth)
  with pytest.raises(KeyboardInterrupt):
    build("market1501", tmp_path / "manual", data)
  _assert_not_prepared(data)

  # A data error mid-way does the same.
  calls.clear()

  def corrupt_on_fifth(data_bytes, where):
    calls.append(where)
    return real(data_bytes[:100] if len(calls) == 5 else data_bytes, where)

  monkeypatch.setattr(market1501, "image_file", corrupt_on_fifth)
  with pytest.raises(ReidDataError):
    build("market1501", tmp_path / "manual", data)
  _assert_not_prepared(data)

  monkeypatch.setattr(market1501, "image_file", real)
  build("market1501", tmp_path / "manual", data)
  assert len(records("market1501", "gallery", data)) == 6


# --------------------------------------------------------------------------------- CUHK03


@pytest.fixture(scope="module")
def cuhk03_data(tmp_path_factory):
  """CUHK03 fakes: the zip prepared as `labeled`, the folder form as `detected`."""
  root = tmp_path_factory.mktemp("cuhk03")
  expected = fa.make_cuhk03(root / "zip", "zip")
  fa.make_cuhk03(root / "folder", "folder")
  build("cuhk03/labeled", root / "zip", root / "data")
  build("cuhk03/detected", root / "folder", root / "data")
  return root / "data", expected


@pytest.mark.parametrize("config", ["labeled", "detected"])
def test_cuhk03_new_protocol(cuhk03_data, config):
  data_dir, expected = cuhk03_data
  for split in ("train", "query", "gallery"):
    check_split(records(f"cuhk03/{config}", split, data_dir), expected[config][split])
  query = records(f"cuhk03/{config}", "query", data_dir)
  # Ids are pair * 1000 + person; cameras (pair - 1) * 2 + view - 1.
  assert sorted((int(r["person_id"]), int(r["camera_id"])) for r in query.values()) == [
      (1002, 0), (1002, 1), (3001, 4), (3001, 5)]


def test_cuhk03_classic(tmp_path):
  expected = fa.make_cuhk03(tmp_path / "manual", "zip", protocol_files=False)
  builder = build("cuhk03/classic_detected", tmp_path / "manual", tmp_path / "data")
  assert set(builder.info.splits) == {f"{s}_{k}" for s in ("train", "test") for k in range(20)}
  for k in (0, 1, 7, 19):
    for s in ("train", "test"):
      split = f"{s}_{k}"
      check_split(records("cuhk03/classic_detected", split, tmp_path / "data"),
                  expected["classic_detected"][split])
  test0 = records("cuhk03/classic_detected", "test_0", tmp_path / "data")
  assert {int(r["person_id"]) for r in test0.values()} == {1001, 2001}


def test_cuhk03_custom_classic_config(tmp_path):
  expected = fa.make_cuhk03(tmp_path / "manual", "folder", protocol_files=False)
  config = cuhk03.Cuhk03Config(name="classic_labeled_3", images="labeled",
                               protocol="classic", classic_splits=(3,))
  builder = cuhk03.Cuhk03(config=config, data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  assert set(builder.info.splits) == {"train_3", "test_3"}
  got = builder.as_data_source("test_3")
  assert sorted(r["file_name"].decode() for r in got) == sorted(
      expected["classic_labeled"]["test_3"])


def test_cuhk03_missing_files(tmp_path):
  fa.make_cuhk03(tmp_path / "manual", "zip", protocol_files=False)
  with pytest.raises(ReidDataError) as err:
    build("cuhk03/labeled", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "cuhk03_new_protocol_config_labeled.mat" in msg and "person-re-ranking" in msg
  (tmp_path / "manual" / "cuhk03_release.zip").unlink()
  with pytest.raises(ReidDataError) as err:
    build("cuhk03/classic_labeled", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "cuhk03_release.zip" in msg and "CUHK_identification" in msg


def test_cuhk03_bad_inputs(tmp_path):
  manual = tmp_path / "manual"
  fa.make_cuhk03(manual, "folder")
  fa.write_cuhk03_protocol(manual / "cuhk03_new_protocol_config_labeled.mat", "labeled",
                           filelist_override={"1_001_1_01.png": "1-001-1-01.png"})
  with pytest.raises(ReidDataError) as err:
    build("cuhk03/labeled", manual, tmp_path / "data")
  assert "'1-001-1-01.png'" in one_line(err)
  # A filelist entry pointing at an empty cell.
  fa.write_cuhk03_protocol(manual / "cuhk03_new_protocol_config_labeled.mat", "labeled",
                           filelist_override={"1_002_1_03.png": "1_002_1_04.png"})
  with pytest.raises(ReidDataError) as err:
    build("cuhk03/labeled", manual, tmp_path / "data")
  assert "1_002_1_04.png" in one_line(err) and "no such labeled image" in str(err.value)
  # A release file that is not HDF5.
  (manual / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"MATLAB 5.0 MAT-file, not v7.3")
  with pytest.raises(ReidDataError) as err:
    build("cuhk03/classic_labeled", manual, tmp_path / "data")
  assert "cuhk-03.mat" in one_line(err) and "HDF5" in str(err.value)


# ----------------------------------------------------------------------------------- MARS


@pytest.mark.parametrize("form,info_in_subdir", [("zip", True), ("folder", False)])
def test_mars(tmp_path, form, info_in_subdir):
  expected = fa.make_mars(tmp_path / "manual", form, info_in_subdir)
  builder = build("mars", tmp_path / "manual", tmp_path / "data")
  assert "tracklet_id" in builder.info.features and "frame_index" in builder.info.features
  for split in ("train", "query", "gallery"):
    check_split(records("mars", split, tmp_path / "data"), expected[split])
  query = records("mars", "query", tmp_path / "data")
  assert sorted({int(r["tracklet_id"]) for r in query.values()}) == [0, 4]
  gallery = records("mars", "gallery", tmp_path / "data")
  assert sorted({int(r["tracklet_id"]) for r in gallery.values()}) == [1, 2, 3, 5, 6]
  assert {int(r["person_id"]) for r in gallery.values()} == {-1, 0, 2, 4}


def test_mars_missing_info(tmp_path):
  fa.make_mars(tmp_path / "manual", "zip", skip=("tracks_test_info.mat",))
  with pytest.raises(ReidDataError) as err:
    build("mars", tmp_path / "manual", tmp_path / "data")
  msg = one_line(err)
  assert "tracks_test_info.mat" in msg and "MARS-evaluation" in msg
  (tmp_path / "manual" / "bbox_test.zip").unlink()
  fa.make_mars(tmp_path / "manual2", "zip")
  (tmp_path / "manual2" / "bbox_test.zip").unlink()
  with pytest.raises(ReidDataError) as err:
    build("mars", tmp_path / "manual2", tmp_path / "data")
  assert "bbox_test.zip" in one_line(err)


def test_mars_bad_inputs(tmp_path):
  manual = tmp_path / "manual"
  fa.make_mars(manual, "folder")
  # A frame listed in test_name.txt but missing from the archive.
  (manual / "bbox_test" / "0002" / "0002C3T0002F002.jpg").unlink()
  with pytest.raises(ReidDataError) as err:
    build("mars", manual, tmp_path / "data")
  assert "0002C3T0002F002.jpg" in one_line(err) and "missing" in str(err.value)
  # A track row whose frames belong to another person.
  names = (manual / "info" / "train_name.txt").read_text().replace(
      "0003C1T0001F001.jpg", "0009C1T0001F001.jpg")
  (manual / "info" / "train_name.txt").write_text(names)
  with pytest.raises(ReidDataError) as err:
    build("mars", manual, tmp_path / "data")
  assert "0009C1T0001F001.jpg" in one_line(err)
  names = names.replace("0009C1T0001F001.jpg", "frame1.jpg")
  (manual / "info" / "train_name.txt").write_text(names)
  with pytest.raises(ReidDataError) as err:
    build("mars", manual, tmp_path / "data")
  assert "'frame1.jpg'" in one_line(err)


# --------------------------------------------------------------------------------- CUHK01


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_cuhk01(tmp_path, form):
  expected = fa.make_cuhk01(tmp_path / "manual", form)
  build("cuhk01", tmp_path / "manual", tmp_path / "data")
  got = {s: records("cuhk01", s, tmp_path / "data") for s in ("train", "query", "gallery")}
  train_ids, test_ids = cuhk01.split_ids(list(range(1, fa.CUHK01_PEOPLE + 1)), seed=0)
  assert len(train_ids) == 3 and len(test_ids) == 3 and not train_ids & test_ids
  want = {
      "train": {n: e for n, e in expected.items() if e.person_id in train_ids},
      "query": {n: e for n, e in expected.items()
                if e.person_id in test_ids and e.camera_id == 0},
      "gallery": {n: e for n, e in expected.items()
                  if e.person_id in test_ids and e.camera_id == 1},
  }
  for split in want:
    check_split(got[split], want[split])
  assert len(got["query"]) == len(got["gallery"]) == 6


def test_cuhk01_seeds(tmp_path):
  """Seeds give reproducible, different splits; the real 971 ids split 485/486."""
  fa.make_cuhk01(tmp_path / "manual", "zip")
  seen = set()
  for seed in range(4):
    build(f"cuhk01/seed_{seed}", tmp_path / "manual", tmp_path / "data")
    train = records(f"cuhk01/seed_{seed}", "train", tmp_path / "data")
    ids = frozenset(int(r["person_id"]) for r in train.values())
    assert ids == cuhk01.split_ids(list(range(1, 7)), seed)[0]
    seen.add(ids)
  assert len(seen) > 1
  train, test = cuhk01.split_ids(list(range(1, 972)), seed=0)
  assert (len(train), len(test)) == (485, 486)
  assert cuhk01.split_ids(list(range(1, 972)), seed=0) == (train, test)


def test_cuhk01_bad_name(tmp_path):
  fa.make_cuhk01(tmp_path / "manual", "folder")
  (tmp_path / "manual" / "campus" / "0001005.png").write_bytes(fa.png_bytes(fa.pattern(1)))
  with pytest.raises(ReidDataError) as err:
    build("cuhk01", tmp_path / "manual", tmp_path / "data")
  assert "0001005.png" in one_line(err)


# ------------------------------------------------------------------------------------ CLI


def test_prepare_cli_market(tmp_path, capsys):
  fa.make_market(tmp_path / "manual", "zip")
  rc = prepare_cli.main(["market1501", f"--manual_dir={tmp_path / 'manual'}",
                         f"--data_dir={tmp_path / 'data'}"])
  out = capsys.readouterr().out
  assert rc == 0
  lines = out.strip().splitlines()
  assert lines[1].split() == ["split", "images", "identities", "cameras", "distractors",
                              "(id", "0)", "junk", "(id", "-1)"]
  assert lines[2].split() == ["train", "3", "2", "3", "0", "0"]
  assert lines[3].split() == ["query", "2", "2", "2", "0", "0"]
  assert lines[4].split() == ["gallery", "6", "2", "5", "2", "2"]
  assert lines[-1].startswith("wall time:")


def test_prepare_cli_mars_and_config(tmp_path, capsys):
  fa.make_mars(tmp_path / "manual", "zip")
  assert prepare_cli.main(["mars", "--manual_dir", str(tmp_path / "manual"),
                           "--data_dir", str(tmp_path / "data")]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[1].split()[-1] == "tracklets"
  assert lines[3].split() == ["query", "3", "2", "1", "0", "0", "2"]
  assert lines[4].split() == ["gallery", "9", "2", "5", "1", "2", "5"]
  fa.make_cuhk01(tmp_path / "manual", "zip")
  assert prepare_cli.main(["cuhk01", "--config=seed_2", "--manual_dir", str(tmp_path / "manual"),
                           "--data_dir", str(tmp_path / "data")]) == 0
  out = capsys.readouterr().out
  assert out.startswith("cuhk01/seed_2 1.0.0") and "distractors" not in out


def test_prepare_cli_errors(tmp_path, capsys):
  cases = [
      (["market1501", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'data'}"],
       "Missing Market-1501-v15.09.15.zip"),
      (["no_such_dataset"], "unknown dataset 'no_such_dataset'"),
      (["cuhk03", "--config=bogus"], "cuhk03 has no config 'bogus'"),
  ]
  for argv, text in cases:
    assert prepare_cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {captured.err.strip()[7:]}"]
    assert text in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_prepare_cli_synthetic(tmp_path, capsys):
  """Builders that need no manual_dir (the colleague's synthetic one) work too."""
  pytest.importorskip("reid_jax.data.synthetic")
  configs = [c.name for c in tfds.builder_cls("synthetic_reid").BUILDER_CONFIGS]
  if "tiny" not in configs:
    pytest.skip("synthetic_reid has no tiny config")
  assert prepare_cli.main(["synthetic_reid/tiny", f"--data_dir={tmp_path}"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("synthetic_reid/tiny")
  rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
  builder = tfds.builder("synthetic_reid/tiny", data_dir=str(tmp_path))
  assert set(rows) == set(builder.info.splits)
  for split, row in rows.items():
    assert int(row[0].replace(",", "")) == builder.info.splits[split].num_examples


def test_image_file_converts_non_rgb(tmp_path):
  """Grayscale input is stored as RGB PNG (the reader promises HxWx3)."""
  from PIL import Image

  from reid_jax.data.common import image_file
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 3), 77, np.uint8)).save(buf, format="PNG")
  out = Image.open(image_file(buf.getvalue(), "x.png"))
  assert out.mode == "RGB" and np.asarray(out).shape == (4, 3, 3)
  jpeg = fa.jpeg_bytes(fa.solid(1))
  assert image_file(jpeg, "y.jpg").getvalue() == jpeg  # RGB JPEG passes through as is.
  with pytest.raises(ReidDataError, match="z.jpg: corrupt"):
    image_file(b"not an image", "z.jpg")
