"""Backbones, heads and the ReID model: shapes, early exit, fusion, dtypes, BN across devices.

Big backbones are checked with `jax.eval_shape` (no compile, no compute); numerics run
on the tiny `resnet_small`. Variables are filled with numpy randoms over the
`eval_shape` structure because random init compiles one RNG kernel per shape (slow on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax.models import (
    BACKBONES,
    DaReHead,
    Fusion,
    ReIDModel,
    TriNetHead,
    build_model,
    default_model_config,
)
from reid_jax.models.cost import op_costs
from reid_jax.models.resnet import resnet_small

H, W = 64, 32

STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet_small": (16, 32, 64, 128),
    "densenet201": (256, 512, 1792, 1920),
    "mobilenetv2": (24, 32, 96, 1280),
}


def abstract_init(model, x, **kwargs):
  """Variable shapes of `model.init(rng, x, **kwargs)`, without running it."""
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **kwargs), x)


def numpy_init(model, x, seed: int = 0, **kwargs):
  """Random float32 variables with sane scales (fast: no XLA RNG compiles)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract_init(model, x, **kwargs))


def image(batch: int = 2, seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, H, W, 3)), jnp.float32)


def backbone_out_shapes(name: str, last_stride: int = 2, max_stage=None, batch: int = 1):
  model = BACKBONES[name](last_stride=last_stride)
  x = jax.ShapeDtypeStruct((batch, H, W, 3), jnp.float32)
  out, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, max_stage=max_stage), x
  )
  return [o.shape for o in out]


@pytest.mark.parametrize("name", sorted(STAGE_CHANNELS))
def test_backbone_stage_shapes_and_last_stride(name):
  shapes = backbone_out_shapes(name)
  expected = [(1, H // s, W // s, c) for s, c in zip((4, 8, 16, 32), STAGE_CHANNELS[name])]
  assert shapes == expected
  # last_stride=1 doubles the final map and changes nothing else.
  s1 = backbone_out_shapes(name, last_stride=1)
  assert s1[:3] == shapes[:3]
  assert s1[3] == (1, 2 * shapes[3][1], 2 * shapes[3][2], shapes[3][3])


@pytest.mark.parametrize("name", ["resnet50", "densenet201", "mobilenetv2"])
def test_max_stage_returns_fewer_maps_and_touches_fewer_params(name):
  model = BACKBONES[name]()
  x = jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32)
  assert len(backbone_out_shapes(name, max_stage=2)) == 2
  full = abstract_init(model, x)
  early = abstract_init(model, x, max_stage=2)
  n_full = sum(v.size for v in jax.tree_util.tree_leaves(full["params"]))
  n_early = sum(v.size for v in jax.tree_util.tree_leaves(early["params"]))
  assert n_early < n_full / 4
  # Applying with full variables but max_stage=2 runs strictly fewer convolutions.
  ops_full, _ = op_costs(model, full, (H, W, 3))
  ops_early, _ = op_costs(model, full, (H, W, 3), max_stage=2)
  assert 0 < len(ops_early) < len(ops_full)
  assert sum(o.macs for o in ops_early) < sum(o.macs for o in ops_full)
  if name.startswith("resnet"):
    assert "layer3_0" not in early["params"] and "layer2_0" in early["params"]


def test_max_stage_jaxpr_has_fewer_convs():
  model = resnet_small()
  x = image(1)
  variables = numpy_init(model, x)

  def n_convs(max_stage):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, max_stage=max_stage))(variables, x)
    # Convs sit inside the custom_vjp calls of layers.conv_kxk: count in the printout.
    return str(jaxpr).count("conv_general_dilated")

  counts = [n_convs(s) for s in (1, 2, 3, 4)]
  assert counts == sorted(counts) and len(set(counts)) == 4
  with pytest.raises(ValueError, match="max_stage"):
    model.apply(variables, x, max_stage=5)


def small_dare_model(**overrides) -> ReIDModel:
  cfg = default_model_config()
  cfg.backbone = "resnet_small"
  cfg.hidden_dim = 32
  cfg.embed_dim = 8
  cfg.update(overrides)
  return build_model(cfg)


