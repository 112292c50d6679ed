"""DaRe under resource limits: anytime and budgeted-stream re-ID on exit embeddings.

Wang et al., "Resource Aware Person Re-identification across Multiple Resolutions",
CVPR 2018, §4 (anytime re-ID, budgeted stream re-ID) and §5.3 (Figures 5 and 6).

A DaRe model has one embedding per exit (`stage1..stageS`, plus `fused`) and each
exit has a cumulative cost in multiply-adds (MACs). Everything here works on
precomputed query/gallery embeddings, except `embed_under_budget`, which runs a
model only up to the affordable stage.

Conventions taken from the official code (github.com/mileyan/DARENet, folder
`budgeted_stream/`, commit 348a715cf745):
  * Gallery embeddings exist for every exit (computed offline); the budget is spent
    on the query only, and a query leaving at exit s is matched against the gallery's
    exit-s embeddings (`main.py: load_distances`, `distances[exit][query]`).
  * The deepest "stage" of the stream is the fused embedding at the full cost
    (`FLOPs[3]` with `query_features_fusion.mat`).
  * Distances are Euclidean (`get_eu_distance` followed by `np.sqrt`).
  * Exit fractions are q_s ∝ a^s with sum 1 and a solved so that sum_s q_s C_s = B
    (`get_p_given_budget`; the code finds a with `np.roots`, we bisect, same root).
  * Confidences are computed on the gallery items that the Market-1501 protocol
    keeps for that query (id -1 and same-id-same-camera items removed):
    "distance" = -(nearest distance), "margin" = (nearest distance to an identity other
    than the nearest neighbour's) - (nearest distance) (`confidence_functions.py`).
  * Online thresholds (`gen_exit_stage`): each query that reaches stage s appends its
    confidence to that stage's history; it exits if its confidence is >= the
    `int((n-1) * p_s)`-th largest of the n confidences seen so far, where
    p_s = q_s / (1 - sum_{t<s} q_t); the last stage always exits.
  * The "random" baseline spreads queries over the two exits whose costs bracket B so
    that the expected cost is B (`get_p_given_budget_random`), i.e. accuracy
    interpolates linearly between neighbouring exits.
  * Offline thresholds from a held-out calibration set (`val_confidence.py:
    get_threshold_offline`) are offered as `thresholds="offline"`.

The official repository has no anytime (§4.1) code; `anytime_curve` implements "answer
with the deepest exit finished within the budget", and `ensemble_anytime_curve` the
sequential-ensemble baseline of Figure 5 (ResNet-18/34/50, smallest first, costs
summed); this cost accounting is our reading and was not checked against the paper's
text, which was not available to us.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from reid_jax.evaluation.metrics import distinct_unknown_cameras

EvaluateFn = Callable[..., Mapping[str, Any]]
RULES = ("distance", "margin", "random")
_STAGE_RE = re.compile(r"^stage(\d+)$")


# ----------------------------------------------------------------------------- exits


def exit_ladder(costs: Mapping[str, float], final_exit: str = "fused",
                exits: Sequence[str] | None = None) -> list[str]:
  """Exits in evaluation order: `stage1..stage{S-1}` then `final_exit`.

  `final_exit` is the embedding used once the deepest stage has run (the paper uses
  the fused one; pass "stageS" for the plain last stage). `exits` overrides the
  whole ladder (e.g. all five exits). Costs along the ladder must not decrease.
  """
  if exits is None:
    stages = sorted(int(m.group(1)) for m in map(_STAGE_RE.match, costs) if m)
    if not stages:
      raise ValueError(f"costs has no 'stageN' exits (keys: {sorted(costs)}); "
                       "pass costs from reid_jax.models.cost.exit_costs or set exits=")
    if stages != list(range(1, len(stages) + 1)):
      raise ValueError(f"costs has stages {stages}, expected stage1..stage{len(stages)}; "
                       "add the missing stage costs")
    exits = [f"stage{s}" for s in stages[:-1]] + [final_exit]
  exits = list(exits)
  if not exits:
    raise ValueError("exits is empty; pass at least one exit name")
  unknown = [e for e in exits if e not in costs]
  if unknown:
    raise ValueError(f"unknown exit(s) {unknown} (costs has {sorted(costs)}); "
                     "fix final_exit/exits or add their costs")
  c = [float(costs[e]) for e in exits]
  if any(b < a for a, b in zip(c, c[1:])):
    raise ValueError(f"exit costs {dict(zip(exits, c))} decrease along the ladder; "
                     "order exits by cumulative cost")
  return exits


def _check_budget(budget: float, exits: Sequence[str] | None, cum: Sequence[float]
                  ) -> None:
  if not np.isfinite(budget) or budget < cum[0]:
    name = f" '{exits[0]}'" if exits else ""
    raise ValueError(f"budget {budget:.6g} MACs is below the cheapest exit{name} "
                     f"({cum[0]:.6g} MACs); use a budget >= {cum[0]:.6g}")


def _deepest_affordable(budget: float, exits: Sequence[str], cum: Sequence[float]) -> int:
  _check_budget(budget, exits, cum)
  return bisect.bisect_right(list(cum), float(budget)) - 1


def anytime_exit(budget: float, costs: Mapping[str, float], final_exit: str = "fused",
                 exits: Sequence[str] | None = None) -> str:
  """Deepest exit whose cumulative cost is <= `budget` (§4.1 anytime re-ID)."""
  ladder = exit_ladder(costs, final_exit, exits)
  cum = [float(costs[e]) for e in ladder]
  return ladder[_deepest_affordable(budget, ladder, cum)]


# ------------------------------------------------------------------------ evaluation


def pairwise_euclidean(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Euclidean distance matrix (nq, ng) in float64, as the official simulation uses."""
  q = np.asarray(q, np.float64)
  g = np.asarray(g, np.float64)
  d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
  return np.sqrt(np.maximum(d2, 0.0))


