"""Prepares a re-ID dataset (any registered tfds builder) and prints per-split statistics.

Usage:
  python -m reid_jax.prepare NAME [--manual_dir=DIR] [--data_dir=DIR] [--config=CONFIG]
  python -m reid_jax.prepare folder --manual_dir=DIR [--config.pattern=REGEX | --config.manifest=FILE]

NAME is a tfds builder name (`market1501`, `dukemtmc_reid`, `cuhk03`, `mars`, `cuhk01`,
`synthetic_reid`, ...), optionally with its config as `NAME/CONFIG`. `--manual_dir` is
the folder holding the official archives (not needed for self-contained builders);
`--data_dir` defaults to tfds's (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). The data
is written as array_record, readable with `tfds.data_source(NAME, split=..., data_dir=...)`.
Builders with options (`folder`: `--config.pattern`, `--config.manifest`) get a config
built from them and `--manual_dir` (`config_from_options`), named by a hash of them, so
different options never share one prepared dataset; the name is printed.

For each split it prints the number of images, identities and cameras; for datasets where
person_id 0 marks distractors and -1 junk (Market-1501, MARS) also those counts, with
identities then counting real people only; for video datasets also tracklets. Data
errors print one line naming the file and exit with status 1. An already prepared
dataset is checked against its metadata instead of being prepared again, and folders
left by an interrupted prepare (`incomplete.*`, untouched for 10 minutes) are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import shutil
import sys
import time
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax.data.common import FILE_FORMAT, ReidBuilder, ReidDataError, check_prepared
from reid_jax.data.common import full_name, guard_reads
from reid_jax.core.writer import end_progress_bars

_CHUNK = 4096  # Records read per batch when counting.
#: An `incomplete.*` folder untouched this long is a dead prepare's (a live one writes on).
STALE_AFTER_S = 600.0


def _reid_builder_names() -> list[str]:
  """Names of the registered reid_jax builders, for the unknown-name message."""
  names, todo = set(), list(ReidBuilder.__subclasses__())
  while todo:
    cls = todo.pop()
    todo.extend(cls.__subclasses__())
    if "name" in vars(cls) and not cls.__name__.startswith("_"):
      names.add(cls.name)
  return sorted(names)


def load_builder(name: str, config: str | None = None, data_dir: str | None = None,
                 manual_dir: str | None = None, options: dict[str, str] | None = None
                ) -> tfds.core.DatasetBuilder:
  """The tfds builder `name` (optionally `name/config`), with one-line errors.

  `options` (`{"pattern": ...}` from `--config.pattern=...`) go to the builder class's
  `config_from_options(manual_dir, **options)`, for builders that have one.
  """
  options = {k: v for k, v in (options or {}).items() if v is not None}
  if config:
    if "/" in name:
      raise ReidDataError(f"give the config once: {name!r} already names one, so drop --config")
    name = f"{name}/{config}"
  base = name.split("/")[0]
  try:
    cls = tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    raise ReidDataError(
        f"unknown dataset {base!r}: not a registered tfds builder "
        f"(reid_jax builders: {', '.join(_reid_builder_names())})") from None
  from_options = getattr(cls, "config_from_options", None)
  if options and (from_options is None or "/" in name):
    flags_given = ", ".join(f"--config.{k}" for k in options)
    raise ReidDataError(f"{flags_given}: only for the builders that take options (folder), "
                        "and without a config name; drop them or the /CONFIG part")
  if from_options is not None and "/" not in name:
    return tfds.builder(base, config=from_options(manual_dir, **options), data_dir=data_dir,
                        file_format=FILE_FORMAT)
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if from_options is not None:  # `folder/NAME`: a prepared one is read from its files.
    return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
  if "/" in name and name.split("/", 1)[1] not in configs:
    available = ", ".join(configs) if configs else "none"
    raise ReidDataError(
        f"{base} has no config {name.split('/', 1)[1]!r} (available: {available})")
  return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)


def _newest_mtime_and_bytes(folder: pathlib.Path) -> tuple[float, int]:
  """(latest modification time of `folder` or anything below it, total file bytes)."""
  newest, total = folder.stat().st_mtime, 0
  for root, dirs, files in os.walk(folder):
    for entry, is_file in [(d, False) for d in dirs] + [(f, True) for f in files]:
      with contextlib.suppress(OSError):  # A live prepare may rename it meanwhile.
        st = os.stat(os.path.join(root, entry))
        newest = max(newest, st.st_mtime)
        total += st.st_size if is_file else 0
  return newest, total


def remove_stale_incomplete(builder: tfds.core.DatasetBuilder,
                            stale_after_s: float = STALE_AFTER_S) -> list[pathlib.Path]:
  """Removes the `incomplete.*` folders a killed prepare of `builder` left; returns them.

  tfds writes into `<data_dir>/<name>[/<config>]/incomplete.<random>_<version>` and renames
  it when done, so a killed prepare leaves one behind (37 MB for Market-1501). Only
  folders of this builder untouched for `stale_after_s` go: a concurrent prepare keeps
  writing into its own. One line per folder removed goes to stderr.
  """
  parent = pathlib.Path(os.fspath(builder.data_dir)).parent
  if not parent.is_dir():
    return []
  removed = []
  for folder in sorted(parent.glob("incomplete.*")):
    try:
      if not folder.is_dir():
        continue
      newest, size = _newest_mtime_and_bytes(folder)
      if time.time() - newest < stale_after_s:
        continue
      shutil.rmtree(folder)
    except OSError as e:
      print(f"could not remove stale {folder.name}: {e}", file=sys.stderr)
      continue
    print(f"removed stale {folder.name} ({size / 1e6:.1f} MB) left by an interrupted prepare",
          file=sys.stderr)
    removed.append(folder)
  return removed


def prepare(name: str, manual_dir: str | None = None, data_dir: str | None = None,
            config: str | None = None, options: dict[str, str] | None = None
           ) -> tfds.core.DatasetBuilder:
  """Prepares `name` and returns its builder.

  Stale `incomplete.*` folders of earlier, killed prepares are removed first. An already
  prepared dataset is only checked (`check_prepared`: a damaged one is a one-line
  `ReidDataError`).
  """
  builder = load_builder(name, config, data_dir, manual_dir, options)
  remove_stale_incomplete(builder)
  if builder.is_prepared():
    check_prepared(builder)
    return builder
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  # tfds prints progress notes on stdout; keep stdout for the statistics and only show
  # the notes (on stderr) when preparing succeeds, so a data error prints one line.
  notes = io.StringIO()
  with contextlib.redirect_stdout(notes):
    builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
  sys.stderr.write(notes.getvalue())
  return builder


def split_stats(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, int]:
  """Counts images, identities, cameras (and distractors/junk, tracklets) of one split."""
  features = builder.info.features
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if isinstance(f, tfds.features.Image)}
  source = guard_reads(builder.as_data_source(split, decoders=skip), builder, split)
  cols = [k for k in ("person_id", "camera_id", "tracklet_id") if k in features]
  values = {k: [] for k in cols}
  for start in range(0, len(source), _CHUNK):
    for record in source.__getitems__(range(start, min(start + _CHUNK, len(source)))):
      for k in cols:
        values[k].append(int(record[k]))
  person = np.asarray(values["person_id"], np.int64)
  special = bool(getattr(builder, "HAS_DISTRACTORS_AND_JUNK", False))
  people = person[person > 0] if special else person
  stats = {
      "images": len(source),
      "identities": int(np.unique(people).size),
      "cameras": int(np.unique(values["camera_id"]).size),
  }
  if special:
    stats["distractors (id 0)"] = int(np.sum(person == 0))
    stats["junk (id -1)"] = int(np.sum(person == -1))
  if "tracklet_id" in values:
    stats["tracklets"] = int(np.unique(values["tracklet_id"]).size)
  return stats


def format_stats(stats: dict[str, dict[str, int]]) -> str:
  """A right-aligned table, one row per split."""
  splits = list(stats)
  columns = list(next(iter(stats.values()))) if stats else []
  width0 = max([len("split")] + [len(s) for s in splits])
  widths = [max(len(c), *(len(f"{stats[s][c]:,}") for s in splits)) for c in columns]
  lines = ["  ".join([f"{'split':<{width0}}"] + [f"{c:>{w}}" for c, w in zip(columns, widths)])]
  for s in splits:
    lines.append("  ".join([f"{s:<{width0}}"] +
                           [f"{stats[s][c]:>{w},}" for c, w in zip(columns, widths)]))
  return "\n".join(lines)


def _split_order(names: Sequence[str]) -> list[str]:
  """train/query/gallery first, then the rest in natural order (train_2 before train_10)."""
  first = ["train", "query", "gallery", "test"]

  def key(n: str):
    base, _, num = n.rpartition("_")
    if num.isdigit():
      return (len(first), int(num), base)
    return (first.index(n) if n in first else len(first), -1, n)

  return sorted(names, key=key)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m reid_jax.prepare",
      description="Prepare a re-ID tfds dataset and print per-split statistics.")
  parser.add_argument("name", help="tfds builder name, e.g. market1501 or cuhk03/labeled")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding the official archives (as downloaded)")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data_dir to write to (default: tfds's default)")
  parser.add_argument("--config", default=None, help="builder config, e.g. labeled")
  parser.add_argument("--config.pattern", dest="pattern", default=None,
                      help="folder: regex with groups pid (and camid) for the file names")
  parser.add_argument("--config.manifest", dest="manifest", default=None,
                      help="folder: CSV file,person_id,camera_id,split (instead of a pattern)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  try:
    builder = prepare(args.name, args.manual_dir, args.data_dir, args.config,
                      {"pattern": args.pattern, "manifest": args.manifest})
    stats = {s: split_stats(builder, s) for s in _split_order(list(builder.info.splits))}
  except ReidDataError as e:
    end_progress_bars()
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{full_name(builder)} {builder.version}: {builder.data_dir}")
  if builder.builder_config is not None and builder.builder_config.name not in [
      c.name for c in type(builder).BUILDER_CONFIGS]:
    print(f"train on it with --config.dataset.name={builder.name} "
          f"--config.dataset.builder_config={builder.builder_config.name}")
  print(format_stats(stats))
  print(f"wall time: {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
