"""The PyTorch twins in benchmarks/torch_models.py compute what reid_jax computes.

This is what makes benchmarks/cpu_step.py's "same network, loss and optimiser" claim
checkable: with the flax variables copied into the torch model (`load_flax_params`),
on tiny inputs (32x16 images, P=4 K=2), for resnet_small, MobileNetV2 and a one-block-
per-stage Bottleneck ResNet (ResNet-50's block; these two with REID_JAX_SLOW_TESTS=1):
  * every exit's embedding agrees, in eval mode and in train mode (batch statistics),
    and so do the DaRe loss, its gradient for every parameter and the BatchNorm
    running means (both sides in float64: see that test's docstring);
  * (resnet_small) one step of the real pmapped train step against torch's: the loss,
    the gradients (read from Adam's first moment), the updated parameters and the
    BatchNorm means agree. One network suffices there (the step adds the optimiser and
    the pmap/sync-BN/global-mining plumbing); its compile costs ~16 s of CPU.
(MobileNetV2 has no width option, so that check runs the full network.) The full
ResNet-50 is checked for layout (every variable has a torch place of the same shape,
stage maps have the same shapes; no compile), and both backbones' stage strides for
both last_stride values. Variables are numpy randoms over `jax.eval_shape` (random
init compiles slowly on CPU); torch runs on one thread (see `one_torch_thread`).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch twins "
                            "of benchmarks/torch_models.py cannot be checked")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_models as tm  # noqa: E402

from configs import dare  # noqa: E402
from reid_jax.core import loop, optim, parallel  # noqa: E402
from reid_jax.core import state as state_lib  # noqa: E402
from reid_jax.methods.dare import loss as loss_lib  # noqa: E402
from reid_jax.methods.dare import train  # noqa: E402
from reid_jax.models import BACKBONES, DaReHead, ReIDModel  # noqa: E402
from reid_jax.models.reid_model import make_backbone  # noqa: E402
from reid_jax.models.resnet import ResNet  # noqa: E402

H, W, P, K = 32, 16, 4, 2
RTOL = 1e-4


@pytest.fixture(autouse=True)
def one_torch_thread():
  """Small torch ops on a busy 2-core machine: 2 OpenMP threads were up to 20x slower
  than 1 (each op waits for the descheduled thread); the numerics do not depend on it."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def numpy_variables(model, x: np.ndarray, seed: int = 0) -> dict:
  """Random float32 variables of sane scale over `model.init`'s structure (no RNG compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    if name == "weights":  # fusion
      return rng.uniform(0.2, 0.6, leaf.shape)
    return rng.normal(0.0, 0.1, leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda p, l: np.asarray(fill(p, l), np.float32), shapes)


def rel_err(a, b) -> float:
  """max |a - b| / max |a| (a: the reference)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


def flat(tree: dict) -> dict[str, np.ndarray]:
  return {"/".join(k): v for k, v in tm._flatten(tree)}  # pylint: disable=protected-access


def adam_mu(opt_state):
  """Adam's first moment (a params-shaped tree) inside the optax state."""
  found = []

  def walk(node):
    if hasattr(node, "mu") and hasattr(node, "nu"):
      found.append(node.mu)
      return
    children = (node.values() if isinstance(node, dict) else
                node if isinstance(node, tuple) else
                [getattr(node, f) for f in getattr(node, "_fields", ())])
    for child in children:
      walk(child)
  walk(opt_state)
  assert len(found) == 1, found
  return found[0]


def config_for(variant: str):
  c = dare.get_config(variant)
  c.model.pretrained = "none"
  c.input.height, c.input.width, c.input.P, c.input.K = H, W, P, K
  return c


def bottleneck_models(c):
  """A one-block-per-stage Bottleneck ResNet (ResNet-50's block and layout rules) with
  the DaRe head: (eval model, train model with BN synchronised over the pmap axis)."""
  def build(axis):
    head = DaReHead(c.model.hidden_dim, c.model.embed_dim, bn_axis_name=axis)
    return ReIDModel(ResNet((1, 1, 1, 1), "bottleneck", 8, c.model.last_stride,
                            bn_axis_name=axis), head)
  return build(None), build(parallel.AXIS)


