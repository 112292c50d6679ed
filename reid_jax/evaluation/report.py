"""One self-contained HTML page of an evaluation: `python -m reid_jax.evaluate --report`.

`build_html` turns the results dict (as `reid_jax.core.evaluators.evaluate_embeddings`
returns it), the embeddings it was computed from and per-index image loaders into one
HTML string with every picture inlined as a base64 PNG (no CSS, JS or network outside
the file):
  * the metrics table, one row per exit (rank-1/5/10, mAP, mINP, queries);
  * the CMC curve of every exit (`visualize.plot_cmc`);
  * the anytime / budgeted-stream plots named in results["budget"][mode]["plot"];
  * for one exit (DaRe "fused", otherwise the first), the ranked lists
    (`visualize.ranked_list`: green correct, red wrong, grey junk) of the queries with
    the lowest and the highest AP.
The CMC curves and per-query APs are recomputed with the evaluator's own distance and
`evaluate_rank` (one exit's [Q, G] matrix at a time, as the evaluator holds), and must
reproduce the results' numbers exactly: a mismatch (embeddings that are not the ones
evaluated) is an error, not a silently different page. `write_report` writes the page
atomically; `write_for_config` reads the images from the config's tfds splits.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from reid_jax import evaluation
from reid_jax.evaluation import protocols, visualize

REPORT_NAME = "report.html"
METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
IMAGE_PROTOCOLS = ("market", "cuhk_single_shot")
ImageLoader = Callable[[int], Any]  # record index -> image (HxWx3 uint8, path or PIL)
NameLoader = Callable[[int], str]  # record index -> file name


def default_exit(exits: Sequence[str]) -> str:
  """The exit a method calls its main one: DaRe's "fused", otherwise the first."""
  exits = list(exits)
  if not exits:
    raise ValueError("the results hold no exit to report")
  return "fused" if "fused" in exits else exits[0]


def check_exit(exit_name: str | None, exits: Sequence[str]) -> str:
  """`--report_exit` (None / '' -> the default) checked against the method's exits."""
  if not exit_name:
    return default_exit(exits)
  if exit_name not in exits:
    raise ValueError(f"--report_exit={exit_name}: this method's exits are "
                     f"{', '.join(exits)}; pick one of them")
  return exit_name


def check_image_protocol(protocol: str, q_labels: Mapping[str, Any]) -> None:
  """Ranked lists show records: tracklet (video) rankings have no single image."""
  if protocol not in IMAGE_PROTOCOLS or "tracklet_id" in q_labels:
    raise ValueError(f"--report shows ranked lists of images; config.eval.protocol="
                     f"{protocol} ranks video tracklets: evaluate without --report")