def _default_evaluate_fn() -> EvaluateFn:
  try:
    from reid_jax.evaluation import evaluate_rank  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("reid_jax.evaluation.evaluate_rank is not importable "
                     f"({e}); pass evaluate_fn=") from e
  return evaluate_rank


def _evaluate(dist: np.ndarray, labels: tuple, evaluate_fn: EvaluateFn | None
              ) -> tuple[float, float]:
  fn = evaluate_fn or _default_evaluate_fn()
  res = fn(dist, *labels)
  return float(np.asarray(res["cmc"]).reshape(-1)[0]), float(res["mAP"])


def _labels(q_pids, g_pids, q_camids, g_camids, nq: int, ng: int) -> tuple:
  out = tuple(np.asarray(x) if x is not None else None
              for x in (q_pids, g_pids, q_camids, g_camids))
  for name, x, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), out,
                        (nq, ng, nq, ng)):
    if x is None:
      raise ValueError(f"{name} is missing; pass identity and camera labels for "
                       "queries and gallery")
    if x.shape != (n,):
      raise ValueError(f"{name} has shape {x.shape}, expected ({n},) to match the "
                       "embeddings")
  return out


def _pair(q_embs: Mapping[str, Any], g_embs: Mapping[str, Any], name: str
          ) -> tuple[np.ndarray, np.ndarray]:
  for side, d in (("q_embs", q_embs), ("g_embs", g_embs)):
    if name not in d:
      raise ValueError(f"exit '{name}' is missing from {side} (has {sorted(d)}); "
                       "compute embeddings for every exit on the ladder")
  q, g = np.asarray(q_embs[name]), np.asarray(g_embs[name])
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"exit '{name}': query {q.shape} and gallery {g.shape} "
                     "embeddings must be 2-D with the same width")
  return q, g


def _sizes(q_embs, g_embs, ladder) -> tuple[int, int]:
  q, g = _pair(q_embs, g_embs, ladder[0])
  nq, ng = len(q), len(g)
  for e in ladder[1:]:
    q, g = _pair(q_embs, g_embs, e)
    if len(q) != nq or len(g) != ng:
      raise ValueError(f"exit '{e}' has {len(q)} queries/{len(g)} gallery items, "
                       f"'{ladder[0]}' has {nq}/{ng}; all exits must embed the same images")
  return nq, ng


# ----------------------------------------------------------------------- anytime §4.1