CASES = {
    # configs/dare.py:mobilenetv2,market_cpu (last_stride 1, lr 1e-3).
    "mobilenetv2": ("mobilenetv2,market_cpu", None),
    # configs/dare.py:synthetic: resnet_small width 16, last_stride 1, hidden 256, embed 64.
    "resnet_small": ("synthetic", None),
    # The paper config (ResNet-50 settings: last_stride 2, 1024/128, lr 3e-4) on a tiny
    # Bottleneck ResNet.
    "bottleneck": ("", bottleneck_models),
}
# The float64 gradient's XLA compile costs ~25 s of CPU for MobileNetV2 and ~10 s for
# the Bottleneck ResNet, ~5 s for resnet_small: by default only resnet_small runs (with
# the step test below, the file stays near 30 s); REID_JAX_SLOW_TESTS=1 adds the others.
SLOW = os.environ.get("REID_JAX_SLOW_TESTS") == "1"
slow = pytest.mark.skipif(not SLOW, reason="10-25 s of XLA compile; REID_JAX_SLOW_TESTS=1 "
                          "runs it")
FORWARD_CASES = [pytest.param("resnet_small"), pytest.param("mobilenetv2", marks=slow),
                 pytest.param("bottleneck", marks=slow)]


def build_case(case: str):
  """(config, flax eval model, flax train model, torch twin, variables) of a case."""
  variant, custom = CASES[case]
  c = config_for(variant)
  if custom is None:
    m_eval, m_train = train.eval_model(c), train.training_model(c)
    net = tm.build_dare(c.model)
  else:
    m_eval, m_train = custom(c)
    net = tm.DaReNet(tm.ResNet((1, 1, 1, 1), "bottleneck", 8, c.model.last_stride),
                     c.model.hidden_dim, c.model.embed_dim)
  variables = numpy_variables(m_eval, np.zeros((1, H, W, 3), np.float32))
  tm.load_flax_params(net, variables["params"], variables["batch_stats"])
  return c, m_eval, m_train, net, variables


def batch(c) -> tuple[np.ndarray, np.ndarray, "torch.Tensor", "torch.Tensor"]:
  """A P=4 K=2 batch of random images of the config's size: numpy NHWC + ids, torch
  NCHW + ids (int64)."""
  shape = (P * K, c.input.height, c.input.width, 3)
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  pids = np.repeat(np.arange(P), K).astype(np.int32)
  return x, pids, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(pids).long()


def compile_fast(fn, *args):
  """`fn` (jitted or pmapped) compiled for `args` without XLA backend optimisation (the
  same program and IEEE float32 numerics; compiles ~2x faster on CPU), then run."""
  return fn.lower(*args).compile(state_lib.RUN_ONCE_COMPILER_OPTIONS)(*args)


def assert_grads_match(g_j: dict, g_t: dict, noise: float) -> None:
  """Per leaf, relative to its largest entry. A leaf whose gradient is zero in exact
  arithmetic (below `noise` x the largest gradient on both sides: e.g. a bias followed
  by a train-mode BatchNorm, or the head's fc2 bias, which shifts every embedding alike
  and so no distance) holds rounding noise, which only has to be small on both sides."""
  assert sorted(g_j) == sorted(g_t)
  scale = max(np.abs(v).max() for v in g_t.values())
  for k in g_j:
    if np.abs(g_t[k]).max() < noise * scale:
      assert np.abs(g_j[k]).max() < noise * scale, k
    else:
      assert rel_err(g_j[k], g_t[k]) < RTOL, k


