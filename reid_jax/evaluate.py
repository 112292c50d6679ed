"""Evaluates a checkpoint: `python -m reid_jax.evaluate --config=... --workdir=DIR`.

Embeds query and gallery with every exit of the model, ranks the gallery per query
(Market-1501 protocol) and writes `DIR/eval_results.json`:
  {"step": int, "dataset": str, "exits": {"stage1": {"rank1", "rank5", "rank10",
   "mAP", "mINP"}, ..., "fused": {...}}}
with metrics as fractions in [0, 1], and prints the same as a table.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from reid_jax import evaluation
from reid_jax import writer as writer_lib
from reid_jax.data import pipeline, sources


def _tta_views(x: jnp.ndarray, tta: str, out_hw: tuple[int, int]) -> list[jnp.ndarray]:
  """Test-time views of a batch: none, flip, or TriNet's 5 crops + flips (10 views)."""
  if not tta:
    return [x]
  if tta == "flip":
    return [x, evaluation.tta.flip(x)]
  if tta == "five_crop":
    return evaluation.tta.ten_crops(x, out_hw)
  raise ValueError(f"--tta={tta!r}: use flip or five_crop")


def make_embed_fn(model, tta: str, out_hw: tuple[int, int], max_stage: int | None = None):
  """jitted images -> dict of embeddings (float32), averaged over TTA views."""
  @jax.jit
  def embed(variables, images):
    views = _tta_views(images, tta, out_hw)
    outs = [model.apply(variables, v, train=False, max_stage=max_stage) for v in views]
    outs = [{k: v for k, v in o.items() if k != "logits"} for o in outs]
    return jax.tree_util.tree_map(lambda *a: jnp.mean(jnp.stack(a).astype(jnp.float32), 0),
                                  *outs)
  return embed


