"""The evaluation protocols `reid_jax.core.evaluators` looks up by name.

* `market`: Market-1501/DukeMTMC/CUHK03-new ranking of the whole gallery (CMC, mAP,
  mINP; queries without a cross-camera match are skipped and counted).
* `cuhk_single_shot`: the classic CUHK03/CUHK01 single-shot CMC (one gallery image per
  identity drawn per repeat; `evaluate_cuhk03`).
* `video`: MARS-style: frame embeddings mean-pooled per tracklet, then `market`.
* `video_max`: the same with element-wise max pooling (the official MARS evaluation
  code's default, MARS-evaluation `utils/process_box_feat.m`).
"""

from __future__ import annotations

import sys

import numpy as np

from reid_jax import evaluation
from reid_jax.core.evaluators import register


def summary(res: dict) -> dict[str, float]:
  """rank-1/5/10, mAP and mINP from an evaluate_* dict."""
  cmc = np.asarray(res["cmc"])
  pick = lambda r: float(cmc[min(r, len(cmc)) - 1])
  return {"rank1": pick(1), "rank5": pick(5), "rank10": pick(10),
          "mAP": float(res["mAP"]), "mINP": float(res["mINP"])}


def distance_matrix(qe: np.ndarray, ge: np.ndarray, rerank: bool) -> np.ndarray:
  """The [Q, G] Euclidean distances every protocol ranks (k-reciprocal re-ranked if
  `rerank`); the report recomputes an exit's ranking with it."""
  dist = np.asarray(evaluation.pairwise_distance(qe, ge, metric="euclidean"))
  if rerank:
    dist = evaluation.re_ranking(
        dist, np.asarray(evaluation.pairwise_distance(qe, qe, metric="euclidean")),
        np.asarray(evaluation.pairwise_distance(ge, ge, metric="euclidean")))
  return dist


_UNKNOWN_CAMERA_NOTED: list[bool] = []  # the note below is printed once per process


def unknown_camera_note(q_labels, g_labels) -> str | None:
  """The one-line note for records without a camera id (camera_id -1), or None."""
  nq = int(np.sum(np.asarray(q_labels["camera_id"]) == evaluation.metrics.UNKNOWN_CAMERA))
  ng = int(np.sum(np.asarray(g_labels["camera_id"]) == evaluation.metrics.UNKNOWN_CAMERA))
  if not nq + ng:
    return None
  return (f"note: {nq} query and {ng} gallery items have no camera id (camera_id -1): "
          "every gallery item counts as another camera, so no same-camera match is excluded")


def _rank_all(q_embs, q_labels, g_embs, g_labels, max_rank, rerank, fn, **kw):
  """({name: metrics}, queries scored, queries): queries without a valid match are
  skipped by the protocol, and their count is reported, never hidden."""
  note = unknown_camera_note(q_labels, g_labels)
  if note and not _UNKNOWN_CAMERA_NOTED:
    _UNKNOWN_CAMERA_NOTED.append(True)
    print(note, file=sys.stderr, flush=True)
  out, scored = {}, 0
  for name in q_embs:
    dist = distance_matrix(q_embs[name], g_embs[name], rerank)
    res = fn(dist, q_labels["person_id"], g_labels["person_id"], q_labels["camera_id"],
             g_labels["camera_id"], max_rank=max_rank, **kw)
    out[name], scored = summary(res), int(res["num_valid_queries"])
  return out, scored, len(q_labels["person_id"])


@register("market")
def market(q_embs, q_labels, g_embs, g_labels, *, max_rank=50, rerank=False):
  """Market-1501 protocol for each embedding name (video sets: tracklets pooled first,
  as `video`)."""
  if "tracklet_id" in q_labels:
    return video(q_embs, q_labels, g_embs, g_labels, max_rank=max_rank, rerank=rerank)
  return _rank_all(q_embs, q_labels, g_embs, g_labels, max_rank, rerank,
                   evaluation.evaluate_rank)


@register("cuhk_single_shot")
def cuhk_single_shot(q_embs, q_labels, g_embs, g_labels, *, max_rank=50, rerank=False):
  """Classic CUHK03/CUHK01 single-shot CMC (10 gallery draws), mAP over the gallery."""
  return _rank_all(q_embs, q_labels, g_embs, g_labels, max_rank, rerank,
                   evaluation.evaluate_cuhk03)


def pool_tracklets(embs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                   method: str = "mean"):
  """Video: pools frame embeddings per tracklet (DaRe §5: mean) before ranking."""
  if "tracklet_id" not in labels:
    return embs, labels
  pooled, ids, pids, cams = {}, None, None, None
  for k, v in embs.items():
    pooled[k], ids, pids, cams = evaluation.pool_by_tracklet(
        v, labels["tracklet_id"], labels["person_id"], labels["camera_id"], method)
  return pooled, {"person_id": pids, "camera_id": cams, "tracklet_id": ids}


@register("video")
def video(q_embs, q_labels, g_embs, g_labels, *, max_rank=50, rerank=False,
          method="mean", name="video"):
  """Tracklet-level Market-style ranking (frames mean-pooled per tracklet)."""
  if "tracklet_id" not in q_labels:
    raise ValueError(f"config.eval.protocol={name} needs a video dataset (records with "
                     "tracklet_id, e.g. mars); use market for image datasets")
  return _rank_all(*pool_tracklets(q_embs, q_labels, method),
                   *pool_tracklets(g_embs, g_labels, method),
                   max_rank, rerank, evaluation.evaluate_rank)


@register("video_max")
def video_max(q_embs, q_labels, g_embs, g_labels, *, max_rank=50, rerank=False):
  """`video` with frames max-pooled per tracklet (element-wise)."""
  return video(q_embs, q_labels, g_embs, g_labels, max_rank=max_rank, rerank=rerank,
               method="max", name="video_max")
