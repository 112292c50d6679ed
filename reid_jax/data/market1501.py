"""tfds builders for Market-1501 and DukeMTMC-reID (same folder and naming format).

Both official zips hold one top folder with `bounding_box_train/` (split `train`),
`query/` (split `query`) and `bounding_box_test/` (split `gallery`). File names start with
the person id and the camera: Market `0002_c1s1_000451_03.jpg` (person 2, camera 1,
sequence 1, frame 451, box 3), Duke `0001_c2_f0046182.jpg` (person 1, camera 2, frame
46182). `person_id` is that number as-is: in Market, `0000` marks distractors (id 0) and
`-1` junk boxes (id -1). `camera_id` is the camera number minus one (`c1` -> 0).
"""

from __future__ import annotations

import re

import tensorflow_datasets as tfds

from reid_jax.data.common import Archive, ReidBuilder, ReidDataError, image_file
from reid_jax.data.common import reid_features, split_images

_SPLIT_FOLDERS = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
}

_MARKET_URL = "https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html"
_DUKE_URL = "https://github.com/layumi/DukeMTMC-reID_evaluation"


class _BoundingBoxBuilder(ReidBuilder, skip_registration=True):
  """Shared logic of the Market-1501-style builders."""

  ZIP_NAME: str
  TOP_FOLDER: str
  NAME_PATTERN: re.Pattern
  NAME_EXAMPLE: str
  NUM_CAMERAS: int
  SOURCE_HINT: str
  DESCRIPTION: str
  HOMEPAGE: str
  CITATION: str

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=reid_features(),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = self.manual_path(dl_manager, self.ZIP_NAME, self.SOURCE_HINT)
    archive = Archive.open(manual_dir, self.ZIP_NAME, self.TOP_FOLDER, self.SOURCE_HINT,
                           self.resources)
    folders = {split: f"{self.TOP_FOLDER}/{folder}" for split, folder in _SPLIT_FOLDERS.items()}
    # Check the layout (every folder there, none empty) before writing anything.
    names = {split: split_images(archive, folder, split, ".jpg")
             for split, folder in folders.items()}
    return {split: self._generate_examples(archive, folder, names[split])
            for split, folder in folders.items()}

  def _generate_examples(self, archive: Archive, folder: str, names: list[str]):
    for name in names:
      rel = f"{folder}/{name}"
      match = self.NAME_PATTERN.fullmatch(name)
      if match is None:
        raise ReidDataError(
            f"{archive.where(rel)}: unexpected file name, expected names like "
            f"{self.NAME_EXAMPLE}")
      camera = int(match["camera"])
      if not 1 <= camera <= self.NUM_CAMERAS:
        raise ReidDataError(
            f"{archive.where(rel)}: camera c{camera} is outside c1..c{self.NUM_CAMERAS}")
      yield name, {
          "image": image_file(archive.read(rel), archive.where(rel)),
          "person_id": int(match["person"]),
          "camera_id": camera - 1,
          "file_name": name,
      }


class Market1501(_BoundingBoxBuilder):
  """Market-1501: 1,501 identities, 6 cameras (Zheng et al., ICCV 2015)."""

  name = "market1501"
  HAS_DISTRACTORS_AND_JUNK = True
  ZIP_NAME = "Market-1501-v15.09.15.zip"
  TOP_FOLDER = "Market-1501-v15.09.15"
  # 24 files of the official zip end in `.jpg.jpg` (e.g. query/1488_c1s6_023021_00.jpg.jpg);
  # they are part of the official counts, so the doubled extension is accepted.
  NAME_PATTERN = re.compile(
      r"(?P<person>-1|\d{4})_c(?P<camera>\d)s\d_\d{6}_\d{2}\.jpg(?:\.jpg)?")
  NAME_EXAMPLE = "0002_c1s1_000451_03.jpg"
  NUM_CAMERAS = 6
  SOURCE_HINT = f"download it from {_MARKET_URL} (or the authors' Google Drive/Baidu links there)"
  HOMEPAGE = _MARKET_URL
  DESCRIPTION = (
      "Market-1501 person re-identification benchmark. Splits: train (bounding_box_train, "
      "12,936 images, 751 ids), query (3,368 images, 750 ids), gallery (bounding_box_test, "
      "19,732 images incl. 2,798 distractors with person_id 0 and 3,819 junk boxes with "
      "person_id -1). camera_id is 0-based (c1 -> 0).")
  CITATION = """@inproceedings{zheng2015scalable,
  title={Scalable Person Re-identification: A Benchmark},
  author={Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong
    and Tian, Qi},
  booktitle={ICCV}, year={2015}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put `Market-1501-v15.09.15.zip` (from the authors' page
  {_MARKET_URL}, which links Google Drive and Baidu
  copies) in `manual_dir`, as downloaded. The extracted folder
  `Market-1501-v15.09.15/` (holding `bounding_box_train/`, `bounding_box_test/` and
  `query/`) works too.
  """


class DukemtmcReid(_BoundingBoxBuilder):
  """DukeMTMC-reID: 1,404 identities plus 408 distractor ids, 8 cameras (Zheng et al., 2017)."""

  name = "dukemtmc_reid"
  ZIP_NAME = "DukeMTMC-reID.zip"
  TOP_FOLDER = "DukeMTMC-reID"
  NAME_PATTERN = re.compile(r"(?P<person>\d{4})_c(?P<camera>\d)_f\d{7}\.jpg")
  NAME_EXAMPLE = "0001_c2_f0046182.jpg"
  NUM_CAMERAS = 8
  SOURCE_HINT = (
      f"the dataset was withdrawn by its owners and is no longer distributed; if you have a "
      f"copy of the original zip (formerly linked from {_DUKE_URL}), put it there")
  HOMEPAGE = _DUKE_URL
  DESCRIPTION = (
      "DukeMTMC-reID (withdrawn by the DukeMTMC owners; loaded for users who already have "
      "it). Splits: train (bounding_box_train, 16,522 images, 702 ids), query (2,228 "
      "images, 702 ids), gallery (bounding_box_test, 17,661 images, 1,110 ids). "
      "camera_id is 0-based (c1 -> 0), 8 cameras.")
  CITATION = """@inproceedings{zheng2017unlabeled,
  title={Unlabeled Samples Generated by GAN Improve the Person Re-identification Baseline in vitro},
  author={Zheng, Zhedong and Zheng, Liang and Yang, Yi},
  booktitle={ICCV}, year={2017}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  DukeMTMC-reID was withdrawn by the owners of DukeMTMC in 2019 and is no longer
  distributed (its former home is {_DUKE_URL}). If you already
  have `DukeMTMC-reID.zip`, put it in `manual_dir` as is; the extracted folder
  `DukeMTMC-reID/` (holding `bounding_box_train/`, `bounding_box_test/` and
  `query/`) works too. Check that your use complies with the original terms.
  """