def test_dare_head_outputs_and_fused_is_weighted_sum():
  model = small_dare_model()
  x = image(2)
  variables = numpy_init(model, x)
  out = model.apply(variables, x)
  assert sorted(out) == ["fused", "stage1", "stage2", "stage3", "stage4"]
  for v in out.values():
    assert v.shape == (2, 8) and v.dtype == jnp.float32
  w = np.asarray(variables["params"]["head"]["fused"]["weights"])
  assert w.shape == (4,)
  by_hand = sum(w[s] * np.asarray(out[f"stage{s + 1}"]) for s in range(4))
  np.testing.assert_allclose(np.asarray(out["fused"]), by_hand, rtol=1e-5, atol=1e-6)
  # Each stage embedding is that stage's MLP on the pooled stage map, by hand.
  feats = model.backbone.apply({"params": variables["params"]["backbone"],
                                "batch_stats": variables["batch_stats"]["backbone"]}, x)
  p = variables["params"]["head"]["stage2"]
  bs = variables["batch_stats"]["head"]["stage2"]["bn"]
  h = np.asarray(feats[1]).mean(axis=(1, 2)) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  h = (h - np.asarray(bs["mean"])) / np.sqrt(np.asarray(bs["var"]) + 1e-5)
  h = np.maximum(h * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"]), 0)
  emb = h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  np.testing.assert_allclose(np.asarray(out["stage2"]), emb, rtol=1e-4, atol=1e-5)


def test_dare_early_exit_has_no_fused():
  model = small_dare_model()
  x = image(2)
  variables = numpy_init(model, x)
  out = model.apply(variables, x, max_stage=2)
  assert sorted(out) == ["stage1", "stage2"]
  full = model.apply(variables, x)
  np.testing.assert_allclose(np.asarray(out["stage2"]), np.asarray(full["stage2"]), rtol=1e-6)


def test_fusion_init():
  embs = [jnp.ones((1, 3))] * 4
  torch_w = Fusion(4, "torch").init(jax.random.PRNGKey(0), embs)["params"]["weights"]
  assert torch_w.shape == (4,) and bool(jnp.all(jnp.abs(torch_w) <= 0.5))
  mean_w = Fusion(4, "mean").init(jax.random.PRNGKey(0), embs)["params"]["weights"]
  np.testing.assert_allclose(np.asarray(mean_w), 0.25)
  with pytest.raises(ValueError, match="fusion init"):
    Fusion(4, "nope").init(jax.random.PRNGKey(0), embs)


def test_trinet_head_and_logits():
  model = small_dare_model(head="trinet", num_classes=7)
  x = image(2)
  variables = numpy_init(model, x)
  out = model.apply(variables, x)
  assert sorted(out) == ["final", "logits"]
  assert out["final"].shape == (2, 8) and out["logits"].shape == (2, 7)
  assert out["final"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32
  assert "classifier" in variables["params"]
  assert variables["params"]["classifier"]["kernel"].shape == (128, 7)
  assert model.apply(variables, x, max_stage=3) == {}


def test_heads_standalone_dims():
  feats = [jnp.ones((2, 4, 2, c)) for c in (8, 16, 32, 64)]
  dare = DaReHead(hidden_dim=16, embed_dim=4)
  out, _ = jax.eval_shape(lambda: dare.init_with_output(jax.random.PRNGKey(0), feats))
  assert {k: v.shape for k, v in out.items()} == {
      **{f"stage{s}": (2, 4) for s in range(1, 5)}, "fused": (2, 4)}
  tri = TriNetHead(hidden_dim=16, embed_dim=4)
  out, _ = jax.eval_shape(lambda: tri.init_with_output(jax.random.PRNGKey(0), feats))
  assert {k: v.shape for k, v in out.items()} == {"final": (2, 4)}


@pytest.mark.parametrize(
    "backbone,head",
    [(b, "dare") for b in sorted(BACKBONES)] + [(b, "trinet") for b in ("resnet_small", "mobilenetv2")],
)
def test_build_model_configs(backbone, head):
  model = build_model({"backbone": backbone, "head": head, "num_classes": 3, "last_stride": 1})
  x = jax.ShapeDtypeStruct((2, H, W, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x), x)
  keys = ["fused", "stage1", "stage2", "stage3", "stage4"] if head == "dare" else ["final"]
  assert sorted(out) == sorted(keys + ["logits"])
  assert all(v.shape == (2, 128) for k, v in out.items() if k != "logits")
  assert out["logits"].shape == (2, 3)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "head", "classifier"}
  if head == "dare":  # the official DenseNet DaRe normalises stages 1-3 before pooling
    prenorm = [f"stage{s}_prenorm" in variables["params"]["head"] for s in range(1, 5)]
    assert prenorm == ([True, True, True, False] if backbone == "densenet201" else [False] * 4)


def test_build_model_rejects_bad_config():
  for bad in ({"backbone": "vgg"}, {"head": "x"}, {"dtype": "float16"}, {"last_stride": 3}):
    with pytest.raises(ValueError):
      build_model(bad)
  with pytest.raises(ValueError, match="num_stages must be in 1..4"):
    build_model({"head": "trinet", "num_stages": 5})
  with pytest.raises(ValueError, match="num_stages=2 .* set model.head='trinet'"):
    build_model({"head": "dare", "num_stages": 2})


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_truncated_trinet_is_backbone_cut_plus_mlp(num_stages):
  """`num_stages=s`: the embedding is the TriNet MLP on the GAP of stage s (numpy
  re-derivation from the model's own backbone map and head variables)."""
  model = build_model({"backbone": "resnet_small", "head": "trinet", "num_stages": num_stages,
                       "hidden_dim": 16, "embed_dim": 8, "num_classes": 5})
  x = image(3)
  variables = numpy_init(model, x)
  assert sorted(variables["params"]["backbone"]) == sorted(
      k for k in numpy_init(resnet_small(), x)["params"]
      if not k.startswith(tuple(f"layer{i}" for i in range(num_stages + 1, 5))))
  out = model.apply(variables, x)
  assert sorted(out) == ["final", "logits"]
  # Every larger max_stage runs the same (whole) cut network; smaller ones stop early.
  for s in range(num_stages, 5):
    np.testing.assert_array_equal(model.apply(variables, x, max_stage=s)["final"], out["final"])
  if num_stages > 1:
    assert model.apply(variables, x, max_stage=num_stages - 1) == {}
  bb = {c: variables[c]["backbone"] for c in variables}
  fmap = np.asarray(resnet_small().apply(bb, x, max_stage=num_stages)[-1])
  h = variables["params"]["head"]["final"]
  st = variables["batch_stats"]["head"]["final"]["bn"]
  pooled = fmap.mean(axis=(1, 2))
  z = pooled @ np.asarray(h["fc1"]["kernel"]) + np.asarray(h["fc1"]["bias"])
  z = (z - np.asarray(st["mean"])) / np.sqrt(np.asarray(st["var"]) + 1e-5)
  z = np.maximum(z * np.asarray(h["bn"]["scale"]) + np.asarray(h["bn"]["bias"]), 0)
  emb = z @ np.asarray(h["fc2"]["kernel"]) + np.asarray(h["fc2"]["bias"])
  np.testing.assert_allclose(np.asarray(out["final"]), emb, rtol=1e-4, atol=1e-5)
  logits = pooled @ np.asarray(variables["params"]["classifier"]["kernel"]) + np.asarray(
      variables["params"]["classifier"]["bias"])
  np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_fp32_params_and_outputs():
  model = small_dare_model(dtype="bfloat16")
  x = image(2)
  variables = numpy_init(model, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(abstract_init(model, x)))
  feats = model.backbone.apply({"params": variables["params"]["backbone"],
                                "batch_stats": variables["batch_stats"]["backbone"]}, x)
  assert all(f.dtype == jnp.bfloat16 for f in feats)
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(updates))
  ref = small_dare_model().apply(variables, x)
  out_eval = model.apply(variables, x)
  for k in ref:  # bf16 compute tracks fp32 compute loosely
    rel = np.abs(np.asarray(out_eval[k]) - np.asarray(ref[k])).max() / np.abs(np.asarray(ref[k])).max()
    assert rel < 0.1, k