def model_f64(case: str, c) -> ReIDModel:
  """The case's flax network computing in float64 (the same modules and variables; BN
  without a cross-device axis)."""
  if CASES[case][1] is not None:
    backbone = ResNet((1, 1, 1, 1), "bottleneck", 8, c.model.last_stride, dtype=jnp.float64)
  else:
    kw = {"width": c.model.width} if c.model.backbone == "resnet_small" else {}
    backbone = BACKBONES[c.model.backbone](last_stride=c.model.last_stride,
                                           dtype=jnp.float64, **kw)
  return ReIDModel(backbone, DaReHead(c.model.hidden_dim, c.model.embed_dim,
                                      dtype=jnp.float64))


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_loss_and_gradients_match(case):
  """Every exit's embedding (eval and train mode), the DaRe loss on the train-mode
  embeddings, its gradient for every parameter and the BatchNorm statistics of a
  train-mode forward, with both networks computing in float64.

  float64, because this checks that the functions are the same, and float32 rounding
  blurs that where a ReLU6 input lies within rounding of 0 and one side takes the other
  branch: at random init the stem's gradient is a sum with heavy cancellation (|sum| ~
  0.4% of sum |terms| for MobileNetV2's batchnorm0), so one flipped element moved
  reid_jax's float32 stem gradient by 2% from the exact one (torch float32: 2e-5); in
  float64 the two agree to 3e-8. (reid_jax casts embeddings and the loss to float32
  even here, hence RTOL.) reid_jax's convs have custom backward passes, so equal
  forwards would not imply equal gradients. The float32 step is checked below.
  """
  c, _, _, net, variables = build_case(case)
  x, pids, xt, pt = batch(c)
  with jax.enable_x64(True):
    m64 = model_f64(case, c)

    def run(v, x, pids):
      out_eval = m64.apply(v, x, train=False)

      def loss_fn(params):
        out, stats = m64.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
        loss, per_exit = loss_lib.multi_exit_triplet_loss(out, {"person_id": pids}, c.loss)
        return loss, (out, stats, per_exit)
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
      return out_eval, loss, aux, grads
    out_eval, loss_j, (out_train, new_stats, per_exit), grads = jax.tree_util.tree_map(
        np.asarray, compile_fast(jax.jit(run), variables, jnp.asarray(x, jnp.float64), pids))
  net = net.double()
  with torch.no_grad():
    t_eval = net.eval()(xt.double())
  t_train = net.train()(xt.double())
  loss_t, per_exit_t = tm.dare_loss(t_train, pt, c.loss)
  loss_t.backward()
  loss_t, per_exit_t = loss_t.detach(), {k: v.detach() for k, v in per_exit_t.items()}
  assert sorted(t_eval) == sorted(out_eval) == ["fused", "stage1", "stage2", "stage3", "stage4"]
  for k in out_eval:
    assert rel_err(out_eval[k], t_eval[k].numpy()) < RTOL, (k, "eval")
    assert rel_err(out_train[k], t_train[k].detach().numpy()) < RTOL, (k, "train")
  assert list(per_exit_t) == list(c.loss.exits) == ["stage1", "stage2", "stage3", "stage4",
                                                     "fused"]
  assert float(loss_t) == pytest.approx(float(loss_j), rel=RTOL)
  for name, l in per_exit_t.items():
    assert float(l) == pytest.approx(float(per_exit[f"loss/{name}"]), rel=RTOL), name
  template = {"params": variables["params"]}
  g_t = tm.to_flax_layout(net, template, lambda p: p.grad)["params"]
  assert_grads_match(flat(grads), flat(g_t), noise=1e-6)
  # Running statistics after one train-mode forward: the same mean; the variance
  # differs only by PyTorch's unbiased estimate (x n / (n - 1)), the one known difference.
  s_0, s_j = flat(variables["batch_stats"]), flat(new_stats["batch_stats"])
  s_t = flat(tm.to_flax_layout(net, {"batch_stats": variables["batch_stats"]})["batch_stats"])
  for k in s_j:
    if k.endswith("/mean"):
      assert rel_err(s_j[k], s_t[k]) < RTOL, k
  k = "head/stage4/bn/var"  # BatchNorm1d: n = batch size
  unbiased = (s_j[k] - 0.9 * s_0[k]) / 0.1 * (P * K) / (P * K - 1)
  assert rel_err(0.9 * s_0[k] + 0.1 * unbiased, s_t[k]) < RTOL


