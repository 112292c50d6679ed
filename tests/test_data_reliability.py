"""Damaged or half-written data gives one-line errors, and prepare cleans up after itself.

Covers: a prepared dataset whose shard files do not match the metadata (truncated,
missing, too few records, a damaged chunk), stale `incomplete.*` folders of killed
prepares, an empty Market-1501 split folder, and prepare's `error:` line after a live
progress bar.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import sys
import time
import zipfile

import ml_collections
import pytest
import tensorflow_datasets as tfds
import tqdm
from array_record.python import array_record_module

from reid_jax import prepare as prepare_cli
from reid_jax.data import common, pipeline, sources
from reid_jax.data.common import ReidDataError
from tests import fake_archives as fa

tfds.disable_progress_bar()

NAME = "synthetic_reid/tiny"


def shard(data_dir: pathlib.Path, split: str) -> pathlib.Path:
  return data_dir / "synthetic_reid" / "tiny" / "1.1.0" / (
      f"synthetic_reid-{split}.array_record-00000-of-00001")


def dataset_cfg(data_dir: pathlib.Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": "synthetic_reid", "builder_config": "tiny",
                                    "data_dir": str(data_dir), "manual_dir": ""})


def damaged(data_dir: pathlib.Path, problem: str) -> str:
  """The exact message for a damaged `synthetic_reid/tiny` in `data_dir`."""
  return (f"prepared dataset {NAME} in {data_dir}/synthetic_reid/tiny/1.1.0 is damaged "
          f"({problem}); move that folder away and run "
          f"`python -m reid_jax.prepare {NAME} --data_dir={data_dir}`")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
  """`synthetic_reid/tiny` prepared once; tests damage copies of it."""
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.builder(NAME, data_dir=str(data_dir)).download_and_prepare()
  return data_dir


@pytest.fixture
def data_dir(prepared, tmp_path) -> pathlib.Path:
  """A private copy of the prepared dataset."""
  shutil.copytree(prepared, tmp_path / "data")
  return tmp_path / "data"


def shard_lengths(data_dir: pathlib.Path) -> dict[str, int]:
  info = tfds.builder(NAME, data_dir=str(data_dir)).info
  return {s: info.splits[s].shard_lengths[0] for s in info.splits}


# ------------------------------------------------------------------ damaged prepared data


def test_intact_dataset_opens(data_dir):
  builder = sources.ensure_prepared(dataset_cfg(data_dir))
  assert builder.is_prepared()
  source = sources.open_split(dataset_cfg(data_dir), "query")
  assert len(source) == shard_lengths(data_dir)["query"]
  assert int(source[0]["camera_id"]) >= 0
  assert pipeline._tfds_fast_ok(source)  # pylint: disable=protected-access
  assert len(pipeline.RecordReader(source).read([0, 1])) == 2


def test_truncated_shard_is_one_line_error(data_dir):
  path = shard(data_dir, "train")
  os.truncate(path, path.stat().st_size // 2)
  expected = damaged(data_dir, f"{path.name}: truncated or corrupt, metadata says "
                     f"{shard_lengths(data_dir)['train']} records")
  for opener in (sources.ensure_prepared, lambda c: sources.open_split(c, "query")):
    with pytest.raises(ReidDataError) as err:
      opener(dataset_cfg(data_dir))
    assert str(err.value) == expected
  assert path.is_file()  # The user's data is never deleted.


def test_missing_shard_is_one_line_error(data_dir):
  path = shard(data_dir, "gallery")
  path.unlink()
  with pytest.raises(ReidDataError) as err:
    sources.open_split(dataset_cfg(data_dir), "train")
  assert str(err.value) == damaged(
      data_dir, f"{path.name}: missing, metadata says {shard_lengths(data_dir)['gallery']} "
      "records")


def test_short_shard_is_one_line_error(data_dir):
  """A readable shard with fewer records than the metadata (e.g. from another prepare)."""
  path = shard(data_dir, "query")
  path.unlink()
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(3):
    writer.write(b"record %d" % i)
  writer.close()
  with pytest.raises(ReidDataError) as err:
    sources.ensure_prepared(dataset_cfg(data_dir))
  assert str(err.value) == damaged(
      data_dir, f"{path.name}: 3 records, metadata says {shard_lengths(data_dir)['query']}")


def test_shard_check_is_cached_per_mtime(data_dir, monkeypatch):
  sources.ensure_prepared(dataset_cfg(data_dir))

  def no_reopen(*args, **kwargs):
    raise AssertionError("reopened")

  monkeypatch.setattr(array_record_module, "ArrayRecordReader", no_reopen)
  sources.ensure_prepared(dataset_cfg(data_dir))  # Every count comes from the cache.
  path = shard(data_dir, "train")
  os.utime(path, (time.time() + 5, time.time() + 5))
  with pytest.raises(AssertionError, match="reopened"):  # A changed file is read again.
    sources.ensure_prepared(dataset_cfg(data_dir))


def test_damaged_record_is_one_line_error(data_dir):
  """A damaged chunk behind a sound footer fails on read, as one line naming the file."""
  path = shard(data_dir, "train")
  with open(path, "r+b") as f:
    f.seek(1000)
    f.write(b"\xff" * 20000)
  source = sources.open_split(dataset_cfg(data_dir), "train")  # The footer is fine.
  head = f"prepared dataset {NAME} in {data_dir}/synthetic_reid/tiny/1.1.0 is damaged ("
  tail = (f"); move that folder away and run "
          f"`python -m reid_jax.prepare {NAME} --data_dir={data_dir}`")
  with pytest.raises(ReidDataError) as err:
    source[0]
  msg = str(err.value)
  assert msg.startswith(f"{head}{path.name}, record 0: Corrupted Riegeli/records file")
  assert msg.endswith(tail) and "\n" not in msg
  # The loaders read the raw records (pipeline's fast path), also from a pickled copy.
  for src in (source, pickle.loads(pickle.dumps(source))):
    with pytest.raises(ReidDataError) as err:
      pipeline.RecordReader(src).read([0, 1])
    assert str(err.value).startswith(f"{head}{path.name}: Corrupted Riegeli/records file")
    assert str(err.value).endswith(tail)


def test_prepare_cli_reports_damaged_dataset(data_dir, capsys):
  path = shard(data_dir, "train")
  os.truncate(path, path.stat().st_size // 2)
  assert prepare_cli.main([NAME, f"--data_dir={data_dir}"]) == 1
  captured = capsys.readouterr()
  assert captured.err == "error: " + damaged(
      data_dir, f"{path.name}: truncated or corrupt, metadata says "
      f"{shard_lengths(data_dir)['train']} records") + "\n"
  assert captured.out == ""


# ------------------------------------------------------------- stale incomplete.* folders


def make_folder(path: pathlib.Path, nbytes: int, age_s: float,
                fresh_file: bool = False) -> None:
  """A fake tfds `incomplete.*` folder of `nbytes`, last written `age_s` ago."""
  (path / "sub").mkdir(parents=True)
  (path / "sub" / "shard").write_bytes(b"x" * nbytes)
  (path / "dataset_info.json").write_text("{}")
  then = time.time() - age_s
  for p in [path, path / "sub", path / "sub" / "shard", path / "dataset_info.json"]:
    os.utime(p, (then, then))
  if fresh_file:  # A live prepare writes files inside a folder it made long ago.
    os.utime(path / "sub" / "shard", None)


def test_prepare_removes_stale_incomplete(data_dir, capsys):
  parent = data_dir / "synthetic_reid" / "tiny"
  stale = parent / "incomplete.ABCDEF_1.1.0"
  make_folder(stale, 2_500_000, age_s=11 * 60)
  recent = parent / "incomplete.GHIJKL_1.1.0"
  make_folder(recent, 10, age_s=9 * 60)
  live = parent / "incomplete.MNOPQR_1.1.0"
  make_folder(live, 10, age_s=3600, fresh_file=True)
  other_config = data_dir / "synthetic_reid" / "default" / "incomplete.STUVWX_1.1.0"
  make_folder(other_config, 10, age_s=3600)
  assert prepare_cli.main([NAME, f"--data_dir={data_dir}"]) == 0
  err = capsys.readouterr().err.splitlines()
  assert err == ["removed stale incomplete.ABCDEF_1.1.0 (2.5 MB) left by an interrupted "
                 "prepare"]
  assert not stale.exists()
  assert recent.is_dir() and live.is_dir() and other_config.is_dir()
  assert shard(data_dir, "train").is_file()  # The prepared data is untouched.


def test_remove_stale_incomplete_without_dataset_folder(tmp_path, capsys):
  builder = tfds.builder(NAME, data_dir=str(tmp_path))
  assert prepare_cli.remove_stale_incomplete(builder) == []
  assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- empty split folder


def test_empty_market_query_folder(tmp_path, capsys):
  manual = tmp_path / "manual"
  fa.make_market(manual, "folder")
  query = manual / fa.MARKET_TOP / "query"
  for f in query.iterdir():
    if f.name != "Thumbs.db":  # Thumbs.db alone still counts as empty.
      f.unlink()
  argv = ["market1501", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}"]
  assert prepare_cli.main(argv) == 1
  captured = capsys.readouterr()
  assert captured.err == (f"error: {query} holds no .jpg images; the query split needs the "
                          "official images (re-extract the archive)\n")
  assert captured.out == ""
  assert not tfds.builder("market1501", data_dir=str(tmp_path / "data")).is_prepared()


def test_empty_market_query_folder_in_zip(tmp_path):
  manual = tmp_path / "manual"
  fa.make_market(tmp_path / "tree", "folder")
  manual.mkdir()
  with zipfile.ZipFile(manual / fa.MARKET_ZIP, "w") as zf:  # query/ is an empty folder.
    for path in sorted((tmp_path / "tree").rglob("*")):
      rel = path.relative_to(tmp_path / "tree").as_posix()
      if path.is_dir():
        zf.writestr(rel + "/", b"")
      elif "/query/" not in rel:
        zf.write(path, rel)
  builder = tfds.builder("market1501", data_dir=str(tmp_path / "data"))
  with pytest.raises(ReidDataError) as err:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert str(err.value) == (
      f"{manual / fa.MARKET_ZIP}:{fa.MARKET_TOP}/query holds no .jpg images; the query "
      "split needs the official images (download the zip again)")


def test_empty_split_fallback_message():
  """Builders whose splits come from index files (MARS, CUHK03) get one line too."""
  error = AssertionError('Failed to finalize writing of split "query": No examples were '
                         'yielded.')
  empty_split_error = common._empty_split_error  # pylint: disable=protected-access
  assert str(empty_split_error("mars", error, "/data/manual")) == (
      "mars: the query split came out empty: the files in /data/manual give it no images; "
      "check that they are the complete official files")
  assert empty_split_error("mars", AssertionError("other"), None) is None


# ------------------------------------------------------------ progress bar and error line


def test_error_line_after_live_progress_bar(tmp_path, capsys):
  bar = tqdm.tqdm(total=10, file=sys.stderr, desc="Generating train examples")
  bar.update(3)
  argv = ["market1501", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'data'}"]
  assert prepare_cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "Generating train examples" in err  # The bar did write its line.
  last = err.splitlines()[-1]
  assert last.startswith("error: Missing Market-1501-v15.09.15.zip")
  assert bar not in tqdm.tqdm._instances  # pylint: disable=protected-access