def select_queries(ap: np.ndarray, num: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """(worst, best): query indices with the lowest and the highest AP, disjoint.

  Queries with AP NaN (skipped by the protocol) are never chosen. Worst is in
  ascending AP, best in descending AP, ties by lower query index. With fewer than
  2 * num scored queries, the best get half of them (rounded down), the worst the rest.
  """
  ap = np.asarray(ap, np.float64)
  scored = np.flatnonzero(~np.isnan(ap))
  k_best = min(num, len(scored) // 2)
  k_worst = min(num, len(scored) - k_best)
  worst = scored[np.argsort(ap[scored], kind="stable")][:k_worst]
  desc = scored[np.argsort(-ap[scored], kind="stable")]
  best = desc[~np.isin(desc, worst)][:k_best]
  return worst, best


def rank_distances(dist: np.ndarray, q_labels: Mapping[str, Any],
                   g_labels: Mapping[str, Any], *, protocol: str, max_rank: int
                   ) -> dict[str, Any]:
  """The protocol's evaluation of a distance matrix, with per-query numbers.

  Holds "cmc" (the protocol's curve), "mAP", "mINP" and the per-query "AP" and
  "first_hit" (0-based, junk not counted) of `evaluate_rank`, whose mean is the
  protocol's mAP (CUHK single-shot too: its mAP is over the whole gallery).
  """
  ids = (q_labels["person_id"], g_labels["person_id"], q_labels["camera_id"],
         g_labels["camera_id"])
  res = evaluation.evaluate_rank(dist, *ids, max_rank=max_rank, per_query=True)
  if protocol == "cuhk_single_shot":  # its CMC draws one gallery image per identity
    res["cmc"] = evaluation.evaluate_cuhk03(dist, *ids, max_rank=max_rank)["cmc"]
  return res


def rank_exit(q_embs: np.ndarray, q_labels: Mapping[str, Any], g_embs: np.ndarray,
              g_labels: Mapping[str, Any], *, protocol: str, rerank: bool,
              max_rank: int) -> tuple[np.ndarray, dict[str, Any]]:
  """(distance matrix, `rank_distances`) of one exit, the distance the protocol's own."""
  dist = protocols.distance_matrix(q_embs, g_embs, rerank)
  return dist, rank_distances(dist, q_labels, g_labels, protocol=protocol,
                              max_rank=max_rank)


def check_matches(name: str, res: Mapping[str, Any], expected: Mapping[str, float]) -> None:
  """The recomputed numbers of an exit must be the results' own."""
  got = protocols.summary(res)
  bad = [k for k in METRICS if k in expected and not math.isclose(
      got[k], expected[k], rel_tol=1e-9, abs_tol=1e-12)]
  if bad:
    raise ValueError(f"report: exit {name} recomputed {', '.join(f'{k}={got[k]:.6f}' for k in bad)}"
                     f" but the results say {', '.join(f'{k}={expected[k]:.6f}' for k in bad)};"
                     " pass the embeddings the results were computed from")


def _png_data_uri(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _read_png(path: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f"report: {what} {path} cannot be read ({e.strerror}); "
                            "re-run the evaluation that writes it") from None
  if not data.startswith(b"\x89PNG"):
    raise ValueError(f"report: {what} {path} is not a PNG; re-run the evaluation that "
                     "writes it")
  return data


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def metrics_table(results: Mapping[str, Any]) -> str:
  """The per-exit table; each row also carries the exact values as data- attributes."""
  scored, total = results.get("num_valid_queries"), results.get("num_queries")
  queries = f"{scored} of {total}" if scored is not None else str(total)
  head = "".join(f"<th>{h}</th>" for h in ("exit", "rank-1", "rank-5", "rank-10", "mAP",
                                           "mINP", "queries scored"))
  rows = []
  for name, m in results["exits"].items():
    attrs = " ".join(f'data-{k.lower()}="{float(m[k])!r}"' for k in METRICS)
    cells = "".join(f"<td>{_pct(m[k])}</td>" for k in METRICS)
    rows.append(f'<tr data-exit="{html.escape(name)}" {attrs} data-num-queries="{total}" '
                f'data-num-valid-queries="{scored}"><td>{html.escape(name)}</td>{cells}'
                f"<td>{queries}</td></tr>")
  return (f'<table id="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
          "</tbody></table>")


def _row_picture(png: bytes, tile_height: int) -> bytes:
  """A `ranked_list` picture without its text strip (illegible at thumbnail width: the
  page labels the row instead), as JPEG (a PNG of photos is ~3x larger), 4:4:4 so the
  2-pixel frames keep their colour."""
  img = Image.open(io.BytesIO(png)).convert("RGB")
  img = img.crop((0, 0, img.width, min(tile_height, img.height)))
  out = io.BytesIO()
  img.save(out, "JPEG", quality=85, subsampling=0)
  return out.getvalue()


def ranked_rows(dist: np.ndarray, q_labels: Mapping[str, Any], g_labels: Mapping[str, Any],
                indices: Sequence[int], ap: np.ndarray, first_hit: np.ndarray,
                q_images: ImageLoader, g_images: ImageLoader, q_names: NameLoader,
                kind: str, topk: int = 10, thumb_hw: tuple[int, int] = (64, 32)) -> str:
  """HTML rows: each query's `visualize.ranked_list` picture with its name, AP, rank."""
  if not len(indices):
    return ""
  border = 2
  with tempfile.TemporaryDirectory() as tmp:
    paths = visualize.ranked_list(dist, q_labels["person_id"], g_labels["person_id"],
                                  q_labels["camera_id"], g_labels["camera_id"], q_images,
                                  g_images, tmp, topk=topk, query_indices=indices,
                                  image_size=thumb_hw, border=border)
    pictures = [_row_picture(_read_png(p, "ranked list"), thumb_hw[0] + 2 * border)
                for p in paths]
  out = []
  for qi, jpeg in zip(indices, pictures):
    qi = int(qi)
    name = html.escape(q_names(qi))
    src = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    out.append(
        f'<div class="ranked {kind}" data-query="{qi}" data-ap="{float(ap[qi])!r}" '
        f'data-first-rank="{int(first_hit[qi]) + 1}"><p>{name} (query {qi}, id '
        f'{int(q_labels["person_id"][qi])}, camera {int(q_labels["camera_id"][qi])}): AP '
        f"{_pct(ap[qi])}%, first correct match at rank {int(first_hit[qi]) + 1}</p>"
        f'<img alt="ranked list of {name}" src="{src}"></div>')
  return "\n".join(out)


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.ranked p{margin:.6em 0 .1em;font-size:90%}
.plots{display:flex;flex-wrap:wrap;align-items:flex-start}
figure{margin:0 1.5em 1em 0}figcaption{font-size:90%;text-align:center}"""

# Sets, once everything has loaded, what a headless browser test reads from the DOM.
_SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var b = document.body.dataset;
  b.images = imgs.length;
  b.brokenImages = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  b.tableRows = document.querySelectorAll("#metrics tbody tr").length;
  b.rankedRows = document.querySelectorAll(".ranked").length;
  b.loaded = "1";
});"""


def build_html(results: Mapping[str, Any], embedded: tuple, q_images: ImageLoader,
               g_images: ImageLoader, q_names: NameLoader, *, exit_name: str | None = None,
               max_rank: int = 50, num_rows: int = 20, topk: int = 10,
               thumb_hw: tuple[int, int] = (64, 32)) -> str:
  """The report page (see the module docstring) as one HTML string.

  Args:
    results: the evaluation results (exits, protocol, rerank, num_queries, ...; the
      "budget" plots, when present, are read from their paths).
    embedded: (q_embs, q_labels, g_embs, g_labels) the results were computed from.
    q_images, g_images: record index -> image of the query / gallery split.
    q_names: query record index -> its file name.
    exit_name: the exit whose ranked lists are shown (default `default_exit`).
    max_rank: length of the CMC curves (config.eval.max_rank).
    num_rows: worst and best queries shown (each).
    topk, thumb_hw: gallery images per row, (height, width) of each thumbnail.
  """
  q_embs, q_labels, g_embs, g_labels = embedded
  exits = list(results["exits"])
  exit_name = check_exit(exit_name, exits)
  protocol = results.get("protocol", "market")
  check_image_protocol(protocol, q_labels)
  rerank = bool(results.get("rerank", False))
  missing = [n for n in exits if n not in q_embs or n not in g_embs]
  if missing:
    raise ValueError(f"report: the embeddings lack exit(s) {missing} of the results")
  cmcs, chosen = {}, None
  for name in exits:  # one [Q, G] matrix at a time, plus the chosen exit's
    dist, res = rank_exit(q_embs[name], q_labels, g_embs[name], g_labels, protocol=protocol,
                          rerank=rerank, max_rank=max_rank)
    check_matches(name, res, results["exits"][name])
    cmcs[name] = res["cmc"]
    if name == exit_name:
      chosen = (dist, res)
    del dist
  dist, res = chosen
  with tempfile.TemporaryDirectory() as tmp:
    cmc_png = _read_png(visualize.plot_cmc(cmcs, os.path.join(tmp, "cmc.png"),
                                           title=f"CMC ({results.get('dataset', '')})"),
                        "CMC plot")
  plots = [("CMC, every exit", cmc_png)]
  for mode, entry in (results.get("budget") or {}).items():
    if isinstance(entry, Mapping) and entry.get("plot"):
      plots.append((f"{mode} (budget)", _read_png(entry["plot"], f"the {mode} plot")))
  worst, best = select_queries(res["AP"], num_rows)
  rows = {kind: ranked_rows(dist, q_labels, g_labels, idx, res["AP"], res["first_hit"],
                            q_images, g_images, q_names, kind, topk, thumb_hw)
          for kind, idx in (("worst", worst), ("best", best))}
  nq, scored = len(res["AP"]), int(np.count_nonzero(~np.isnan(res["AP"])))
  title = (f"{results.get('dataset', '')} step {results.get('step', '')}: "
           f"{protocol} protocol{', re-ranked' if rerank else ''}, tta "
           f"{results.get('tta', 'none')}")
  shown = len(worst) + len(best)
  few = ("" if shown == 2 * num_rows else
         f" Only {scored} queries were scored, so {len(worst)} worst and {len(best)} best "
         "are shown (each query once).")
  figures = "".join(f'<figure><img alt="{html.escape(c)}" src="{_png_data_uri(p)}">'
                    f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, p in plots)
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Metrics in percent; queries without a cross-camera gallery match are skipped by the
protocol ({nq - scored} of {nq} for exit {html.escape(exit_name)}).</p>
{metrics_table(results)}
<div class="plots">{figures}</div>
<h2>Ranked lists of exit {html.escape(exit_name)}</h2>
<p>The query (black frame), then its top-{topk} gallery images, nearest first: green
a correct match (same id, other camera), red a wrong one, grey junk (same id and camera,
or id -1), which the protocol removes: ranks count no junk.{few}</p>
<h3>{len(worst)} worst queries by AP</h3>
{rows["worst"]}
<h3>{len(best)} best queries by AP</h3>
{rows["best"]}
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(page: str, path: str) -> str:
  """Writes the page atomically (a temporary file renamed over the old one)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(tmp, path)
  return path


def _decode(name: Any) -> str:
  return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def write_for_config(config, results: Mapping[str, Any], embedded: tuple, path: str,
                     exit_name: str | None = None) -> str:
  """The report of a config's query/gallery splits (records read by index) at `path`.

  `embedded` is in record order (`reid_jax.core.embedding.embed_split`), so record i of
  the split is row i of the embeddings.
  """
  from reid_jax.data import sources  # pylint: disable=import-outside-toplevel
  q_src = sources.open_split(config.dataset, config.dataset.query_split)
  g_src = sources.open_split(config.dataset, config.dataset.gallery_split)
  for src, labels, split in ((q_src, embedded[1], config.dataset.query_split),
                             (g_src, embedded[3], config.dataset.gallery_split)):
    if len(src) != len(labels["person_id"]):
      raise ValueError(f"report: split {split} holds {len(src)} records but "
                       f"{len(labels['person_id'])} were embedded")
  page = build_html(results, embedded, lambda i: q_src[i]["image"],
                    lambda i: g_src[i]["image"], lambda i: _decode(q_src[i]["file_name"]),
                    exit_name=exit_name, max_rank=config.eval.max_rank)
  return write_report(page, path)