def embed_split(config: ml_collections.ConfigDict, model, variables: Any, split: str,
                tta: str = "", max_stage: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Embeds every record of `split` once; returns (exit -> [N, D], labels)."""
  h, w = config.input.height, config.input.width
  load_hw = (h, w)
  if tta == "five_crop":  # TriNet: crops of the x1.125 image.
    load_hw = (int(round(h * config.input.augment.resize_scale)),
               int(round(w * config.input.augment.resize_scale)))
  source = sources.open_split(config.dataset, split)
  loader = pipeline.eval_loader(source, height=load_hw[0], width=load_hw[1],
                                batch_size=config.input.eval_batch_size)
  embed = make_embed_fn(model, tta, (h, w), max_stage)
  embs: dict[str, list] = {}
  labels: dict[str, list] = {}
  for batch in loader:
    out = jax.device_get(embed(variables, jnp.asarray(batch["image"])))
    keep = np.asarray(batch["mask"], bool)
    for k, v in out.items():
      embs.setdefault(k, []).append(np.asarray(v)[keep])
    for k in ("person_id", "camera_id", "tracklet_id"):
      if k in batch:
        labels.setdefault(k, []).append(np.asarray(batch[k])[keep])
  return ({k: np.concatenate(v) for k, v in embs.items()},
          {k: np.concatenate(v) for k, v in labels.items()})


def _summary(res: dict) -> dict[str, float]:
  cmc = np.asarray(res["cmc"])
  pick = lambda r: float(cmc[min(r, len(cmc)) - 1])
  return {"rank1": pick(1), "rank5": pick(5), "rank10": pick(10),
          "mAP": float(res["mAP"]), "mINP": float(res["mINP"])}


def pool_tracklets(embs: dict[str, np.ndarray], labels: dict[str, np.ndarray]):
  """Video: mean-pool frame embeddings per tracklet (DaRe, §5) before ranking."""
  if "tracklet_id" not in labels:
    return embs, labels
  pooled, ids = {}, None
  for k, v in embs.items():
    pooled[k], ids, pids, cams = evaluation.pool_by_tracklet(
        v, labels["tracklet_id"], labels["person_id"], labels["camera_id"], "mean")
  return pooled, {"person_id": pids, "camera_id": cams, "tracklet_id": ids}


def rank_exits(q_embs: dict, q_labels: dict, g_embs: dict, g_labels: dict,
               max_rank: int = 50, rerank: bool = False) -> dict[str, dict[str, float]]:
  """Market-1501 metrics for each exit (optionally after k-reciprocal re-ranking)."""
  results = {}
  for name in q_embs:
    qe, ge = q_embs[name], g_embs[name]
    dist = np.asarray(evaluation.pairwise_distance(qe, ge, metric="euclidean"))
    if rerank:
      dist = evaluation.re_ranking(
          dist, np.asarray(evaluation.pairwise_distance(qe, qe, metric="euclidean")),
          np.asarray(evaluation.pairwise_distance(ge, ge, metric="euclidean")))
    res = evaluation.evaluate_rank(dist, q_labels["person_id"], g_labels["person_id"],
                                   q_labels["camera_id"], g_labels["camera_id"],
                                   max_rank=max_rank)
    results[name] = _summary(res)
  return results


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = ""):
  """(q_embs, q_labels, g_embs, g_labels) for every exit, tracklets pooled for video."""
  from reid_jax.train import eval_model
  model = eval_model(config)
  q_embs, q_labels = pool_tracklets(*embed_split(config, model, variables,
                                                 config.dataset.query_split, tta))
  g_embs, g_labels = pool_tracklets(*embed_split(config, model, variables,
                                                 config.dataset.gallery_split, tta))
  return q_embs, q_labels, g_embs, g_labels


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None) -> dict:
  """Embeds query and gallery with `variables` and ranks every exit."""
  q_embs, q_labels, g_embs, g_labels = embedded or embed_query_gallery(config, variables, tta)
  exits = rank_exits(q_embs, q_labels, g_embs, g_labels, config.eval.max_rank, rerank)
  if rerank:  # Also report the plain ranking, so one file shows the re-ranking gain.
    plain = rank_exits(q_embs, q_labels, g_embs, g_labels, config.eval.max_rank, False)
  out = {"step": int(step), "dataset": sources.full_name(config.dataset),
         "rerank": bool(rerank), "tta": tta or "none", "exits": exits}
  if rerank:
    out["exits_without_rerank"] = plain
  return out


def model_exit_costs(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Multiply-adds per query image to reach each exit, from the model itself."""
  from reid_jax.models import exit_costs
  from reid_jax.train import eval_model
  return {k: int(v) for k, v in exit_costs(
      eval_model(config), None, (config.input.height, config.input.width, 3)).items()}


def member_name(config: ml_collections.ConfigDict) -> str:
  """Name of a sequential-ensemble member: its backbone, plus `_stagesN` if truncated."""
  n = config.model.get("num_stages", 4)
  return config.model.backbone + (f"_stages{n}" if n < 4 else "")


def member_names(ensemble: list[tuple[ml_collections.ConfigDict, str]]) -> list[str]:
  """`member_name` of each (config, workdir); the curve and the JSON key the members by
  it, so two equal networks are refused."""
  names = [member_name(cfg) for cfg, _ in ensemble]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"--ensemble: several members are {dup}; each must be a different "
                     "network (backbone or model.num_stages)")
  return names


