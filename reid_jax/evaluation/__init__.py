"""Re-ID evaluation on embeddings: exact Market-1501 metrics, re-ranking, pictures.

Works on distance matrices or embeddings (no model needed):
  * `evaluate_rank`: CMC, mAP (standard or official Market-1501 AP), mINP.
  * `evaluate_rank_streaming`: the same numbers from embeddings, the gallery
    streamed in jitted blocks (no query x gallery matrix).
  * `evaluate_cuhk03`: classic single-shot CMC; `pool_queries`: multi-query.
  * `pool_by_tracklet`: video re-ID (mean or max per tracklet).
  * `re_ranking` / `re_ranking_from_embeddings`: k-reciprocal re-ranking.
  * `pairwise_distance`: blocked euclidean / squared euclidean / cosine.
  * `tta`: flip and TriNet ten-crop views; `visualize`: ranked lists, CMC plot.
"""

from reid_jax.evaluation import tta
from reid_jax.evaluation._checks import EvaluationError
from reid_jax.evaluation.distance import METRICS, pairwise_distance
from reid_jax.evaluation.metrics import (evaluate_cuhk03, evaluate_rank, metrics_from_ranks,
                                         positive_ranks)
from reid_jax.evaluation.rerank import re_ranking, re_ranking_from_embeddings
from reid_jax.evaluation.streaming import evaluate_rank_streaming
from reid_jax.evaluation.video import pool_by_tracklet, pool_queries, segment_pool

__all__ = [
    "EvaluationError", "METRICS", "evaluate_cuhk03", "evaluate_rank",
    "evaluate_rank_streaming", "metrics_from_ranks", "pairwise_distance",
    "pool_by_tracklet", "pool_queries", "positive_ranks", "re_ranking",
    "re_ranking_from_embeddings", "segment_pool", "tta",
]


def __getattr__(name: str):
  """Lazy `visualize` (imports matplotlib only when used)."""
  if name == "visualize":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("reid_jax.evaluation.visualize")
  raise AttributeError(f"module 'reid_jax.evaluation' has no attribute {name!r}")