def _anytime(ladder, cum, q_embs, g_embs, labels_raw, budgets, evaluate_fn):
  nq, ng = _sizes(q_embs, g_embs, ladder)
  labels = _labels(*labels_raw, nq, ng)
  if budgets is None:
    budgets = sorted(set(cum))
  cache: dict[str, tuple[float, float]] = {}
  out = []
  for b in budgets:
    i = _deepest_affordable(float(b), ladder, cum)
    name = ladder[i]
    if name not in cache:
      cache[name] = _evaluate(pairwise_euclidean(*_pair(q_embs, g_embs, name)), labels,
                              evaluate_fn)
    r1, m_ap = cache[name]
    out.append({"budget": float(b), "exit": name, "cost": float(cum[i]),
                "rank1": r1, "mAP": m_ap})
  return out


def anytime_curve(q_embs: Mapping[str, Any], g_embs: Mapping[str, Any],
                  costs: Mapping[str, float], q_pids, g_pids, q_camids, g_camids,
                  budgets: Sequence[float] | None = None, final_exit: str = "fused",
                  exits: Sequence[str] | None = None,
                  evaluate_fn: EvaluateFn | None = None) -> list[dict]:
  """Anytime re-ID: accuracy when each query gets `budget` MACs (a step function).

  The query network runs until the budget is exhausted and answers with the deepest
  finished exit; gallery embeddings are precomputed for every exit. `budgets=None`
  evaluates at each exit's cost (where the steps are). Returns one
  `{budget, exit, cost, rank1, mAP}` per budget; `cost` is what was actually spent.
  """
  ladder = exit_ladder(costs, final_exit, exits)
  cum = [float(costs[e]) for e in ladder]
  return _anytime(ladder, cum, q_embs, g_embs, (q_pids, g_pids, q_camids, g_camids),
                  budgets, evaluate_fn)


def ensemble_anytime_curve(q_embs: Mapping[str, Any], g_embs: Mapping[str, Any],
                           costs: Mapping[str, float], q_pids, g_pids, q_camids,
                           g_camids, budgets: Sequence[float] | None = None,
                           order: Sequence[str] | None = None,
                           evaluate_fn: EvaluateFn | None = None) -> list[dict]:
  """Anytime baseline: separately trained networks evaluated smallest first (§5.3).

  `costs[m]` is model m's own cost; reaching model m costs the sum over the models
  before it and itself, and the answer is model m's embedding (the paper's
  ResNet-18/34/50 ensemble). `order` defaults to increasing cost. Same output as
  `anytime_curve` with `exit` = model name.
  """
  order = list(order) if order is not None else sorted(costs, key=lambda m: (costs[m], m))
  unknown = [m for m in order if m not in costs]
  if unknown or not order:
    raise ValueError(f"unknown model(s) {unknown} in order (costs has {sorted(costs)}); "
                     "fix order or add their costs")
  cum = np.cumsum([float(costs[m]) for m in order]).tolist()
  return _anytime(order, cum, q_embs, g_embs, (q_pids, g_pids, q_camids, g_camids),
                  budgets, evaluate_fn)


# ------------------------------------------------------------- budgeted stream §4.2


def _fractions(log_a: float, n: int) -> np.ndarray:
  z = log_a * np.arange(1, n + 1)
  z = np.exp(z - z.max())
  return z / z.sum()


def solve_exit_fractions(stage_costs: Sequence[float], budget: float
                         ) -> tuple[float, np.ndarray]:
  """Solves q_s = a^s / sum_t a^t (s = 1..S) with sum_s q_s C_s = budget, by bisection.

  The expected cost is strictly increasing in a, so the root is unique (the official
  `get_p_given_budget` finds the same a as a polynomial root). Returns (a, q); at
  budget == C_1 this is (0, one-hot first), at budget >= C_S (inf, one-hot last).
  """
  c = np.asarray(stage_costs, np.float64)
  if c.ndim != 1 or len(c) == 0 or np.any(np.diff(c) <= 0):
    raise ValueError(f"stage costs {c.tolist()} must be strictly increasing; "
                     "drop exits that cost no more than the previous one")
  b = float(budget)
  _check_budget(b, None, c)
  n = len(c)
  if b == c[0]:
    return 0.0, np.eye(n)[0]
  if b >= c[-1]:
    return float("inf"), np.eye(n)[-1]
  f = lambda t: float(_fractions(t, n) @ c)
  lo, hi = -1.0, 1.0
  while f(lo) > b and lo > -700:
    lo *= 2
  while f(hi) < b and hi < 700:
    hi *= 2
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if f(mid) < b:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-14:
      break
  t = 0.5 * (lo + hi)
  return float(np.exp(t)), _fractions(t, n)