def budget_curves(config: ml_collections.ConfigDict, embedded, mode: str, workdir: str,
                  ensemble: list[tuple[ml_collections.ConfigDict, str]] = (),
                  costs: dict[str, int] | None = None, tta: str = "") -> dict:
  """DaRe §4 curves: anytime (rank-1/mAP vs budget, + sequential-ensemble baseline) or
  budgeted stream (rank-1 vs average budget for the distance/margin/random rules).
  `costs`: `model_exit_costs(config)` when already computed (counted and printed here
  otherwise). `tta`: the test-time augmentation `embedded` was made with; the
  ensemble members are embedded with the same. Writes the plot next to
  eval_results.json and returns the curves."""
  from reid_jax.methods.dare import budget as budget_lib, plots
  from reid_jax.models import format_costs
  q_embs, q_labels, g_embs, g_labels = embedded
  if costs is None:
    costs = model_exit_costs(config)
    print(format_costs(costs), flush=True)
  labels = (q_labels["person_id"], g_labels["person_id"], q_labels["camera_id"],
            g_labels["camera_id"])
  if "fused" not in costs:
    raise ValueError(f"--budget needs a multi-exit (DaRe) model; this one has exits "
                     f"{sorted(costs)}")
  if mode == "anytime":
    curves = {"DaRe": budget_lib.anytime_curve(q_embs, g_embs, costs, *labels)}
    if ensemble:
      ens_q, ens_g, ens_costs = {}, {}, {}
      for name, (cfg, wd) in zip(member_names(ensemble), ensemble):
        variables, _ = load_checkpoint_variables(cfg, wd)
        eq, _, eg, _ = embed_query_gallery(cfg, variables, tta)
        ens_q[name], ens_g[name] = eq["final"], eg["final"]
        ens_costs[name] = model_exit_costs(cfg)["final"]
      curves["ensemble"] = budget_lib.ensemble_anytime_curve(ens_q, ens_g, ens_costs,
                                                             *labels)
    path = plots.plot_anytime(curves, os.path.join(workdir, "anytime.png"))
  elif mode == "stream":
    lo, hi = min(costs.values()), costs["fused"]
    budgets = list(np.linspace(lo, hi, 9))
    curves = budget_lib.stream_curves(q_embs, g_embs, costs, *labels, budgets=budgets)
    path = plots.plot_stream(curves, os.path.join(workdir, "stream.png"))
  else:
    raise ValueError(f"--budget={mode!r}: use anytime or stream")
  return {"mode": mode, "exit_costs_macs": costs, "curves": _jsonable(curves), "plot": path}