@slow  # ~25 s of compile; the default run keeps the float64 network/loss/gradient check
def test_one_train_step_matches():
  """The pmapped train step `python -m reid_jax.train` runs (loop.device_step over
  train.train_step, BN synchronised over the 8 test devices, one image each) against
  torch_models.DaReStep, one step from the same variables: the loss, the gradients
  (Adam's first moment is (1 - b1) g after one step), the updated parameters and the
  BatchNorm means. Run on resnet_small (configs/dare.py:synthetic, lr 2e-3) only:
  every network's gradients are checked above, and a step compile costs ~16 s of CPU."""
  c, m_eval, m_train, net, variables = build_case("resnet_small")
  x, pids, xt, pt = batch(c)
  tx = optim.make_optimizer(c.optimizer, c.train.steps, variables["params"])
  state = state_lib.create(m_eval.apply, jax.tree_util.tree_map(jnp.asarray, variables), tx)
  n = jax.local_device_count()
  p_step = jax.pmap(loop.device_step(functools.partial(train.train_step, model=m_train,
                                                       config=c), c.seed),
                    axis_name=parallel.AXIS)
  new_state, metrics = compile_fast(p_step, parallel.replicate(state),
                                    parallel.shard({"image": x, "person_id": pids}, n),
                                    np.full(n, 1, np.int32))
  new_state, metrics = parallel.unreplicate(new_state), parallel.unreplicate(metrics)
  assert metrics["nonfinite"] == 0.0
  opt = tm.make_optimizer(net.parameters(), c.optimizer, c.train.steps)
  loss = tm.DaReStep(net, opt, c.loss)(xt, pt)
  assert float(loss) == pytest.approx(float(metrics["loss"]), rel=RTOL)

  template = {"params": variables["params"]}
  mu_j = flat(jax.tree_util.tree_map(np.asarray, adam_mu(new_state.opt_state)))
  mu_t = flat(tm.to_flax_layout(net, template, lambda p: opt.state[p]["exp_avg"])["params"])
  g_t = flat(tm.to_flax_layout(net, template, lambda p: p.grad)["params"])
  p_j = flat(jax.tree_util.tree_map(np.asarray, new_state.params))
  p_t = flat(tm.to_flax_layout(net, template)["params"])
  assert_grads_match(mu_j, mu_t, noise=1e-6)
  scale = max(np.abs(v).max() for v in mu_t.values())
  lr = c.optimizer.lr
  for k in mu_j:
    np.testing.assert_allclose(mu_t[k], (1 - c.optimizer.b1) * g_t[k], rtol=1e-6, atol=1e-12)
    # Both sides' Adam moved every parameter by at most lr (first update ~ lr sign(g)).
    assert np.max(np.abs(p_j[k] - p_t[k])) <= 2.0001 * lr, k
    # Elements whose gradient is well above float noise moved identically.
    sure = np.abs(mu_t[k]) > max(1e-3 * np.abs(mu_t[k]).max(), 1e-6 * scale)
    assert np.max(np.abs(p_j[k] - p_t[k])[sure], initial=0.0) < 1e-6, k
  s_j = flat(jax.tree_util.tree_map(np.asarray, new_state.batch_stats))
  s_t = flat(tm.to_flax_layout(net, {"batch_stats": variables["batch_stats"]})["batch_stats"])
  for k in s_j:
    if k.endswith("/mean"):
      assert rel_err(s_j[k], s_t[k]) < RTOL, k


def test_resnet50_layout_matches():
  """Every flax variable of the full DaRe-ResNet-50 has a torch place of the same shape
  (load_flax_params raises otherwise) and the parameter counts are equal; stage maps
  have equal shapes (last_stride=1; the tiny Bottleneck case runs last_stride=2).
  (MobileNetV2 has no width option: the forward check above runs the full network.)"""
  c = config_for("")
  c.model.last_stride = 1
  x = np.zeros((1, 128, 64, 3), np.float32)
  m = train.eval_model(c)
  net = tm.build_dare(c.model)
  variables = numpy_variables(m, x)
  tm.load_flax_params(net, variables["params"], variables["batch_stats"])
  n_flax = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(variables["params"]))
  assert n_flax == sum(p.numel() for p in net.parameters())
  maps = jax.eval_shape(lambda x: make_backbone(c.model).init_with_output(
      jax.random.PRNGKey(0), x)[0], x)
  with torch.no_grad():
    t_maps = net.eval().backbone(torch.zeros(1, 3, 128, 64))
  assert [tuple(f.shape) for f in maps] == [
      (1, t.shape[2], t.shape[3], t.shape[1]) for t in t_maps]


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenetv2"])
def test_torch_stage_strides(backbone):
  """Stage maps at strides 4, 8, 16, 32 (16 with last_stride=1), as reid_jax documents."""
  for last_stride in (1, 2):
    net = tm.build_backbone(backbone, last_stride).eval()
    with torch.no_grad():
      maps = net(torch.zeros(1, 3, 128, 64))
    strides = (4, 8, 16, 16 * last_stride)
    assert [tuple(f.shape[2:]) for f in maps] == [(128 // s, 64 // s) for s in strides]
    assert tuple(f.shape[1] for f in maps) == net.stage_channels


def test_optimizer_schedule_matches_optax():
  """lr and Adam's beta1 per update follow reid_jax.core.optim (TriNet schedule)."""
  c = dare.get_config().optimizer
  total = 100
  c.decay_start = 40
  sched = optim.make_schedule(c, total)
  opt = tm.make_optimizer([torch.nn.Parameter(torch.zeros(1))], c, total)
  for k in (0, 39, 40, 41, 70, 99, 100, 150):
    assert opt.lr(k) == pytest.approx(float(sched(k)), rel=1e-5)
  opt.opt.param_groups[0]["params"][0].grad = torch.ones(1)
  for k in range(42):
    opt.step()
    b1 = opt.opt.param_groups[0]["betas"][0]
    assert b1 == (0.9 if k < 40 else 0.5)