def interpolation_fractions(stage_costs: Sequence[float], budget: float) -> np.ndarray:
  """Random-exit baseline fractions: mix the two exits bracketing the budget.

  With C_k <= B < C_{k+1}: q_k = (C_{k+1} - B) / (C_{k+1} - C_k), q_{k+1} = 1 - q_k
  (official `get_p_given_budget_random`), so the expected cost is exactly B.
  """
  c = np.asarray(stage_costs, np.float64)
  _check_budget(float(budget), None, c)
  q = np.zeros(len(c))
  if budget >= c[-1]:
    q[-1] = 1.0
    return q
  k = int(np.searchsorted(c, budget, side="right")) - 1
  q[k] = (c[k + 1] - budget) / (c[k + 1] - c[k])
  q[k + 1] = 1.0 - q[k]
  return q


def conditional_exit_probs(q: Sequence[float]) -> np.ndarray:
  """p_s = q_s / (1 - sum_{t<s} q_t): chance of exiting at s given s was reached."""
  q = np.asarray(q, np.float64)
  left = 1.0 - np.concatenate([[0.0], np.cumsum(q)[:-1]])
  p = np.where(left > 1e-12, q / np.maximum(left, 1e-300), 1.0)
  p = np.clip(p, 0.0, 1.0)
  p[-1] = 1.0
  return p


