"""Opens the tfds data sources a config names, preparing them first when that is possible.

A prepared dataset is checked on open (its shard files against the metadata, footers
only), and its sources turn a damaged record into a one-line `ReidDataError`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import tensorflow_datasets as tfds

import reid_jax.data  # noqa: F401  (registers the builders)
from reid_jax.data.common import ReidDataError, check_prepared, guard_reads

# Datasets that need no download: prepared on first use.
_SELF_CONTAINED = ("synthetic_reid", "synthetic_video_reid")


def data_dir(cfg: ml_collections.ConfigDict) -> str:
  """The tfds data_dir of a dataset config ("" -> tfds default ~/tensorflow_datasets)."""
  return os.path.expanduser(cfg.data_dir) if cfg.data_dir else os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def full_name(cfg: ml_collections.ConfigDict) -> str:
  """'market1501' or 'cuhk03/labeled': the tfds name with its builder config."""
  return f"{cfg.name}/{cfg.builder_config}" if cfg.builder_config else cfg.name


def ensure_prepared(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the builder, preparing it if it is self-contained or a manual_dir is set.

  In multi-host runs process 0 prepares and the others wait for it. An already prepared
  dataset whose shard files do not match its metadata (missing, truncated) is a one-line
  `ReidDataError` naming the file and the command that rebuilds it; nothing is deleted.
  """
  name = full_name(cfg)
  try:
    builder = tfds.builder(name, data_dir=data_dir(cfg))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ReidDataError(f"config.dataset.name={name!r} is not a reid_jax dataset: "
                        f"{str(e).splitlines()[0]}") from None
  if builder.is_prepared():
    check_prepared(builder)
    return builder
  if cfg.name not in _SELF_CONTAINED and not cfg.manual_dir:
    raise ReidDataError(
        f"dataset {name} is not prepared in {data_dir(cfg)}; run `python -m "
        f"reid_jax.prepare {name} --manual_dir=DIR --data_dir={data_dir(cfg)}` or set "
        "--config.dataset.manual_dir=DIR (the folder holding the official archive)")
  if jax.process_index() == 0:
    dl = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(cfg.manual_dir)
                                      if cfg.manual_dir else None)
    builder.download_and_prepare(download_config=dl)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"prepared {name}")
  return tfds.builder(name, data_dir=data_dir(cfg))


def open_split(cfg: ml_collections.ConfigDict, split: str):
  """A random-access tfds data source of one split (damaged records: `ReidDataError`)."""
  builder = ensure_prepared(cfg)
  source = tfds.data_source(full_name(cfg), split=split, data_dir=data_dir(cfg))
  return guard_reads(source, builder, split)
