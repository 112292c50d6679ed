"""tfds builder for CUHK01 (Li et al., ACCV 2012): 971 identities, two camera views.

`CUHK01.zip` holds `campus/` with 3,884 images named `0001001.png`: four digits person,
three digits image. Images 001-002 come from camera view A and 003-004 from view B, so
`camera_id = (image - 1) // 2` (0 = A, 1 = B), as in torchreid. `person_id` is the
dataset's own number (1..971).

Protocol (torchreid's `CUHK01`): the identities are shuffled and the first half
(`num_ids // 2` = 485) trains, the other 486 test. Split `train` holds all images of the
train identities; for the test identities, `query` holds their view-A images and
`gallery` their view-B images (torchreid's even-numbered splits; it also offers the
reverse, B as query). torchreid draws its 10 splits with an unseeded NumPy generator,
so they cannot be reproduced; here the split is drawn with
`numpy.random.default_rng(seed).permutation` over the sorted identities. Configs
`seed_0` (default) .. `seed_9` give ten reproducible splits; `Cuhk01Config(seed=...)`
any other.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, image_file
from reid_jax.data.common import iter_split_folder, reid_features

_HOMEPAGE = "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html"
_ZIP_NAME = "CUHK01.zip"
_TOP = "campus"
_IMAGE_NAME = re.compile(r"(?P<person>\d{4})(?P<image>\d{3})\.png")
_NUM_SEED_CONFIGS = 10


@dataclasses.dataclass(eq=False)
class Cuhk01Config(tfds.core.BuilderConfig):
  """CUHK01 split.

  Attributes:
    seed: seed of the identity permutation that picks the train half.
  """

  seed: int = 0


def split_ids(person_ids: list[int], seed: int) -> tuple[set[int], set[int]]:
  """Splits identities into (train, test): the first `len // 2` of a seeded permutation."""
  ids = np.array(sorted(set(person_ids)))
  order = np.random.default_rng(seed).permutation(len(ids))
  num_train = len(ids) // 2
  return set(ids[order[:num_train]].tolist()), set(ids[order[num_train:]].tolist())


class Cuhk01(ReidBuilder):
  """CUHK01: 971 identities x 4 images over two camera views."""

  name = "cuhk01"
  BUILDER_CONFIGS = [
      Cuhk01Config(name=f"seed_{s}", seed=s,
                   description=f"485/486 identity split drawn with seed {s}.")
      for s in range(_NUM_SEED_CONFIGS)
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "seed_0"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put `CUHK01.zip` (from the CUHK re-ID page {_HOMEPAGE},
  request form) in `manual_dir`; the extracted folder `campus/` (holding `0001001.png`
  ...) works too.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "CUHK01 person re-identification. Splits: train (485 ids, all images), query "
            "(view A images of the other 486 ids), gallery (their view B images). "
            "camera_id 0 = view A (images 001-002), 1 = view B (003-004)."),
        features=reid_features(),
        homepage=_HOMEPAGE,
        citation="""@inproceedings{li2012human,
  title={Human Reidentification with Transferred Metric Learning},
  author={Li, Wei and Zhao, Rui and Wang, Xiaogang},
  booktitle={ACCV}, year={2012}}""",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = self.manual_path(dl_manager, _ZIP_NAME, f"request it from {_HOMEPAGE}")
    archive = Archive.open(manual_dir, _ZIP_NAME, _TOP,
                           f"request it from {_HOMEPAGE}", self.resources)
    images = []  # (name, person, camera)
    for name in iter_split_folder(archive, _TOP):
      match = _IMAGE_NAME.fullmatch(name)
      if match is None:
        raise ReidDataError(
            f"{archive.where(f'{_TOP}/{name}')}: unexpected file name, expected names like "
            "0001001.png")
      image = int(match["image"])
      if not 1 <= image <= 4:
        raise ReidDataError(
            f"{archive.where(f'{_TOP}/{name}')}: image number {image} is outside 001-004")
      images.append((name, int(match["person"]), (image - 1) // 2))
    if not images:
      raise ReidDataError(f"{archive.where(_TOP)}: no images found")
    train, test = split_ids([p for _, p, _ in images], self.builder_config.seed)
    return {
        "train": self._generate_examples(archive, [x for x in images if x[1] in train]),
        "query": self._generate_examples(
            archive, [x for x in images if x[1] in test and x[2] == 0]),
        "gallery": self._generate_examples(
            archive, [x for x in images if x[1] in test and x[2] == 1]),
    }

  def _generate_examples(self, archive: Archive, images):
    for name, person, camera in images:
      rel = f"{_TOP}/{name}"
      yield name, {
          "image": image_file(archive.read(rel), archive.where(rel)),
          "person_id": person,
          "camera_id": camera,
          "file_name": name,
      }
