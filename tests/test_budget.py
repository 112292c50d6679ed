"""DaRe under resource limits: anytime, ensemble, budgeted stream, serving, plots.

Uses small planted embeddings and a tiny Market-1501 metric of our own (passed as
`evaluate_fn`), so nothing here depends on reid_jax.models or reid_jax.evaluation.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax.methods.dare import budget as B
from reid_jax.methods.dare.plots import plot_anytime, plot_stream

EXITS = ("stage1", "stage2", "stage3", "stage4", "fused")
COSTS = {"stage1": 1.0, "stage2": 2.0, "stage3": 4.0, "stage4": 6.0, "fused": 7.0}


def ref_eval(dist, q_pids, g_pids, q_camids, g_camids):
  """Market-1501 rank-1/mAP: junk = id -1 or same id and camera; no-match queries skipped."""
  order = np.argsort(dist, axis=1, kind="stable")
  gp, gc = g_pids[order], g_camids[order]
  junk = ((gp == q_pids[:, None]) & (gc == q_camids[:, None])) | (gp == -1)
  good = (gp == q_pids[:, None]) & (gc != q_camids[:, None])
  r1, aps = [], []
  for i in np.flatnonzero(good.any(1)):
    h = good[i][~junk[i]]
    pos = np.flatnonzero(h) + 1
    r1.append(float(h[0]))
    aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
  return {"cmc": np.array([np.mean(r1)]), "mAP": float(np.mean(aps)),
          "mINP": float("nan"), "num_valid_queries": len(r1)}


def planted(seed, n_ids=20, q_per_id=2, g_per_id=3, dim=16, hard_frac=0.5,
            hard_noise=(2.0, 1.6, 1.0, 0.6, 0.4), easy_noise=0.15):
  """Per exit its own prototype space; easy queries are clean at every exit, hard ones
  only at deep exits. Gallery: cameras 1..3, a few id -1 (junk) and id 0 distractors."""
  rng = np.random.default_rng(seed)
  pids = np.arange(1, n_ids + 1)
  g_pids = np.concatenate([np.repeat(pids, g_per_id), [-1, -1, 0, 0, 0]])
  g_cam = rng.integers(1, 4, len(g_pids))
  q_pids = np.tile(pids, q_per_id)
  q_cam = np.zeros(len(q_pids), np.int64)
  hard = rng.random(len(q_pids)) < hard_frac
  q_embs, g_embs = {}, {}
  for s, name in enumerate(EXITS):
    protos = rng.normal(size=(n_ids + 1, dim))  # row 0: distractor identity
    g_idx = np.where(g_pids < 0, 0, g_pids)
    g = protos[g_idx] + 0.3 * rng.normal(size=(len(g_pids), dim))
    g[g_pids == -1] = rng.normal(size=(2, dim)) * 3.0
    sigma = np.where(hard, hard_noise[s], easy_noise)[:, None]
    q = protos[q_pids] + sigma * rng.normal(size=(len(q_pids), dim))
    q_embs[name], g_embs[name] = q.astype(np.float32), g.astype(np.float32)
  labels = (q_pids, g_pids, q_cam, g_cam)
  return q_embs, g_embs, labels, hard


# ------------------------------------------------------------------ exit fractions


def test_solve_exit_fractions_hand_case():
  # costs 1, 2, 4 and B = 2: (a + 2a^2 + 4a^3) = 2 (a + a^2 + a^3)  =>  a = 1/sqrt(2).
  a, q = B.solve_exit_fractions([1.0, 2.0, 4.0], 2.0)
  r = 1 / math.sqrt(2)
  want = np.array([r, r**2, r**3]) / (r + r**2 + r**3)
  assert a == pytest.approx(r, rel=1e-10)
  np.testing.assert_allclose(q, want, rtol=1e-10)
  assert q @ np.array([1.0, 2.0, 4.0]) == pytest.approx(2.0, rel=1e-12)


def test_solve_matches_official_polynomial_root():
  """Official get_p_given_budget: positive root of sum_s (C_s - B) a^(s-1) = 0."""
  c = np.array([523568640, 1150094336, 2060915200, 2542295040], np.float64)
  for b in np.linspace(c[0], c[-1], 9)[1:-1]:
    a, q = B.solve_exit_fractions(c, b)
    roots = np.roots((c - b)[::-1])
    pos = roots.real[(abs(roots.imag) < 1e-9) & (roots.real > 0)]
    assert len(pos) == 1 and a == pytest.approx(pos[0], rel=1e-8)
    assert q @ c == pytest.approx(b, rel=1e-12)


def test_fraction_edges_and_conditionals():
  a, q = B.solve_exit_fractions([1.0, 2.0, 4.0], 1.0)
  assert a == 0.0 and q.tolist() == [1.0, 0.0, 0.0]
  a, q = B.solve_exit_fractions([1.0, 2.0, 4.0], 9.0)
  assert q.tolist() == [0.0, 0.0, 1.0]
  np.testing.assert_allclose(B.interpolation_fractions([1.0, 2.0, 4.0], 3.0), [0, .5, .5])
  np.testing.assert_allclose(B.interpolation_fractions([1.0, 2.0, 4.0], 1.25), [.75, .25, 0])
  np.testing.assert_allclose(B.conditional_exit_probs([0.5, 0.25, 0.25]), [0.5, 0.5, 1.0])
  np.testing.assert_allclose(B.conditional_exit_probs([0.2, 0.4, 0.4]), [0.2, 0.5, 1.0])
  np.testing.assert_allclose(B.conditional_exit_probs([1.0, 0.0, 0.0]), [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="strictly increasing"):
    B.solve_exit_fractions([1.0, 1.0, 4.0], 2.0)


# ------------------------------------------------------------------------- anytime


def test_anytime_step_function_matches_direct_loop():
  q_embs, g_embs, labels, _ = planted(0)
  budgets = np.linspace(1.0, 9.0, 33)
  for final, ladder in (("fused", EXITS[:3] + ("fused",)), ("stage4", EXITS[:4])):
    curve = B.anytime_curve(q_embs, g_embs, COSTS, *labels, budgets=budgets,
                            final_exit=final, evaluate_fn=ref_eval)
    for b, e in zip(budgets, curve):
      best = None
      for name in ladder:  # direct loop: deepest exit we can pay for
        if COSTS[name] <= b:
          best = name
      assert e["exit"] == best and e["cost"] == COSTS[best] and e["budget"] == b
      dist = B.pairwise_euclidean(q_embs[best], g_embs[best])
      want = ref_eval(dist, *labels)
      assert e["rank1"] == want["cmc"][0] and e["mAP"] == want["mAP"]
  # default budgets: one point per step; all five exits as an explicit ladder
  curve = B.anytime_curve(q_embs, g_embs, COSTS, *labels, exits=EXITS, evaluate_fn=ref_eval)
  assert [e["exit"] for e in curve] == list(EXITS)
  assert [e["budget"] for e in curve] == [1.0, 2.0, 4.0, 6.0, 7.0]
  # planted data: deeper exits are more accurate
  r1 = [e["rank1"] for e in curve]
  assert r1[0] < r1[-1]


def test_ensemble_anytime_cumulative_costs():
  q_embs, g_embs, labels, _ = planted(1)
  nets = {"resnet18": "stage1", "resnet34": "stage3", "resnet50": "fused"}
  qe = {m: q_embs[e] for m, e in nets.items()}
  ge = {m: g_embs[e] for m, e in nets.items()}
  costs = {"resnet50": 4.1, "resnet18": 1.8, "resnet34": 3.6}
  curve = B.ensemble_anytime_curve(qe, ge, costs, *labels,
                                   budgets=[1.8, 5.0, 5.4, 9.4, 9.5, 20.0],
                                   evaluate_fn=ref_eval)
  assert [e["exit"] for e in curve] == ["resnet18", "resnet18", "resnet34", "resnet34",
                                        "resnet50", "resnet50"]
  np.testing.assert_allclose([e["cost"] for e in curve], [1.8, 1.8, 5.4, 5.4, 9.5, 9.5])
  d = B.pairwise_euclidean(qe["resnet34"], ge["resnet34"])
  assert curve[2]["rank1"] == ref_eval(d, *labels)["cmc"][0]
  default = B.ensemble_anytime_curve(qe, ge, costs, *labels, evaluate_fn=ref_eval)
  np.testing.assert_allclose([e["budget"] for e in default], [1.8, 5.4, 9.5])


def test_bad_inputs_raise_one_line_errors():
  q_embs, g_embs, labels, _ = planted(2)
  with pytest.raises(ValueError, match="below the cheapest exit 'stage1'") as ei:
    B.anytime_curve(q_embs, g_embs, COSTS, *labels, budgets=[0.5], evaluate_fn=ref_eval)
  assert "\n" not in str(ei.value)
  with pytest.raises(ValueError, match="below the cheapest exit"):
    B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[0.9], evaluate_fn=ref_eval)
  with pytest.raises(ValueError, match=r"unknown exit\(s\) \['fusion'\]"):
    B.anytime_exit(3.0, COSTS, final_exit="fusion")
  with pytest.raises(ValueError, match="missing from g_embs"):
    B.anytime_curve(q_embs, {k: v for k, v in g_embs.items() if k != "stage2"}, COSTS,
                    *labels, evaluate_fn=ref_eval)
  with pytest.raises(ValueError, match="needs gallery identities; pass g_pids"):
    B.stage_confidence(np.ones((2, 3)), "margin")
  with pytest.raises(ValueError, match="g_pids is missing"):
    B.stream_curves(q_embs, g_embs, COSTS, labels[0], None, *labels[2:], budgets=[3.0],
                    rules=("margin",), evaluate_fn=ref_eval)
  with pytest.raises(ValueError, match="unknown rule"):
    B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[3.0], rules=("entropy",),
                    evaluate_fn=ref_eval)
  with pytest.raises(ValueError, match="needs calibration"):
    B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[3.0], thresholds="offline",
                    evaluate_fn=ref_eval)
  with pytest.raises(ValueError, match="decrease along the ladder"):
    B.exit_ladder(COSTS, exits=("stage2", "stage1"))


# -------------------------------------------------------------------------- stream


def test_confidences_on_hand_distances():
  dist = np.array([[1.0, 1.1, 3.0],    # close, but a different identity is just as close
                   [2.0, 5.0, 2.5]])   # farther, but the runner-up identity is far away
  g_pids = np.array([7, 8, 7])
  np.testing.assert_allclose(B.stage_confidence(dist, "distance"), [-1.0, -2.0])
  np.testing.assert_allclose(B.stage_confidence(dist, "margin", g_pids), [0.1, 3.0])
  # protocol mask: the first gallery item is junk for query 0 -> nn is item 1 (id 8)
  valid = np.array([[False, True, True], [True, True, True]])
  np.testing.assert_allclose(B.stage_confidence(dist, "distance", g_pids, valid), [-1.1, -2.0])
  np.testing.assert_allclose(B.stage_confidence(dist, "margin", g_pids, valid), [1.9, 3.0])
  mask = B.protocol_valid_mask([7, 8], g_pids, [0, 0], [0, 1, 1])
  assert mask.tolist() == [[False, True, True], [True, True, True]]
  assert np.isinf(B.stage_confidence(dist[:, [0, 2]], "margin", np.array([7, 7])))[0]


def _official_online(conf, p):
  """Straight transcription of the loop in the official gen_exit_stage (0 < p_s < 1)."""
  hist = [[] for _ in range(conf.shape[1] - 1)]
  out = []
  for i in range(len(conf)):
    for s in range(conf.shape[1]):
      if s == conf.shape[1] - 1:
        out.append(s)
        break
      hist[s].append(conf[i, s])
      ranked = np.sort(hist[s])[::-1]
      if conf[i, s] >= ranked[int((len(ranked) - 1) * p[s])]:
        out.append(s)
        break
  return np.array(out)


def test_online_thresholds_hand_case_and_official_loop():
  conf = np.array([[0.3, 0], [0.1, 0], [0.5, 0], [0.2, 0]])
  # q0 is the only value (exits); q1 < max 0.3; q2 >= 2nd largest 0.3; q3 < 0.3
  assert B.online_exit_stages(conf, [0.5, 1.0]).tolist() == [0, 1, 0, 1]
  rng = np.random.default_rng(5)
  conf = rng.normal(size=(400, 4))
  p = [0.3, 0.45, 0.6, 1.0]
  np.testing.assert_array_equal(B.online_exit_stages(conf, p), _official_online(conf, p))
  # p_s = 0 never exits there, p_s = 1 always does
  assert (B.online_exit_stages(conf, [0.0, 1.0, 0.5, 1.0]) == 1).all()
  # warm-up: the first 100 queries at a stage exit at random with probability p_s
  warm = [B.online_exit_stages(conf, [0.5, 1.0, 1.0, 1.0], warmup=100,
                               rng=np.random.default_rng(s)) for s in (1, 1, 2)]
  np.testing.assert_array_equal(warm[0], warm[1])
  assert not np.array_equal(warm[0][:100], warm[2][:100])
  # every query reaches stage 1, so its history and later decisions ignore the draws
  np.testing.assert_array_equal(warm[0][100:] == 0, warm[2][100:] == 0)
  assert abs((warm[0] == 0).mean() - 0.5) < 0.08
  with pytest.raises(ValueError, match="pass rng="):
    B.online_exit_stages(conf, p, warmup=10)


def test_distance_and_margin_rules_exit_easy_queries_early():
  q_embs, g_embs, labels, hard = planted(3, n_ids=40, q_per_id=6, g_per_id=3)
  ladder = ["stage1", "stage2", "stage3", "fused"]
  costs = [COSTS[e] for e in ladder]
  # pick the budget whose solved q_1 is about the easy fraction
  budget = next(b for b in np.linspace(1.0, 7.0, 601)
                if B.solve_exit_fractions(costs, b)[1][0] <= np.mean(~hard))
  res = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[budget],
                        evaluate_fn=ref_eval)
  valid = B.protocol_valid_mask(*labels)
  dists = [B.pairwise_euclidean(q_embs[e], g_embs[e]) for e in ladder]
  conf = {r: np.stack([B.stage_confidence(d, r, labels[1], valid) for d in dists], 1)
          for r in ("distance", "margin")}
  for rule in ("distance", "margin"):
    q1 = B.solve_exit_fractions(costs, budget)[1][0]
    stage = B.online_exit_stages(conf[rule], B.conditional_exit_probs(
        B.solve_exit_fractions(costs, budget)[1]))
    early = stage == 0
    assert abs(early.mean() - q1) < 0.05
    assert (~hard[early]).mean() > 0.85, rule   # stage-1 exits are the easy queries
    assert res[rule][0]["rank1"] > res["random"][0]["expected_rank1"] + 0.05
    assert res[rule][0]["exit_fractions"]["stage1"] == pytest.approx(early.mean())
  # without the query's labels (whole gallery) the rules still route easy queries early
  blind = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[budget],
                          rules=("distance", "margin"), junk_aware_confidence=False,
                          evaluate_fn=ref_eval)
  for rule in ("distance", "margin"):
    assert blind[rule][0]["rank1"] > res["random"][0]["expected_rank1"] + 0.05


def test_realised_cost_matches_budget_on_large_stream():
  q_embs, g_embs, labels, _ = planted(4, n_ids=150, q_per_id=8, g_per_id=3,
                                      hard_frac=0.6)
  budgets = [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
  res = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=budgets, seed=7,
                        evaluate_fn=ref_eval)
  ladder = ["stage1", "stage2", "stage3", "fused"]
  dists = [B.pairwise_euclidean(q_embs[e], g_embs[e]) for e in ladder]
  acc = [ref_eval(d, *labels)["cmc"][0] for d in dists]
  for rule in ("distance", "margin", "random"):
    for b, e in zip(budgets, res[rule]):
      assert e["budget"] == b
      assert abs(e["avg_cost"] - b) / b < 0.03, (rule, b, e["avg_cost"])
      assert sum(e["exit_fractions"].values()) == pytest.approx(1.0)
  for b, e in zip(budgets, res["random"]):
    q = B.interpolation_fractions([COSTS[x] for x in ladder], b)
    assert e["expected_rank1"] == pytest.approx(float(q @ np.array(acc)), abs=1e-12)
    assert abs(e["rank1"] - e["expected_rank1"]) < 0.05   # 1200 queries, two exits
  # deterministic given the seed; the random rule's draw changes with it
  again = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=budgets[:2], seed=7,
                          evaluate_fn=ref_eval)
  assert again == {r: c[:2] for r, c in res.items()}
  other = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=budgets[:2], seed=8,
                          rules=("random",), evaluate_fn=ref_eval)
  assert other["random"] != res["random"][:2]


def test_geometric_random_and_offline_thresholds():
  q_embs, g_embs, labels, _ = planted(5, n_ids=100, q_per_id=6, g_per_id=3)
  cq, cg, cl, _ = planted(6, n_ids=100, q_per_id=6, g_per_id=3)
  cal = dict(q_embs=cq, g_embs=cg, q_pids=cl[0], g_pids=cl[1], q_camids=cl[2],
             g_camids=cl[3])
  ladder = ["stage1", "stage2", "stage3", "fused"]
  acc = [ref_eval(B.pairwise_euclidean(q_embs[e], g_embs[e]), *labels)["cmc"][0]
         for e in ladder]
  res = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[2.0, 4.0],
                        thresholds="offline", calibration=cal, random_fractions="geometric",
                        evaluate_fn=ref_eval)
  for b, e in zip([2.0, 4.0], res["random"]):
    q = B.solve_exit_fractions([COSTS[x] for x in ladder], b)[1]
    assert e["expected_rank1"] == pytest.approx(float(q @ np.array(acc)), abs=1e-12)
  for rule in ("distance", "margin"):
    for b, e in zip([2.0, 4.0], res[rule]):
      assert abs(e["avg_cost"] - b) / b < 0.08, (rule, b, e["avg_cost"])
  # offline thresholds reproduce the calibration fractions on the calibration set
  conf = np.random.default_rng(0).normal(size=(1000, 4))
  q = B.solve_exit_fractions([1.0, 2.0, 4.0, 7.0], 3.0)[1]
  theta = B.offline_thresholds(conf, B.conditional_exit_probs(q))
  frac = np.bincount(B.exit_stages_from_thresholds(conf, theta), minlength=4) / 1000
  np.testing.assert_allclose(frac, q, atol=2e-3)


def test_default_evaluate_fn_agrees_with_reference():
  q_embs, g_embs, labels, _ = planted(7)
  got = B.anytime_curve(q_embs, g_embs, COSTS, *labels)
  want = B.anytime_curve(q_embs, g_embs, COSTS, *labels, evaluate_fn=ref_eval)
  for g, w in zip(got, want):
    assert g["rank1"] == pytest.approx(w["rank1"], abs=1e-6)


# ------------------------------------------------------------------------- serving

RAN: list = []


class TinyDaRe(nn.Module):
  """Stand-in with the ReIDModel call convention; records the stages it computes."""
  num_stages: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False, max_stage: int | None = None):
    last = self.num_stages if max_stage is None else max_stage
    out, h = {}, x
    for s in range(1, last + 1):
      RAN.append(s)
      h = nn.relu(nn.Dense(8, name=f"block{s}")(h))
      out[f"stage{s}"] = nn.Dense(4, name=f"head{s}")(h)
    if max_stage is None:
      w = self.param("fuse", nn.initializers.ones, (self.num_stages,))
      out["fused"] = sum(w[i] * out[f"stage{i + 1}"] for i in range(self.num_stages))
    return out


def test_embed_under_budget_stops_at_the_affordable_stage():
  model = TinyDaRe()
  x = jnp.ones((3, 5))
  variables = model.init(jax.random.PRNGKey(0), x)
  full = model.apply(variables, x)
  for budget, name, ran in ((1.0, "stage1", [1]), (3.9, "stage2", [1, 2]),
                            (5.0, "stage3", [1, 2, 3]), (6.5, "stage3", [1, 2, 3]),
                            (100.0, "fused", [1, 2, 3, 4])):
    RAN.clear()
    emb, got = B.embed_under_budget(model, variables, x, budget, COSTS)
    assert got == name and RAN == ran
    np.testing.assert_allclose(emb, full[name], rtol=1e-6)
  RAN.clear()
  emb, got = B.embed_under_budget(model, variables, x, 6.5, COSTS, final_exit="stage4")
  assert got == "stage4" and RAN == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="below the cheapest exit"):
    B.embed_under_budget(model, variables, x, 0.1, COSTS)


# --------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
  q_embs, g_embs, labels, _ = planted(8)
  dare = B.anytime_curve(q_embs, g_embs, COSTS, *labels, evaluate_fn=ref_eval)
  ens = B.ensemble_anytime_curve(
      {"r18": q_embs["stage2"], "r50": q_embs["fused"]},
      {"r18": g_embs["stage2"], "r50": g_embs["fused"]}, {"r18": 2.0, "r50": 7.0},
      *labels, evaluate_fn=ref_eval)
  p1 = plot_anytime({"DaRe": dare, "ResNet ensemble": ens}, str(tmp_path / "a.png"))
  stream = B.stream_curves(q_embs, g_embs, COSTS, *labels, budgets=[1.5, 3.0, 5.0],
                           evaluate_fn=ref_eval)
  p2 = plot_stream(stream, str(tmp_path / "s" / "b.png"), points={"single": (7.0, 0.9)})
  for p in (p1, p2):
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="curve 'x' is empty"):
    plot_stream({"x": []}, str(tmp_path / "c.png"))


def test_protocol_valid_mask_unknown_cameras_are_never_the_same_camera():
  """camera_id -1 (a `folder` dataset without cameras) never makes a same-camera junk
  pair, as in `evaluate_rank`; id -1 items are always dropped (hand-derived masks)."""
  qp, gp = np.array([1, 2]), np.array([1, 1, 2, -1])
  got = B.protocol_valid_mask(qp, gp, np.array([-1, 0]), np.array([-1, 0, 0, 0]))
  np.testing.assert_array_equal(got, [[True, True, True, False], [True, True, False, False]])
  got = B.protocol_valid_mask(qp, gp, np.array([0, 0]), np.array([0, 1, 0, 0]))
  np.testing.assert_array_equal(got, [[False, True, True, False], [True, True, False, False]])
