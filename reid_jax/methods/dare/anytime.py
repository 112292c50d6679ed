"""DaRe §4 from a trained checkpoint: anytime and budgeted-stream curves, and the
sequential-ensemble baseline (single-exit runs of increasing depth)."""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections
import numpy as np

from reid_jax.methods.dare import budget as budget_lib
from reid_jax.methods.dare import plots
from reid_jax.methods.dare import train as dare_train
from reid_jax.models import exit_costs, format_costs

BUDGET_MODES = ("anytime", "stream")


def model_exit_costs(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Multiply-adds per query image to reach each exit, from the model itself."""
  return {k: int(v) for k, v in exit_costs(
      dare_train.eval_model(config), None,
      (config.input.height, config.input.width, 3)).items()}


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
        variables, _ = dare_train.load_variables(cfg, wd)
        eq, _, eg, _ = dare_train.embed_query_gallery(cfg, variables, tta)
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
