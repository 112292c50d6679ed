"""A tiny fake CUHK-SYSU release in the authors' layout, for the `cuhk_sysu` builder tests.

`dataset.zip` -> `dataset/Image/SSM/s{n}.jpg` (scene JPEGs) and `dataset/annotation/`
with `Images.mat`, `Person.mat`, `pool.mat` and `test/train_test/{Train,TestG50}.mat`.
The .mat files nest as the real ones do when read by `scipy.io.loadmat` (see the
public loaders ShuangLI59/person_search `lib/datasets/psdb.py`, SeqNet
`datasets/cuhk_sysu.py`): `Train` an N x 1 cell array of 1x1 structs, `TestG50` and `Img`
1 x N struct arrays, `Gallery`/`scene`/`box` 1 x K struct arrays, `pool` an N x 1 cell
array of strings, strings as char arrays, boxes as 1x4 doubles and a gallery scene
without the query person as an empty (1x0) `idlocate`.

Each scene has a smooth gradient background and every annotated person is a solid
rectangle of its own colour, so crops can be checked by colour and by exact pixels.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import numpy as np
import scipy.io
from PIL import Image

from tests import fake_archives as fa

HEIGHT, WIDTH = 48, 64  # every fake scene
TRAIN_SCENES = ("s1.jpg", "s2.jpg", "s3.jpg")
TEST_SCENES = ("s4.jpg", "s5.jpg", "s6.jpg", "s7.jpg", "s8.jpg")

# Train.mat: idname -> [(scene, (x, y, w, h))]. p12's s3 box sticks out at the top and
# right: clipped to columns 52..63 and rows 0..25.
TRAIN = {
    "p11": [("s1.jpg", (4, 6, 10, 20)), ("s2.jpg", (30, 10, 12, 24))],
    "p12": [("s2.jpg", (5, 8, 10, 22)), ("s3.jpg", (52, -4, 20, 30))],
    "p13": [("s1.jpg", (40, 20, 8, 16)), ("s3.jpg", (10, 10, 9, 18))],
}
# TestG50.mat: idname -> (query (scene, box), gallery [(scene, box or None)]); scenes
# holding the person first, as in the release. p23's s8 box runs off the bottom:
# clipped to rows 30..47.
TEST = {
    "p21": (("s4.jpg", (5, 5, 10, 20)),
            [("s5.jpg", (8, 10, 10, 22)), ("s6.jpg", (45, 18, 10, 20)), ("s7.jpg", None),
             ("s8.jpg", None)]),
    "p22": (("s5.jpg", (40, 8, 12, 24)),
            [("s4.jpg", (30, 6, 12, 24)), ("s7.jpg", (20, 10, 12, 26)), ("s6.jpg", None),
             ("s8.jpg", None)]),
    "p23": (("s6.jpg", (20, 4, 10, 20)),
            [("s8.jpg", (3, 30, 10, 30)), ("s4.jpg", None), ("s5.jpg", None)]),
}
# Images.mat boxes of nobody in Train/TestG50 (unlabelled people), and boxes of zero
# width or height, which the public loaders drop.
UNLABELLED = {"s1.jpg": [(20, 30, 8, 12)], "s4.jpg": [(50, 25, 8, 16)],
              "s5.jpg": [(25, 30, 8, 14)], "s7.jpg": [(45, 5, 10, 20)]}
ZERO_SIZE = {"s4.jpg": [(12, 40, 0, 5)]}


@dataclasses.dataclass
class Fake:
  """What the builder should produce from the fake release."""

  splits: dict[str, dict[str, dict[str, fa.Expected]]]  # config -> split -> file_name
  colours: dict[str, tuple[int, int, int]]  # file_name -> colour of the drawn person
  scenes: dict[str, np.ndarray]  # scene name -> decoded pixels


def file_name(scene: str, box: tuple[int, int, int, int]) -> str:
  return f"{scene[:-4]}_{box[0]}_{box[1]}_{box[2]}_{box[3]}.png"


def all_boxes() -> dict[str, list[tuple[int, int, int, int]]]:
  """Scene -> every box drawn in it (labelled or not), in a fixed order."""
  out: dict[str, list] = {s: [] for s in TRAIN_SCENES + TEST_SCENES}
  for scenes in TRAIN.values():
    for scene, b in scenes:
      out[scene].append(b)
  for (q_scene, q_box), gallery in TEST.values():
    out[q_scene].append(q_box)
    for scene, b in gallery:
      if b is not None:
        out[scene].append(b)
  for scene, boxes in UNLABELLED.items():
    out[scene].extend(boxes)
  return out


def scene_pixels(scene: str) -> np.ndarray:
  """The scene before JPEG: gradient background, one solid rectangle per box."""
  ys, xs = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
  n = int(scene[1:-4])
  img = np.stack([60 + ys * 2, 90 + xs, 120 + (ys + xs + 10 * n) % 40], -1).astype(np.uint8)
  for b in all_boxes()[scene]:
    x, y, w, h = b
    img[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = box_colour(scene, b)
  return img


def box_colour(scene: str, b: tuple[int, int, int, int]) -> tuple[int, int, int]:
  return fa.colour(int(scene[1:-4]) * 7 + all_boxes()[scene].index(b))


# ------------------------------------------------------------------- .mat writing


def struct(rows: list[dict]) -> np.ndarray:
  """A 1 x len(rows) MATLAB struct array (fields in the order of the first row)."""
  names = list(rows[0])
  arr = np.zeros((1, len(rows)), dtype=[(n, object) for n in names])
  for i, row in enumerate(rows):
    arr[0, i] = tuple(row[n] for n in names)
  return arr


def cell(values: list) -> np.ndarray:
  """An N x 1 MATLAB cell array."""
  arr = np.empty((len(values), 1), dtype=object)
  for i, v in enumerate(values):
    arr[i, 0] = v
  return arr


def idlocate(b) -> np.ndarray:
  return np.zeros((1, 0)) if b is None else np.array([b], np.float64)


def scalar(v) -> np.ndarray:
  return np.array([[v]], np.float64)


def mat_bytes(variables: dict) -> bytes:
  buf = io.BytesIO()
  scipy.io.savemat(buf, variables)
  return buf.getvalue()


def scene_struct(scene, b) -> dict:
  return {"imname": scene, "idlocate": idlocate(b), "ishard": scalar(0)}


def train_mat(train: dict) -> bytes:
  persons = [struct([{"idname": pid, "nAppear": scalar(len(scenes)),
                      "scene": struct([scene_struct(s, b) for s, b in scenes])}])
             for pid, scenes in train.items()]
  return mat_bytes({"Train": cell(persons)})


def testg_mat(test: dict, key: str = "TestG50") -> bytes:
  rows = []
  for pid, ((q_scene, q_box), gallery) in test.items():
    query = struct([{**scene_struct(q_scene, q_box), "idname": pid}])
    entries = [{"imname": s, "idlocate": idlocate(b),
                "ishard": scalar(0) if b is not None else np.zeros((1, 0))}
               for s, b in gallery]
    rows.append({"Query": query, "Gallery": struct(entries)})
  return mat_bytes({key: struct(rows)})


def images_mat() -> bytes:
  rows = []
  for scene, boxes in all_boxes().items():
    boxes = boxes + ZERO_SIZE.get(scene, [])
    rows.append({"imname": scene, "nAppear": scalar(len(boxes)),
                 "box": struct([{"idlocate": idlocate(b), "ishard": scalar(0)} for b in boxes])})
  return mat_bytes({"Img": struct(rows)})


def person_mat() -> bytes:
  persons = {pid: scenes for pid, scenes in TRAIN.items()}
  for pid, (query, gallery) in TEST.items():
    persons[pid] = [query] + [(s, b) for s, b in gallery if b is not None]
  return mat_bytes({"Person": struct([
      {"idname": pid, "nAppear": scalar(len(scenes)),
       "scene": struct([scene_struct(s, b) for s, b in scenes])}
      for pid, scenes in persons.items()])})


# ------------------------------------------------------------------- expectations


def _crop(pixels: np.ndarray, b) -> np.ndarray:
  x, y, w, h = b
  return pixels[max(y, 0):min(y + h, HEIGHT), max(x, 0):min(x + w, WIDTH)]


def _expected(scenes, crops) -> dict[str, fa.Expected]:
  """file_name -> Expected for (scene, box, person_id) triples."""
  out = {}
  for scene, b, pid in crops:
    out[file_name(scene, b)] = fa.Expected(pid, int(scene[1:-4]) - 1, _crop(scenes[scene], b))
  return out


def expected_splits(scenes: dict[str, np.ndarray]) -> dict:
  """config -> split -> file_name -> Expected, written out from the tables above."""
  train = [(s, b, int(pid[1:])) for pid, sc in TRAIN.items() for s, b in sc]
  query = [(q[0], q[1], int(pid[1:])) for pid, (q, _) in TEST.items()]
  gallery = [(s, b, int(pid[1:])) for pid, (_, g) in TEST.items() for s, b in g if b is not None]
  # Distractors: every other box of the gallery scenes s4..s8; the query boxes there
  # keep their person's id, unlabelled people get 0, zero-size boxes are dropped.
  extra = [("s4.jpg", (5, 5, 10, 20), 21), ("s4.jpg", (50, 25, 8, 16), 0),
           ("s5.jpg", (40, 8, 12, 24), 22), ("s5.jpg", (25, 30, 8, 14), 0),
           ("s6.jpg", (20, 4, 10, 20), 23), ("s7.jpg", (45, 5, 10, 20), 0)]
  base = {"train": _expected(scenes, train), "query": _expected(scenes, query),
          "gallery": _expected(scenes, gallery)}
  return {"default": base,
          "distractors": {**base, "gallery": _expected(scenes, gallery + extra)}}


def make_cuhk_sysu(manual_dir: pathlib.Path, form: str = "zip", top: str = "dataset",
                   zip_name: str | None = None, train: dict | None = None,
                   skip: tuple[str, ...] = ()) -> Fake:
  """Writes the fake release into `manual_dir` and returns what the builder should give.

  Args:
    manual_dir: folder to write into.
    form: "zip" (`{top}.zip`, or `zip_name`) or "folder" (extracted; `top=""` puts
      `Image/` and `annotation/` straight into `manual_dir`).
    top: the release's top folder.
    train: replaces the `TRAIN` table in `Train.mat` (for bad-input tests).
    skip: archive paths below `top` not to write (for missing-file tests).
  """
  prefix = f"{top}/" if top else ""
  tree, scenes = {}, {}
  for scene in TRAIN_SCENES + TEST_SCENES:
    data = fa.jpeg_bytes(scene_pixels(scene))
    tree[f"Image/SSM/{scene}"] = data
    scenes[scene] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  tree["annotation/Images.mat"] = images_mat()
  tree["annotation/Person.mat"] = person_mat()
  tree["annotation/pool.mat"] = mat_bytes({"pool": cell(list(TEST_SCENES))})
  tree["annotation/test/train_test/Train.mat"] = train_mat(train or TRAIN)
  tree["annotation/test/train_test/TestG50.mat"] = testg_mat(TEST)
  files = {f"{prefix}{rel}": data for rel, data in tree.items() if rel not in skip}
  if form == "zip":
    files["__MACOSX/._dataset"] = b"\x00\x05\x16\x07 resource fork"  # as Mac zips hold
  fa.write_tree(manual_dir, files, form, zip_name or f"{top or 'dataset'}.zip")
  colours = {file_name(s, b): box_colour(s, b) for s, boxes in all_boxes().items() for b in boxes}
  return Fake(expected_splits(scenes), colours, scenes)
