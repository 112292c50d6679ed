"""`evaluate --report`: worst/best selection against brute force, and the page itself
loaded in a real headless Chromium (skipped with the reason when none can run)."""

from __future__ import annotations

import base64
import functools
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reid_jax.evaluation import report, visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny DaRe on synthetic_reid/tiny (16 queries, 49 gallery images), as tests/test_train.py.
OVERRIDES = {"dataset.builder_config": "tiny", "input.height": 32, "input.width": 16,
             "input.P": 4, "input.K": 2, "input.worker_count": 0, "input.eval_batch_size": 32,
             "eval.tta": "", "model.width": 8, "model.hidden_dim": 16, "model.embed_dim": 8,
             "train.steps": 2, "optimizer.decay_start": 1, "train.checkpoint_every": 2,
             "train.eval_every": 0, "train.log_every": 1}


# ----------------------------------------------------------------------------- references

def brute_force_ap(dist, q_pids, g_pids, q_cams, g_cams):
  """Per-query AP (NaN: no positive) and 1-based rank of the first positive, by loops:
  sort the gallery (ties by index), drop junk, average precision at each hit."""
  aps, firsts = [], []
  for i in range(len(q_pids)):
    order = sorted(range(len(g_pids)), key=lambda j: (dist[i][j], j))
    kept = [j for j in order if g_pids[j] != -1
            and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
    hits = [r for r, j in enumerate(kept, 1) if g_pids[j] == q_pids[i]]
    aps.append(sum(k / r for k, r in enumerate(hits, 1)) / len(hits) if hits else np.nan)
    firsts.append(hits[0] if hits else 0)
  return np.array(aps), np.array(firsts)


def brute_force_select(aps, num):
  """Worst (ascending AP) and best (descending), ties by index, disjoint, halves when few."""
  scored = [i for i, a in enumerate(aps) if not np.isnan(a)]
  k_best = min(num, len(scored) // 2)
  k_worst = min(num, len(scored) - k_best)
  worst = sorted(scored, key=lambda i: (aps[i], i))[:k_worst]
  best = [i for i in sorted(scored, key=lambda i: (-aps[i], i)) if i not in worst][:k_best]
  return worst, best


def _labels(pids, cams):
  return {"person_id": np.asarray(pids), "camera_id": np.asarray(cams)}


# ----------------------------------------------------------------------------- unit tests

def test_per_query_ap_and_selection_match_brute_force():
  """A hand-made 6 x 7 distance matrix with junk (same camera, id -1), ties and a query
  without a positive: per-query AP, first ranks and the worst/best picks."""
  g_pids = [1, 1, 2, 2, 3, -1, 4]
  g_cams = [0, 1, 0, 1, 1, 0, 0]
  q_pids = [1, 2, 3, 1, 2, 5]  # query 5 has no positive: skipped
  q_cams = [0, 1, 0, 1, 0, 1]
  dist = np.array([[.2, .5, .1, .9, .3, .0, .4],
                   [.3, .3, .3, .1, .2, .6, .7],
                   [.9, .8, .7, .6, .1, .5, .2],
                   [.1, .1, .5, .4, .2, .3, .6],
                   [.5, .4, .6, .2, .1, .3, .0],
                   [.1, .2, .3, .4, .5, .6, .7]], np.float32)
  res = report.rank_distances(dist, _labels(q_pids, q_cams), _labels(g_pids, g_cams),
                              protocol="market", max_rank=5)
  ref_ap, ref_first = brute_force_ap(dist.tolist(), q_pids, g_pids, q_cams, g_cams)
  np.testing.assert_allclose(res["AP"], ref_ap, rtol=1e-12)
  valid = ~np.isnan(ref_ap)
  np.testing.assert_array_equal(res["first_hit"][valid] + 1, ref_first[valid])
  # Hand-computed: query 0 (id 1, cam 0): junk g0 (same cam) and g5 (id -1); order
  # g2 .1, g4 .3, g6 .4, g1 .5 -> one hit at rank 4: AP 1/4.
  assert res["AP"][0] == pytest.approx(0.25)
  for num in (1, 2, 3, 20):
    worst, best = report.select_queries(res["AP"], num)
    ref_worst, ref_best = brute_force_select(list(ref_ap), num)
    assert list(worst) == ref_worst and list(best) == ref_best, num
  worst, best = report.select_queries(res["AP"], 20)  # 5 scored: 3 worst, 2 best
  assert len(worst) == 3 and len(best) == 2 and 5 not in set(worst) | set(best)


def test_selection_of_many_queries_with_ties():
  rng = np.random.default_rng(0)
  ap = rng.integers(0, 6, 70) / 5.0  # many ties
  ap[[3, 17, 40]] = np.nan
  worst, best = report.select_queries(ap, 20)
  ref_worst, ref_best = brute_force_select(list(ap), 20)
  assert list(worst) == ref_worst and list(best) == ref_best
  assert len(worst) == len(best) == 20


def _synthetic(nq=60, ng=90, dim=6, seed=0):
  """Random embeddings with ids such that every query has a cross-camera match."""
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(1, 15, nq)
  g_pids = np.concatenate([np.arange(1, 15), np.arange(1, 15), rng.integers(-1, 15, ng - 28)])
  q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
  g_cams[:14], g_cams[14:28] = 0, 1
  q_embs = {"stage1": rng.normal(size=(nq, dim)).astype(np.float32),
            "fused": rng.normal(size=(nq, dim)).astype(np.float32)}
  g_embs = {k: rng.normal(size=(ng, dim)).astype(np.float32) for k in q_embs}
  return q_embs, _labels(q_pids, q_cams), g_embs, _labels(g_pids, g_cams)


def _results(embedded, protocol="market", max_rank=50):
  from reid_jax.evaluation import protocols
  exits, scored, nq = getattr(protocols, protocol)(*embedded, max_rank=max_rank)
  return {"step": 3, "dataset": "made_up", "protocol": protocol, "rerank": False,
          "tta": "none", "num_queries": nq, "num_valid_queries": scored, "exits": exits}


def _image(i):
  return np.full((16, 8, 3), (i * 37) % 256, np.uint8)


class _Page(html.parser.HTMLParser):
  """Body attributes, metrics-table rows and ranked-list rows of a page."""

  def __init__(self):
    super().__init__()
    self.body, self.rows, self.ranked, self.imgs = {}, [], [], []
    self._in_metrics = False

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "body":
      self.body = a
    elif tag == "table" and a.get("id") == "metrics":
      self._in_metrics = True
    elif tag == "tr" and self._in_metrics and "data-exit" in a:
      self.rows.append(a)
    elif tag == "div" and "ranked" in a.get("class", "").split():
      self.ranked.append(a)
    elif tag == "img":
      self.imgs.append(a["src"])

  def handle_endtag(self, tag):
    if tag == "table":
      self._in_metrics = False


def _parse(page: str) -> _Page:
  p = _Page()
  p.feed(page)
  return p


def test_build_html_shows_40_rows_and_refuses_other_embeddings(tmp_path):
  """60 queries: 20 worst + 20 best of the fused exit, their AP the evaluator's; images
  inlined as PNG data URIs; embeddings that are not the results' are an error."""
  embedded = _synthetic()
  results = _results(embedded)
  page = report.build_html(results, embedded, _image, _image, lambda i: f"q{i:03d}.jpg",
                           topk=10, thumb_hw=(16, 8))
  p = _parse(page)
  assert [r["data-exit"] for r in p.rows] == ["stage1", "fused"]
  for r in p.rows:
    for k in report.METRICS:
      assert float(r[f"data-{k.lower()}"]) == results["exits"][r["data-exit"]][k]
  assert len(p.ranked) == 40
  assert [r["class"] for r in p.ranked] == ["ranked worst"] * 20 + ["ranked best"] * 20
  # The rows' APs: brute force on the fused distances, the worst ascending first.
  q, ql, g, gl = embedded
  d = ((q["fused"][:, None] - g["fused"][None]) ** 2).sum(-1) ** 0.5
  ref_ap, ref_first = brute_force_ap(d.tolist(), ql["person_id"], gl["person_id"],
                                     ql["camera_id"], gl["camera_id"])
  ref_worst, ref_best = brute_force_select(list(ref_ap), 20)
  assert [int(r["data-query"]) for r in p.ranked] == ref_worst + ref_best
  for r in p.ranked:
    qi = int(r["data-query"])
    assert float(r["data-ap"]) == pytest.approx(ref_ap[qi], rel=1e-6)
    assert int(r["data-first-rank"]) == ref_first[qi]
  assert np.nanmean(ref_ap) == pytest.approx(results["exits"]["fused"]["mAP"], rel=1e-6)
  for qi in ref_worst + ref_best:
    assert f"<p>q{qi:03d}.jpg (query {qi}, id {ql['person_id'][qi]}, camera " in page
  # A CMC plot (PNG) + 40 ranked lists (JPEG: tiles 16x8 + 2-px frames, 10 gallery
  # images, the query and a 12-px gap), every one decodable; nothing external.
  assert len(p.imgs) == 41 and p.imgs[0].startswith("data:image/png;base64,")
  for src in p.imgs[1:]:
    assert src.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert img.size == (11 * 12 + 12, 20)
  # The frames: ranked_list's colours (green correct, red wrong, grey junk).
  row = np.asarray(Image.open(io.BytesIO(base64.b64decode(p.imgs[-1].split(",", 1)[1]))))
  q0 = int(p.ranked[-1]["data-query"])
  order = np.argsort(d[q0], kind="stable")[:10]
  for r, gi in enumerate(order):
    same = gl["person_id"][gi] == ql["person_id"][q0]
    junk = gl["person_id"][gi] == -1 or (same and gl["camera_id"][gi] == ql["camera_id"][q0])
    want = visualize.GREY if junk else visualize.GREEN if same else visualize.RED
    np.testing.assert_allclose(row[0, 12 * (r + 1) + 12 + 6], want, atol=40)
  assert "http://" not in page and "https://" not in page and "<link" not in page
  # --report_exit picks another exit; an unknown one is a one-line error.
  other = _parse(report.build_html(results, embedded, _image, _image, str,
                                   exit_name="stage1", thumb_hw=(16, 8)))
  assert [r["data-query"] for r in other.ranked] != [r["data-query"] for r in p.ranked]
  with pytest.raises(ValueError, match=r"--report_exit=stage9: .* stage1, fused"):
    report.build_html(results, embedded, _image, _image, str, exit_name="stage9")
  shuffled = (q, ql, {k: v[::-1].copy() for k, v in g.items()}, gl)
  with pytest.raises(ValueError, match="report: exit stage1 recomputed"):
    report.build_html(results, shuffled, _image, _image, str)
  path = report.write_report(page, str(tmp_path / "report.html"))
  assert open(path, encoding="utf-8").read() == page and os.listdir(tmp_path) == ["report.html"]


def test_video_protocols_are_refused():
  with pytest.raises(ValueError, match="protocol=video ranks video tracklets"):
    report.check_image_protocol("video", {})
  with pytest.raises(ValueError, match="protocol=market ranks video tracklets"):
    report.check_image_protocol("market", {"tracklet_id": np.zeros(2)})


# ----------------------------------------------------------------------------- browser

@functools.lru_cache(maxsize=None)
def _find_chromium() -> tuple[str | None, str]:
  """(binary, '') when a headless chromium runs here, else (None, why not); probed once."""
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  if exe is None:
    return None, "chromium is not installed (apt-get install chromium; .ci/run tries it)"
  try:
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        "data:text/html,<p>ok</p>"], capture_output=True, text=True,
                       timeout=60)
  except (OSError, subprocess.TimeoutExpired) as e:
    return None, f"{exe} cannot run headless here: {e}"
  if r.returncode != 0 or "<p>ok</p>" not in r.stdout:
    return None, (f"{exe} cannot run headless here (exit {r.returncode}): "
                  f"{(r.stderr.strip().splitlines() or [''])[-1]}")
  return exe, ""