def protocol_valid_mask(q_pids, g_pids, q_camids, g_camids) -> np.ndarray:
  """(nq, ng) gallery items a query may be matched against (Market-1501 protocol).

  Drops id -1 and same-id-same-camera items, as the official confidences do; an unknown
  camera (-1) is never the same camera (`metrics.distinct_unknown_cameras`).
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = distinct_unknown_cameras(np.asarray(q_camids), np.asarray(g_camids))
  junk = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])
  return ~junk & (g_pids[None, :] != -1)


def stage_confidence(dist: np.ndarray, rule: str, g_pids=None,
                     valid_mask: np.ndarray | None = None) -> np.ndarray:
  """Per-query confidence at one exit; larger means more confident.

  "distance": -(distance to the nearest gallery item).
  "margin": (nearest distance to an identity other than the nearest neighbour's)
  minus (nearest distance); needs `g_pids`. +inf when no other identity is left,
  -inf for "distance" when no gallery item is valid.
  """
  dist = np.asarray(dist, np.float64)
  valid = np.ones(dist.shape, bool) if valid_mask is None else np.asarray(valid_mask, bool)
  d = np.where(valid, dist, np.inf)
  nn = np.argmin(d, axis=1)
  d1 = d[np.arange(len(d)), nn]
  if rule == "distance":
    return -d1
  if rule != "margin":
    raise ValueError(f"unknown confidence rule '{rule}'; use 'distance' or 'margin'")
  if g_pids is None:
    raise ValueError("the 'margin' rule needs gallery identities; pass g_pids")
  g_pids = np.asarray(g_pids)
  other = g_pids[None, :] != g_pids[nn][:, None]
  d2 = np.where(other, d, np.inf).min(axis=1)
  with np.errstate(invalid="ignore"):
    m = d2 - d1
  return np.where(np.isfinite(d1), m, -np.inf)


def online_exit_stages(conf: np.ndarray, exit_probs: Sequence[float], warmup: int = 0,
                       rng: np.random.Generator | None = None) -> np.ndarray:
  """Exit index per query for a stream, thresholds learned from earlier queries.

  `conf` is (n, S): confidence of query i at exit s. Queries arrive in row order.
  At stage s < S the query's confidence joins that stage's history of n values and it
  exits if it is >= the `int((n-1) p_s)`-th largest (official `gen_exit_stage`).
  Exact cases differ from the official code on purpose: p_s = 0 never exits, p_s = 1
  always exits. While a stage has seen fewer than `warmup` confidences, queries exit
  there with probability p_s (needs `rng`). The last exit takes everyone left.
  """
  conf = np.asarray(conf, np.float64)
  p = np.asarray(exit_probs, np.float64)
  n, s_count = conf.shape
  if len(p) != s_count:
    raise ValueError(f"{len(p)} exit probabilities for {s_count} exits; pass one per exit")
  if warmup > 0 and rng is None:
    raise ValueError("warmup > 0 draws random exits; pass rng=np.random.default_rng(seed)")
  seen: list[list[float]] = [[] for _ in range(s_count - 1)]
  out = np.full(n, s_count - 1, dtype=np.int64)
  for i in range(n):
    for s in range(s_count - 1):
      c = conf[i, s]
      hist = seen[s]
      bisect.insort(hist, c)
      if p[s] <= 0.0:
        continue
      if p[s] >= 1.0:
        out[i] = s
        break
      if len(hist) <= warmup:
        if rng.random() < p[s]:
          out[i] = s
          break
        continue
      k = int((len(hist) - 1) * p[s])
      if c >= hist[len(hist) - 1 - k]:
        out[i] = s
        break
  return out


def offline_thresholds(cal_conf: np.ndarray, exit_probs: Sequence[float]) -> np.ndarray:
  """Thresholds (S-1,) from a calibration set so that fractions p_s exit in turn.

  Among calibration queries still running at stage s, the round(n_left p_s) most
  confident exit; the threshold is the smallest confidence among them (+inf if none),
  following the official `get_threshold_offline`.
  """
  cal_conf = np.asarray(cal_conf, np.float64)
  p = np.asarray(exit_probs, np.float64)
  left = np.ones(len(cal_conf), bool)
  theta = np.full(cal_conf.shape[1] - 1, np.inf)
  for s in range(len(theta)):
    k = int(round(left.sum() * p[s]))
    if k > 0:
      theta[s] = np.sort(cal_conf[left, s])[::-1][k - 1]
      left &= cal_conf[:, s] < theta[s]
  return theta


def exit_stages_from_thresholds(conf: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """First exit s with conf[:, s] >= theta[s]; the last exit otherwise."""
  conf = np.asarray(conf, np.float64)
  hit = np.concatenate([conf[:, :-1] >= np.asarray(theta)[None, :],
                        np.ones((len(conf), 1), bool)], axis=1)
  return np.argmax(hit, axis=1)


def _stream_inputs(q_embs, g_embs, ladder, labels_raw):
  nq, ng = _sizes(q_embs, g_embs, ladder)
  labels = _labels(*labels_raw, nq, ng)
  dists = [pairwise_euclidean(*_pair(q_embs, g_embs, e)) for e in ladder]
  return labels, dists


def _confidences(rule, dists, labels, junk_aware: bool = True) -> np.ndarray:
  valid = protocol_valid_mask(*labels) if junk_aware else None
  return np.stack([stage_confidence(d, rule, labels[1], valid) for d in dists], axis=1)


def stream_curves(q_embs: Mapping[str, Any], g_embs: Mapping[str, Any],
                  costs: Mapping[str, float], q_pids, g_pids, q_camids, g_camids,
                  budgets: Sequence[float], rules: Sequence[str] = RULES, seed: int = 0,
                  final_exit: str = "fused", exits: Sequence[str] | None = None,
                  thresholds: str = "online", calibration: Mapping[str, Any] | None = None,
                  warmup: int = 0, random_fractions: str = "interpolate",
                  junk_aware_confidence: bool = True,
                  evaluate_fn: EvaluateFn | None = None) -> dict[str, list[dict]]:
  """Budgeted stream re-ID (§4.2): rank-1 vs average MACs per query for each rule.

  For each average budget B the exit fractions q_s ∝ a^s are solved so that the
  expected cost is B; "distance"/"margin" queries exit early when confident
  (thresholds "online" from earlier queries of the stream in row order, or "offline"
  from `calibration`, a dict with the same q_embs/g_embs/q_pids/g_pids/q_camids/
  g_camids keys as this function). "random" exits at random with fractions
  `random_fractions`: "interpolate" (official baseline, two bracketing exits) or
  "geometric" (the same q_s as the confidence rules). Budgets above the deepest
  exit's cost send everyone there (avg_cost < budget). `junk_aware_confidence`
  computes confidences on the gallery items the protocol keeps for the query, as the
  official code does (this reads the query's id and camera); False uses the whole
  gallery, as a deployment without query labels would. `warmup`: see
  `online_exit_stages`.

  Returns rule -> list of {budget, avg_cost, rank1, mAP, exit_fractions}; random
  entries add `expected_rank1` = sum_s q_s rank1_s (exact expectation of the draw).
  """
  ladder = exit_ladder(costs, final_exit, exits)
  cum = np.array([float(costs[e]) for e in ladder])
  bad = [r for r in rules if r not in RULES]
  if bad:
    raise ValueError(f"unknown rule(s) {bad}; use a subset of {RULES}")
  if thresholds not in ("online", "offline"):
    raise ValueError(f"thresholds='{thresholds}' unknown; use 'online' or 'offline'")
  if thresholds == "offline" and calibration is None:
    raise ValueError("thresholds='offline' needs calibration= (held-out embeddings "
                     "and labels); or use thresholds='online'")
  if random_fractions not in ("interpolate", "geometric"):
    raise ValueError(f"random_fractions='{random_fractions}' unknown; use "
                     "'interpolate' or 'geometric'")
  budgets = [float(b) for b in budgets]
  if not budgets:
    raise ValueError("budgets is empty; pass average budgets in MACs")
  for b in budgets:
    _check_budget(b, ladder, cum)
  labels, dists = _stream_inputs(q_embs, g_embs, ladder,
                                 (q_pids, g_pids, q_camids, g_camids))
  nq = len(labels[0])
  cal_conf: dict[str, np.ndarray] = {}
  if thresholds == "offline":
    keys = ("q_embs", "g_embs", "q_pids", "g_pids", "q_camids", "g_camids")
    missing = [k for k in keys if k not in calibration]
    if missing:
      raise ValueError(f"calibration is missing {missing}; pass a dict with {keys}")
    cal_labels, cal_dists = _stream_inputs(
        calibration["q_embs"], calibration["g_embs"], ladder,
        tuple(calibration[k] for k in keys[2:]))
    for r in rules:
      if r != "random":
        cal_conf[r] = _confidences(r, cal_dists, cal_labels, junk_aware_confidence)
  per_exit: list[tuple[float, float]] | None = None
  rows = np.arange(nq)
  stacked = np.stack(dists, axis=0)
  out: dict[str, list[dict]] = {}
  for ri, rule in enumerate(rules):
    conf = (None if rule == "random"
            else _confidences(rule, dists, labels, junk_aware_confidence))
    curve = []
    for bi, b in enumerate(budgets):
      rng = np.random.default_rng([seed, ri, bi])
      q_geo = solve_exit_fractions(cum, b)[1]
      if rule == "random":
        q = q_geo if random_fractions == "geometric" else interpolation_fractions(cum, b)
        stage = rng.choice(len(ladder), size=nq, p=q)
      elif thresholds == "online":
        q = q_geo
        stage = online_exit_stages(conf, conditional_exit_probs(q), warmup, rng)
      else:
        q = q_geo
        theta = offline_thresholds(cal_conf[rule], conditional_exit_probs(q))
        stage = exit_stages_from_thresholds(conf, theta)
      mixed = stacked[stage, rows]
      r1, m_ap = _evaluate(mixed, labels, evaluate_fn)
      entry = {"budget": b, "avg_cost": float(cum[stage].mean()), "rank1": r1,
               "mAP": m_ap,
               "exit_fractions": {e: float(np.mean(stage == i))
                                  for i, e in enumerate(ladder)}}
      if rule == "random":
        if per_exit is None:
          per_exit = [_evaluate(d, labels, evaluate_fn) for d in dists]
        entry["expected_rank1"] = float(sum(qs * r[0] for qs, r in zip(q, per_exit)))
      curve.append(entry)
    out[rule] = curve
  return out


# --------------------------------------------------------------------------- serving


def embed_under_budget(model: Any, variables: Any, images: Any, budget: float,
                       costs: Mapping[str, float], final_exit: str = "fused",
                       exits: Sequence[str] | None = None) -> tuple[Any, str]:
  """Embeds `images` with the deepest exit affordable within `budget` MACs.

  Runs `model.apply(variables, images, train=False, max_stage=s)` so computation
  stops after stage s; the fused exit runs the whole model (`max_stage=None`).
  Returns (embeddings, exit_name).
  """
  ladder = exit_ladder(costs, final_exit, exits)
  name = anytime_exit(budget, costs, final_exit, ladder)
  m = _STAGE_RE.match(name)
  max_stage = int(m.group(1)) if m else None
  out = model.apply(variables, images, train=False, max_stage=max_stage)
  if name not in out:
    raise ValueError(f"model output has no '{name}' (has {sorted(out)}) with "
                     f"max_stage={max_stage}; check the model's exit names")
  return out[name], name
