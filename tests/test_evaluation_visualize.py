"""Ranked-list PNGs (frame colours) and the CMC plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reid_jax import evaluation as ev
from reid_jax.evaluation import visualize as vis


def _images(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 255, (32, 16, 3), dtype=np.uint8) for _ in range(n)]


def test_ranked_list_frames(tmp_path):
  # Query id 1, cam 0. Gallery by distance: 0 (junk: same cam), 1 (correct),
  # 2 (wrong id), 3 (junk: id -1), 4 (correct).
  g_pids = [1, 1, 2, -1, 1]
  g_cams = [0, 1, 1, 1, 2]
  d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
  paths = vis.ranked_list(d, [1], g_pids, [0], g_cams, _images(1, 0), _images(5, 1),
                          str(tmp_path), topk=5, image_size=(32, 16), border=3)
  assert len(paths) == 1
  img = np.asarray(Image.open(paths[0]).convert("RGB"))
  cell_w, gap = 16 + 6, 12
  corner = lambda r: tuple(img[1, cell_w * (r + 1) + gap + 1])
  assert tuple(img[1, 1]) == vis.BLACK  # query
  assert [corner(r) for r in range(5)] == [vis.GREY, vis.GREEN, vis.RED, vis.GREY, vis.GREEN]
  # Without junk: correct, wrong, correct.
  paths = vis.ranked_list(d, [1], g_pids, [0], g_cams, _images(1, 0), _images(5, 1),
                          str(tmp_path / "nojunk"), topk=5, image_size=(32, 16), border=3,
                          show_junk=False)
  img = np.asarray(Image.open(paths[0]).convert("RGB"))
  assert img.shape[1] == cell_w * 4 + gap
  assert [corner(r) for r in range(3)] == [vis.GREEN, vis.RED, vis.GREEN]


def test_ranked_list_accepts_paths_and_callables(tmp_path):
  files = []
  for i, im in enumerate(_images(3, 2)):
    files.append(str(tmp_path / f"g{i}.png"))
    Image.fromarray(im).save(files[-1])
  d = np.array([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
  paths = vis.ranked_list(d, [5, 6], [5, 6, 7], [0, 0], [1, 1, 1],
                          lambda i: np.full((20, 10), 0.5), files, str(tmp_path / "out"),
                          topk=2, query_indices=[1])
  assert [p.endswith("query_00001.png") for p in paths] == [True]
  with pytest.raises(ev.EvaluationError, match="out of range"):
    vis.ranked_list(d, [5, 6], [5, 6, 7], [0, 0], [1, 1, 1], files, files, str(tmp_path),
                    query_indices=[4])


def test_plot_cmc(tmp_path):
  path = vis.plot_cmc({"baseline": np.linspace(0.5, 1, 20), "re-ranked": np.linspace(0.6, 1, 20)},
                      str(tmp_path / "plots" / "cmc.png"))
  img = Image.open(path)
  assert img.size == (500, 400)
  assert np.asarray(img).std() > 0
  with pytest.raises(ev.EvaluationError, match="NaN"):
    vis.plot_cmc(np.array([0.1, np.nan]), str(tmp_path / "bad.png"))