def _chromium() -> str:
  """The chromium binary; the test is skipped, with the reason, when none runs."""
  exe, why = _find_chromium()
  if exe is None:
    pytest.skip(why)
  return exe


def _browse(exe: str, page: str, tmp_path, size=(1200, 900)) -> tuple[_Page, str]:
  """The DOM after the page's scripts ran (`--dump-dom`), and a screenshot of it."""
  url = "file://" + os.path.abspath(page)
  shot = str(tmp_path / "report.png")
  base = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={size[0]},{size[1]}",
          f"--user-data-dir={tmp_path / 'chromium_profile'}", "--virtual-time-budget=5000"]
  dom = subprocess.run(base + [f"--screenshot={shot}", "--dump-dom", url], capture_output=True,
                       text=True, timeout=120)
  assert dom.returncode == 0, dom.stderr[-2000:]
  if not os.path.exists(shot):  # a chromium that does one of the two per call
    r = subprocess.run(base + [f"--screenshot={shot}", url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and os.path.exists(shot), r.stderr[-2000:]
  return _parse(dom.stdout), shot


def _check_loaded(p: _Page, num_exits: int, num_rows: int) -> None:
  assert p.body.get("data-loaded") == "1", p.body  # the page's script ran
  assert p.body["data-broken-images"] == "0", p.body
  assert int(p.body["data-images"]) == len(p.imgs) > 0
  assert int(p.body["data-table-rows"]) == num_exits
  assert int(p.body["data-ranked-rows"]) == num_rows


def _check_screenshot(shot: str, size=(1200, 900)) -> None:
  img = np.asarray(Image.open(shot).convert("RGB"))
  assert img.shape == (size[1], size[0], 3)
  assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank


def test_synthetic_page_in_chromium(tmp_path):
  """The 60-query page: 40 ranked rows, every image decoded by the browser."""
  exe = _chromium()
  embedded = _synthetic()
  page = report.write_report(
      report.build_html(_results(embedded), embedded, _image, _image, str, thumb_hw=(16, 8)),
      str(tmp_path / "report.html"))
  p, shot = _browse(exe, page, tmp_path)
  _check_loaded(p, num_exits=2, num_rows=40)
  _check_screenshot(shot)


@pytest.fixture(scope="module")
def dare_workdir(tmp_path_factory):
  """(workdir, data_dir): an untrained tiny DaRe checkpointed at step 1 on
  synthetic_reid/tiny, as training would leave it (no train step compiled: seconds)."""
  import jax
  from configs import dare
  from reid_jax.core import checkpoint, experiment, loop
  from reid_jax.data import sources
  from reid_jax.methods.dare import train
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = dare.get_config("synthetic")
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    config[section][field] = value
  config.dataset.data_dir = data_dir
  sources.ensure_prepared(config.dataset)
  workdir = str(tmp_path_factory.mktemp("dare"))
  experiment.save_workdir_config(config, workdir)
  ckpt = checkpoint.Checkpointer(loop.stage_dir(workdir))
  assert ckpt.save(1, jax.device_get(train.create_train_state(jax.random.key(0), config)), None)
  ckpt.close()
  return workdir, data_dir


def test_cli_report_in_chromium(dare_workdir, tmp_path):
  """evaluate --report --budget=anytime on a tiny DaRe checkpoint: the page's table is
  the results file's, the anytime plot is inlined, every image decodes."""
  exe = _chromium()
  workdir, data_dir = dare_workdir
  out = tmp_path / "out"
  out.mkdir()
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                      "--config=configs/dare.py:synthetic", f"--workdir={workdir}",
                      f"--output={out / 'res.json'}", "--report", "--budget=anytime",
                      f"--config.dataset.data_dir={data_dir}"] + flags,
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.load(open(out / "res.json"))
  page = out / "report.html"
  assert f"wrote {page}" in r.stdout
  size_kb = os.path.getsize(page) / 1024
  print(f"report.html: {size_kb:.0f} KiB")
  assert 10 < size_kb < 2000
  p, shot = _browse(exe, str(page), tmp_path)
  # 16 queries in synthetic_reid/tiny, every one with a match: 8 worst + 8 best rows.
  assert results["num_valid_queries"] == 16
  _check_loaded(p, num_exits=5, num_rows=16)
  assert [row["data-exit"] for row in p.rows] == list(results["exits"])
  assert set(results["exits"]) == {"stage1", "stage2", "stage3", "stage4", "fused"}
  for row in p.rows:
    for k in report.METRICS:
      assert float(row[f"data-{k.lower()}"]) == results["exits"][row["data-exit"]][k]
    assert int(row["data-num-queries"]) == results["num_queries"]
  assert len(p.imgs) == 1 + 1 + 16  # CMC, anytime plot, ranked lists
  # The fused exit's rows: the worst first (ascending AP), their mean bounded by mAP.
  aps = [float(row["data-ap"]) for row in p.ranked]
  assert aps[:8] == sorted(aps[:8]) and aps[8:] == sorted(aps[8:], reverse=True)
  assert np.mean(aps) == pytest.approx(results["exits"]["fused"]["mAP"], rel=1e-9)
  _check_screenshot(shot)


def test_without_chromium_the_browser_tests_skip_with_the_reason(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  exe, why = _find_chromium.__wrapped__()
  assert exe is None and "chromium is not installed" in why