def _jsonable(x):
  """numpy scalars/arrays inside curves -> plain JSON types."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def format_table(results: dict) -> str:
  """The results as a fixed-width table (percentages)."""
  lines = [f"{results['dataset']} step {results['step']}"
           f"{' (re-ranked)' if results.get('rerank') else ''}"
           f"{' tta=' + results['tta'] if results.get('tta', 'none') != 'none' else ''}",
           f"{'exit':<10}{'rank1':>8}{'rank5':>8}{'rank10':>8}{'mAP':>8}{'mINP':>8}"]
  for name, m in results["exits"].items():
    lines.append(f"{name:<10}" + "".join(f"{100 * m[k]:8.2f}" for k in
                                         ("rank1", "rank5", "rank10", "mAP", "mINP")))
  return "\n".join(lines)


def write_results(results: dict, workdir: str, name: str = "eval_results.json") -> str:
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path


def load_checkpoint_variables(config: ml_collections.ConfigDict, workdir: str,
                              step: int | None = None) -> tuple[Any, int]:
  """Restores {'params', 'batch_stats'} of checkpoint `step` (default: newest)."""
  from reid_jax import checkpoint as ckpt_lib
  from reid_jax.train import create_train_state
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first with "
                            "`python -m reid_jax.train --config=... --workdir=...`")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"--checkpoint={step} is not in {ckpt_dir}; available: {steps}")
  # The checkpoint holds every weight: build the template without reading the
  # ImageNet file (faster, and the run still evaluates if that file has moved).
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = ""
  template = create_train_state(jax.random.key(0), config)
  state = ckpt.restore(step, jax.device_get(template))
  ckpt.close()
  return {"params": state.params, "batch_stats": state.batch_stats}, step


FLAGS = flags.FLAGS
BUDGET_MODES = ("anytime", "stream")


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
  flags.DEFINE_bool("rerank", None, "k-reciprocal re-ranking (Zhong et al. 2017); "
                    "default: the config's eval.rerank.")
  flags.DEFINE_enum("tta", None, ["", "none", "flip", "five_crop"],
                    "Test-time augmentation; default: the config's eval.tta (as in training).")
  flags.DEFINE_list("budget", [],
                    "DaRe §4: anytime and/or stream curves (+ PNG plots), e.g. "
                    "--budget=anytime,stream (the images are embedded once for both).")
  flags.DEFINE_list("ensemble", [],
                    "Anytime baseline: single-exit models as WORKDIR (the config saved "
                    "there by training) or CONFIG@WORKDIR, e.g. runs/r18,runs/r34 or "
                    "configs/trinet.py:resnet18@runs/r18,...")


def load_ensemble(specs: list[str], dataset: ml_collections.ConfigDict
                  ) -> list[tuple[ml_collections.ConfigDict, str]]:
  """--ensemble entries -> (config, workdir) per member, evaluated on `dataset`.

  Checked before anything is embedded: every member needs a distinct name
  (`member_names`).
  """
  members = [_load_config_spec(spec, dataset) for spec in specs]
  member_names(members)
  return members


def _load_config_spec(spec: str, dataset: ml_collections.ConfigDict
                      ) -> tuple[ml_collections.ConfigDict, str]:
  """'runs/r18' (its saved config.json) or 'configs/trinet.py:resnet18@runs/r18'
  -> (config, workdir)."""
  if "@" not in spec:
    path = os.path.join(spec, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"--ensemble entry {spec!r}: no {path} (a training workdir has "
                       "one); give CONFIG@WORKDIR to name the config")
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
    cfg.dataset = dataset
    return cfg, spec
  cfg_spec, wd = spec.rsplit("@", 1)
  path, _, variant = cfg_spec.partition(":")
  import importlib.util
  mod_spec = importlib.util.spec_from_file_location("ensemble_config", path)
  if mod_spec is None or not os.path.exists(path):
    raise ValueError(f"--ensemble entry {spec!r}: config file {path} not found")
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  cfg = module.get_config(variant or None)
  # The ensemble members are evaluated on the DaRe model's dataset, each at the input
  # size of its own config (what it was trained at; its cost is counted at that size).
  cfg.dataset = dataset
  return cfg, wd


def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  rerank = FLAGS.config.eval.rerank if FLAGS.rerank is None else FLAGS.rerank
  tta = FLAGS.config.eval.tta if FLAGS.tta is None else FLAGS.tta
  tta = "" if tta == "none" else tta
  bad = [m for m in FLAGS.budget if m not in BUDGET_MODES]
  if bad:
    raise app.UsageError(f"--budget={','.join(FLAGS.budget)}: unknown mode(s) {bad}; use "
                         f"{' and/or '.join(BUDGET_MODES)}, e.g. --budget=anytime,stream")
  if FLAGS.ensemble and "anytime" not in FLAGS.budget:
    raise app.UsageError("--ensemble is the baseline of the anytime curve: add "
                         "--budget=anytime")
  # Read (and check) the members first, so a bad entry fails before any embedding.
  ensemble = load_ensemble(FLAGS.ensemble, FLAGS.config.dataset)
  variables, step = load_checkpoint_variables(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
  embedded = embed_query_gallery(FLAGS.config, variables, tta)
  results = evaluate_variables(FLAGS.config, variables, step, rerank, tta,
                               embedded=embedded)
  if FLAGS.budget:
    from reid_jax.models import format_costs
    costs = model_exit_costs(FLAGS.config)  # counted once for every mode
    print(format_costs(costs), flush=True)
    results["budget"] = {}
    for mode in dict.fromkeys(FLAGS.budget):  # each mode once, in the order given
      results["budget"][mode] = budget_curves(FLAGS.config, embedded, mode, FLAGS.workdir,
                                              ensemble, costs, tta)
      print(f"wrote {results['budget'][mode]['plot']}")
  path = write_results(results, FLAGS.workdir)
  print(format_table(results))
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