def test_train_mode_updates_batch_stats():
  model = small_dare_model()
  x = image(2)
  variables = numpy_init(model, x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old = variables["batch_stats"]["backbone"]["bn1"]["mean"]
  new = updates["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(np.asarray(old), np.asarray(new))


def test_bn_axis_name_averages_statistics_across_devices():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py forces 8 CPU devices)")
  kwargs = dict(stage_sizes=(1, 1, 1, 1), width=4)
  single = resnet_small(**kwargs)
  multi = resnet_small(bn_axis_name="batch", **kwargs)
  x = image(2)
  variables = numpy_init(single, x)
  ref, ref_upd = single.apply(variables, x, train=True, mutable=["batch_stats"])
  rep = jax.tree_util.tree_map(lambda v: jnp.stack([v, v]), variables)
  out, upd = jax.pmap(
      lambda v, x: multi.apply(v, x, train=True, mutable=["batch_stats"]),
      axis_name="batch", devices=jax.devices()[:2],
  )(rep, x.reshape(2, 1, H, W, 3))
  np.testing.assert_allclose(np.asarray(out[3]).reshape(ref[3].shape), np.asarray(ref[3]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(upd["batch_stats"]["layer4_0"]["bn2"]["var"][0]),
      np.asarray(ref_upd["batch_stats"]["layer4_0"]["bn2"]["var"]), rtol=1e-4)


@pytest.mark.parametrize("stride,hw", [(1, (7, 5)), (2, (9, 6)), (2, (8, 4))])
def test_depthwise_shift_equals_grouped_conv_and_numpy(stride, hw):
  from reid_jax.models.layers import DepthwiseConv3x3
  x = jax.random.normal(jax.random.key(1), (2, *hw, 5))
  conv, shift = DepthwiseConv3x3(stride, "conv"), DepthwiseConv3x3(stride, "shift")
  v = conv.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, shift.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  # Independent reference: padded 3x3 window sums per channel, written out in numpy.
  xn, k = np.asarray(x, np.float64), np.asarray(v["params"]["kernel"], np.float64)[:, :, 0]
  xp = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1
  ref = np.zeros((2, ho, wo, 5))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
      ref[:, i, j] = (win * k).sum(axis=(1, 2))
  for m in (conv, shift):
    np.testing.assert_allclose(m.apply(v, x), ref, atol=1e-5)
  # Gradients w.r.t. input and kernel agree too (the train step differentiates both).
  loss = lambda m: jax.grad(lambda v, x: (m.apply(v, x) ** 2).sum(), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(loss(conv)), jax.tree.leaves(loss(shift))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,hw", [(1, (7, 5)), (2, (9, 6))])
def test_depthwise_kernel_grad_in_batch_chunks(stride, hw, monkeypatch):
  """The shift backward sums the kernel gradient over chunks of the batch (a scan)
  once a batch outgrows the cache; force 3 chunks of 2 and compare with XLA's
  grouped-conv gradients."""
  from reid_jax.models import layers
  monkeypatch.setattr(layers, "_batch_chunk", lambda n, *a: 2)
  x = jax.random.normal(jax.random.key(1), (6, *hw, 5))
  conv = layers.DepthwiseConv3x3(stride, "conv")
  shift = layers.DepthwiseConv3x3(stride, "shift")
  v = conv.init(jax.random.key(0), x)
  ct = jax.random.normal(jax.random.key(2), conv.apply(v, x).shape)
  grads = lambda m: jax.grad(lambda v, x: (m.apply(v, x) * ct).sum(), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(grads(conv)), jax.tree.leaves(grads(shift))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_chunk_is_the_largest_divisor_that_fits():
  from reid_jax.models.layers import _batch_chunk
  assert _batch_chunk(72, 32 * 16 * 96 * 4) == 2  # 393 KB fits 512 KiB, 3 images do not
  assert _batch_chunk(72, 1 << 20) == 1
  assert _batch_chunk(8, 1) == 8
  assert _batch_chunk(7, 100_000) == 1  # prime batch: 7 * 100 KB is too big


@pytest.mark.parametrize("kernel,stride,padding,hw,chunk", [
    (3, 1, 1, (7, 5), None), (3, 2, 1, (9, 6), 1), (7, 2, 3, (11, 6), 2), (3, 1, 0, (6, 5), 3)])
def test_conv_kxk_equals_nn_conv(kernel, stride, padding, hw, chunk, monkeypatch):
  """`layers.conv(k>1)` is ConvKxK (kernel gradient by im2col + a dot per batch chunk):
  same parameter tree and init as nn.Conv, same outputs and gradients, the batch
  split into chunks of 1-3 images or not at all."""
  import flax.linen as nn
  from reid_jax.models import layers
  if chunk is not None:
    monkeypatch.setattr(layers, "_batch_chunk", lambda n, *a: chunk)
  m = layers.conv(4, kernel, stride, padding)
  assert isinstance(m, layers.ConvKxK)
  ref = nn.Conv(4, (kernel, kernel), strides=(stride, stride),
                padding=((padding, padding), (padding, padding)), use_bias=False,
                kernel_init=layers.torch_conv_init)
  x = jax.random.normal(jax.random.key(1), (6, *hw, 3))
  v = ref.init(jax.random.key(0), x)
  np.testing.assert_array_equal(m.init(jax.random.key(0), x)["params"]["kernel"],
                                v["params"]["kernel"])
  y = ref.apply(v, x)
  np.testing.assert_allclose(m.apply(v, x), y, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(2), y.shape)
  grads = lambda mod: jax.grad(lambda v, x: (mod.apply(v, x) * ct).sum(), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(grads(m)), jax.tree.leaves(grads(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # The kernel gradient against a numpy loop over taps (independent of XLA's conv).
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  ho, wo = y.shape[1], y.shape[2]
  want = np.zeros((kernel, kernel, 3, 4))
  for dy in range(kernel):
    for dx in range(kernel):
      tap = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
      want[dy, dx] = np.einsum("nhwc,nhwd->cd", tap, np.asarray(ct, np.float64))
  np.testing.assert_allclose(grads(m)[0]["params"]["kernel"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,hw", [(1, (7, 5)), (2, (9, 6)), (2, (8, 4))])
def test_conv1x1_equals_nn_conv(stride, hw):
  """`layers.conv(k=1)` is Conv1x1 (dot with a hand-written backward): same parameter
  tree and init as nn.Conv, same outputs and gradients, strided too."""
  import flax.linen as nn
  from reid_jax.models import layers
  m = layers.conv(7, 1, stride)
  assert isinstance(m, layers.Conv1x1)
  ref = nn.Conv(7, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)),
                use_bias=False, kernel_init=layers.torch_conv_init)
  x = jax.random.normal(jax.random.key(1), (3, *hw, 5))
  v = ref.init(jax.random.key(0), x)
  np.testing.assert_array_equal(m.init(jax.random.key(0), x)["params"]["kernel"],
                                v["params"]["kernel"])
  np.testing.assert_allclose(m.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-6)
  # numpy reference for the forward: subsample, then a matrix product over channels.
  want = np.asarray(x)[:, ::stride, ::stride] @ np.asarray(v["params"]["kernel"])[0, 0]
  np.testing.assert_allclose(m.apply(v, x), want, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(2), want.shape)
  grads = lambda mod: jax.grad(lambda v, x: (mod.apply(v, x) * ct).sum(), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(grads(m)), jax.tree.leaves(grads(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  y16 = layers.conv(7, 1, stride, dtype=jnp.bfloat16).apply(v, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=0.05, atol=0.05)


def test_mobilenetv2_depthwise_impls_agree():
  from reid_jax.models.mobilenetv2 import mobilenetv2
  x = jax.random.normal(jax.random.key(1), (2, 64, 32, 3))
  a, b = mobilenetv2(last_stride=1, depthwise="conv"), mobilenetv2(last_stride=1, depthwise="shift")
  v = a.init(jax.random.key(0), x)
  out_a, _ = a.apply(v, x, train=True, mutable=["batch_stats"])
  out_b, _ = b.apply(v, x, train=True, mutable=["batch_stats"])
  for fa, fb in zip(out_a, out_b):
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4 * float(jnp.abs(fa).max()))


@pytest.mark.parametrize("hw", [(9, 6), (8, 4), (1, 1)])
def test_max_pool_3x3_s2_values_and_gradient_against_numpy_loops(hw):
  """Forward = max over each padded 3x3 window (stride 2); backward = the output's
  gradient added at the first (row-major) position holding the window's max, ties
  included (ReLU zeros and equal positive values), as PyTorch's MaxPool2d."""
  from reid_jax.models.layers import max_pool_3x3_s2
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(size=(2, *hw, 3)), 0).astype(np.float32)
  x[0, 0, :2, 0] = 1.5  # a tie between two positive values in one window
  ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
  g = rng.normal(size=(2, ho, wo, 3)).astype(np.float32)
  want_y, want_dx = np.zeros_like(g), np.zeros_like(x)
  for n in range(2):
    for i in range(ho):
      for j in range(wo):
        for c in range(3):
          best = None
          for dy in range(3):
            for dx in range(3):
              r, q = 2 * i + dy - 1, 2 * j + dx - 1
              if 0 <= r < hw[0] and 0 <= q < hw[1] and (best is None or x[n, r, q, c] > x[n, best[0], best[1], c]):
                best = (r, q)
          want_y[n, i, j, c] = x[n, best[0], best[1], c]
          want_dx[n, best[0], best[1], c] += g[n, i, j, c]
  np.testing.assert_array_equal(max_pool_3x3_s2(jnp.asarray(x)), want_y)
  dx = jax.grad(lambda v: (max_pool_3x3_s2(v) * g).sum())(jnp.asarray(x))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
  y16 = max_pool_3x3_s2(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16


def test_accelerator_paths_compute_the_same(monkeypatch):
  """Off CPU, ConvKxK and the max pool fall back to XLA's conv / nn.max_pool and their
  autodiff; pretend to be on a GPU and compare values and gradients with the CPU path."""
  from reid_jax.models import layers
  x = jax.random.normal(jax.random.key(1), (4, 9, 6, 3))
  m = layers.conv(4, 3, 2, 1)
  v = m.init(jax.random.key(0), x)
  f = lambda v, x: (layers.max_pool_3x3_s2(jax.nn.relu(m.apply(v, x))) ** 2).sum()
  want = jax.grad(f, argnums=(0, 1))(v, x)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = jax.grad(f, argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
