"""Evaluation protocols by name, run on whatever embeddings a method's embedder returns.

A protocol is `fn(q_embs, q_labels, g_embs, g_labels, *, max_rank, rerank) ->
({name: {metric: float}}, queries scored, queries)`: it ranks the gallery for every
embedding name it is handed.
The built-in protocols (Market-style ranking, CUHK single-shot CMC, video tracklet
pooling) live in `reid_jax.evaluation.protocols` and register themselves here;
`config.eval.protocol` names one or several (comma-separated or a tuple).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections

from reid_jax.core import embedding
from reid_jax.data import sources

Protocol = Callable[..., dict[str, dict[str, float]]]
PROTOCOLS: dict[str, Protocol] = {}


def register(name: str):
  """Decorator registering a protocol under `name` (a value of config.eval.protocol)."""
  def wrap(fn: Protocol) -> Protocol:
    PROTOCOLS[name] = fn
    return fn
  return wrap


def protocol_names(spec: Any) -> list[str]:
  """config.eval.protocol ('market', 'market,video' or a tuple) -> checked names."""
  import reid_jax.evaluation.protocols  # noqa: F401  (registers the built-in protocols)
  names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
  names = [n for n in names if n] or ["market"]
  unknown = [n for n in names if n not in PROTOCOLS]
  if unknown:
    raise ValueError(f"config.eval.protocol={','.join(names)}: unknown {unknown}; "
                     f"registered protocols: {sorted(PROTOCOLS)}")
  return names


def embed_query_gallery(config: ml_collections.ConfigDict, embed: embedding.Embedder,
                        variables: Any, tta: str = "") -> tuple:
  """(q_embs, q_labels, g_embs, g_labels) of the config's query and gallery splits."""
  h, w = embedding.load_size(config, tta)
  kw = dict(height=h, width=w, batch_size=config.input.eval_batch_size)
  q = embedding.embed_split(config.dataset, config.dataset.query_split, embed, variables, **kw)
  g = embedding.embed_split(config.dataset, config.dataset.gallery_split, embed, variables,
                            **kw)
  return q + g


def evaluate_embeddings(config: ml_collections.ConfigDict, embedded: tuple, *, step: int,
                        rerank: bool = False, tta: str = "") -> dict:
  """Runs every protocol of `config.eval.protocol` on embedded query/gallery.

  Returns {"step", "dataset", "rerank", "tta", "protocol", "num_queries",
  "num_valid_queries", "exits": {name: metrics}} (the first protocol's numbers; all
  of them under "protocols" when there are several), plus "exits_without_rerank" when
  re-ranked, so one file shows the re-ranking gain.
  """
  names = protocol_names(config.eval.get("protocol", "market"))
  max_rank = config.eval.max_rank
  runs = {n: PROTOCOLS[n](*embedded, max_rank=max_rank, rerank=rerank) for n in names}
  first, scored, num_queries = runs[names[0]]
  out = {"step": int(step), "dataset": sources.full_name(config.dataset),
         "rerank": bool(rerank), "tta": tta or "none", "protocol": names[0],
         "num_queries": int(num_queries), "num_valid_queries": scored, "exits": first}
  if len(names) > 1:
    out["protocols"] = {n: r[0] for n, r in runs.items()}
  if rerank:
    out["exits_without_rerank"] = PROTOCOLS[names[0]](*embedded, max_rank=max_rank,
                                                      rerank=False)[0]
  return out


def format_table(results: dict) -> str:
  """The results as a fixed-width table (percentages)."""
  lines = [f"{results['dataset']} step {results['step']}"
           f"{' (re-ranked)' if results.get('rerank') else ''}"
           f"{' tta=' + results['tta'] if results.get('tta', 'none') != 'none' else ''}",
           f"{'exit':<10}{'rank1':>8}{'rank5':>8}{'rank10':>8}{'mAP':>8}{'mINP':>8}"]
  for name, m in results["exits"].items():
    lines.append(f"{name:<10}" + "".join(f"{100 * m[k]:8.2f}" for k in
                                         ("rank1", "rank5", "rank10", "mAP", "mINP")))
  if "num_valid_queries" in results:
    skipped = results["num_queries"] - results["num_valid_queries"]
    lines.append(f"{results['num_valid_queries']} queries scored, {skipped} without a "
                 "cross-camera match in the gallery skipped (protocol)")
  return "\n".join(lines)


TRAIN_RESULTS_NAME = "eval_results.json"  # training's; `evaluate` writes its own file


def write_results(results: dict, workdir: str, name: str = TRAIN_RESULTS_NAME) -> str:
  """Writes results atomically (a temporary file renamed over the old one)."""
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path
