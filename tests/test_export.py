"""ONNX export of a trained run (issue 15): the onnxruntime outputs of the exported
graph (normalisation, flip TTA, every exit inside) against `Run.embed` of the
evaluation's own normalisation, on random and synthetic-dataset images, dynamic and
fixed batch; DaRe's per-exit graphs truncated after their stage; the CLI; and the
`layers.plain_ops()` flag the export traces with, against numpy references."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import methods
from reid_jax.core import checkpoint, experiment
from reid_jax.data import augment as aug
from reid_jax.data import synthetic, synthetic_render
from reid_jax.inference import export, run as run_lib
from reid_jax.methods.classification import train as cls_train
from reid_jax.methods.dare import train as dare_train
from reid_jax.models import layers

from method_cases import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [m for m in ("jax2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(MISSING), reason=f"optional export packages missing "
                                f"({', '.join(MISSING)}); install with: {export.INSTALL}")
TOL = 1e-4


# ------------------------------------------------------------------ plain_ops (no onnx)


def _np_conv(x, k, stride, pad, groups=1):
  """Brute-force NHWC conv (HWIO kernel, symmetric zero padding, groups)."""
  n, h, w, c = x.shape
  kh, kw, cin_g, cout = k.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
  out = np.zeros((n, ho, wo, cout), np.float64)
  cout_g = cout // groups
  for g in range(groups):
    xs = xp[..., g * cin_g:(g + 1) * cin_g]
    for dy in range(kh):
      for dx in range(kw):
        patch = xs[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
        out[..., g * cout_g:(g + 1) * cout_g] += patch @ k[dy, dx][:, g * cout_g:(g + 1) * cout_g]
  return out


def _np_max_pool(x):
  """PyTorch MaxPool2d(3, 2, padding=1) by brute force."""
  n, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((1, 2))
                             for j in range(wo)], 1) for i in range(ho)], 1)


LAYERS = [  # (module, input shape, reference(x, kernel))
    (layers.ConvKxK(5, 3, 2, 1), (2, 9, 7, 3), lambda x, k: _np_conv(x, k, 2, 1)),
    (layers.ConvKxK(4, 3, 1, 1), (2, 6, 5, 3), lambda x, k: _np_conv(x, k, 1, 1)),
    (layers.Conv1x1(6, 2), (2, 7, 6, 4), lambda x, k: _np_conv(x, k, 2, 0)),
    (layers.DepthwiseConv3x3(2), (2, 9, 8, 4), lambda x, k: _np_conv(x, k, 2, 1, groups=4)),
    (layers.DepthwiseConv3x3(1), (2, 5, 6, 4), lambda x, k: _np_conv(x, k, 1, 1, groups=4)),
]


def _jaxpr(fn, *args) -> str:
  """The printed (nested) jaxpr of fn(*args)."""
  return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_plain_ops_equal_the_cpu_layers_and_numpy(index):
  """Each CPU custom-VJP layer and its plain-op form inside `plain_ops()` give the
  brute-force numpy conv; the plain trace holds no custom_vjp call."""
  module, shape, ref = LAYERS[index]
  x = jnp.asarray(np.random.default_rng(index).normal(size=shape), jnp.float32)
  variables = jax.jit(module.init)(jax.random.key(1), x)
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  want = ref(np.asarray(x, np.float64), kernel)
  default = np.asarray(jax.jit(module.apply)(variables, x))
  assert "custom_vjp_call" in _jaxpr(module.apply, variables, x)
  with layers.plain_ops():
    with layers.plain_ops():  # nests
      pass
    plain = np.asarray(jax.jit(module.apply)(variables, x))
    prims = _jaxpr(module.apply, variables, x)
  plain_op = "dot_general" if isinstance(module, layers.Conv1x1) else "conv_general_dilated"
  assert "custom_vjp_call" not in prims and plain_op in prims
  np.testing.assert_allclose(default, want, atol=1e-5)
  np.testing.assert_allclose(plain, want, atol=1e-5)
  assert not getattr(layers._PLAIN, "depth", 0)  # pylint: disable=protected-access


def test_plain_ops_max_pool(monkeypatch):
  """max_pool_3x3_s2: CPU taps, plain -inf pad + VALID pool, and the accelerator path
  (backend patched) all equal a brute-force PyTorch-style pool, odd and even sizes."""
  for shape in ((2, 9, 7, 3), (1, 8, 6, 2)):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    want = _np_max_pool(np.asarray(x))
    pool = lambda: jax.jit(lambda a: layers.max_pool_3x3_s2(a))  # fresh: traced anew
    np.testing.assert_array_equal(np.asarray(pool()(x)), want)
    with layers.plain_ops():
      np.testing.assert_array_equal(np.asarray(pool()(x)), want)
      prims = _jaxpr(lambda a: layers.max_pool_3x3_s2(a), x)
      assert "custom_vjp_call" not in prims and "reduce_window_max" in prims
    with monkeypatch.context() as m:
      m.setattr(jax, "default_backend", lambda: "gpu")
      np.testing.assert_array_equal(np.asarray(pool()(x)), want)


def test_export_settings_are_one_line_errors(monkeypatch):
  assert export.parse_batch("dynamic") is None and export.parse_batch("7") == 7
  for bad in ("0", "-2", "big"):
    with pytest.raises(ValueError, match=f"--batch={bad}: use dynamic or a positive"):
      export.parse_batch(bad)
  with pytest.raises(ValueError, match="--input=int8: use one of uint8, float"):
    export.normalizer("int8")
  with pytest.raises(ValueError, match="no exit 'stage9'; its exits are stage1, fused"):
    export.select_exits(["stage1", "fused"], ["stage9"])
  assert export.order_exits(["fused", "stage10", "stage2", "stage1"]) == [
      "stage1", "stage2", "stage10", "fused"]
  assert export.split_path("/a/m.onnx", "stage2") == "/a/m.stage2.onnx"
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails
  with pytest.raises(export.MissingDependency, match="needs jax2onnx .* pip install"):
    export.require()


def test_normalizer_equals_augment_normalize():
  x = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
  want = aug.normalize(x)
  np.testing.assert_allclose(np.asarray(export.normalizer("uint8")(jnp.asarray(x))), want,
                             atol=1e-6)
  f = x.astype(np.float32) / 255
  np.testing.assert_allclose(np.asarray(export.normalizer("float")(jnp.asarray(f))),
                             aug.normalize(f), atol=1e-6)


# --------------------------------------------------------------------- exported runs


def _random_variables(shapes, rng: np.random.Generator):
  """Values for every leaf of the model's variable shapes: He-scaled kernels, BatchNorm
  scales, biases and running statistics away from their initial 1/0 (variances
  positive), so the export is checked with non-trivial weights and statistics."""
  def value(path, leaf):
    name, shape = jax.tree_util.keystr(path).split("'")[-2], leaf.shape
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 0.1, shape)  # bias, mean, DaRe fusion weights
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(value(p, x), np.float32), shapes)


def _write_run(method: str, root, step: int = 2) -> str:
  """A workdir as training leaves it (config.json; an orbax checkpoint of params and
  batch_stats in the family's checkpoint folder) for a tiny 32x16 config, with random
  variables of the method's own model. (Training 2 steps instead costs ~25 s of CPU
  per run; export reads nothing else of a run.)"""
  config = tiny_config(method, str(root / "no_data"))
  x = jax.ShapeDtypeStruct((1, 32, 16, 3), jnp.float32)
  key = jax.random.key(0)
  if method == "dare":
    init = functools.partial(dare_train.eval_model(config).init, train=False)
    shapes = jax.eval_shape(init, key, x)
  else:
    init = functools.partial(cls_train.build_model(config, 6).init, train=False)
    shapes = jax.eval_shape(init, {"params": key, "dropout": key}, x)
  variables = _random_variables(dict(shapes), np.random.default_rng(1))
  wd = str(root / method)
  experiment.save_workdir_config(config, wd)
  ckpt = checkpoint.Checkpointer(methods.get(method).checkpoint_dir(config, wd))
  assert ckpt.save(step, variables, None)
  ckpt.close()
  return wd


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Tiny DaRe and IDE runs (32x16, resnet_small width 8)."""
  root = tmp_path_factory.mktemp("runs")
  return {m: _write_run(m, root) for m in ("dare", "ide")}


@pytest.fixture(scope="module")
def images():
  """(random uint8 [5, 32, 16, 3], 6 synthetic_reid/tiny query images (rendered as its
  tfds builder renders them) resized to 32x16 as evaluation does)."""
  rng = np.random.default_rng(0)
  cfg = next(c for c in synthetic.SyntheticReid.BUILDER_CONFIGS if c.name == "tiny")
  real = np.stack([aug.resize(synthetic_render.render(cfg, spec), 32, 16)
                   for spec in synthetic.split_specs(cfg, "query")[:6]])
  return rng.integers(0, 256, (5, 32, 16, 3), dtype=np.uint8), real.astype(np.uint8)


def _check(path: str, run: run_lib.Run, batches, exits, input_dtype="uint8"):
  """Every exit of the onnxruntime embedder == Run.embed(normalize(x)) within TOL, for
  each batch (the reference embedded once for all of them: one compile)."""
  embed = export.onnx_embedder(path)
  ref = run.embed(aug.normalize(np.concatenate(batches)))
  start = 0
  for x in batches:
    feed = x if input_dtype == "uint8" else x.astype(np.float32) / 255
    out = embed(feed)
    assert list(out) == list(exits)
    for k in exits:
      want = ref[k][start:start + len(x)]
      assert out[k].shape == want.shape and out[k].dtype == np.float32
      assert np.abs(out[k] - want).max() <= TOL, (path, k, np.abs(out[k] - want).max())
    start += len(x)


def _conv_count(path: str) -> int:
  import onnx  # pylint: disable=import-outside-toplevel
  return sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)


@needs_onnx
def test_dare_graph_with_flip_tta_equals_run_embed(runs, images, tmp_path):
  """One graph, every exit, flip TTA inside, dynamic batch (1 and 5 both run);
  the metadata a server needs."""
  run = run_lib.load_run(runs["dare"], tta="flip")
  path = str(tmp_path / "dare.onnx")
  (written,) = export.export_onnx(run, path)
  exits = ("stage1", "stage2", "stage3", "stage4", "fused")
  assert written.exits == exits and written.path == path
  rand, real = images
  _check(path, run, [rand[:1], rand, real], exits)
  meta = export.read_metadata(path)
  assert meta["input"]["height"] == 32 and meta["input"]["width"] == 16
  assert meta["input"]["dtype"] == "uint8" and meta["input"]["batch"] == "dynamic"
  assert meta["normalization"]["mean"] == list(aug.IMAGENET_MEAN)
  assert meta["normalization"]["std"] == list(aug.IMAGENET_STD)
  assert [e["name"] for e in meta["exits"]] == list(exits)
  assert meta["exits"][0]["dim"] == 8 and meta["tta"] == "flip"
  assert meta["run"] == run.identity()
  # flip really is inside: without it the features differ
  no_tta = run_lib.load_run(runs["dare"], tta="none").embed(aug.normalize(real))
  got = export.onnx_embedder(path)(real)
  assert np.abs(got["fused"] - no_tta["fused"]).max() > 100 * TOL


@needs_onnx
def test_ide_graph_equals_run_embed_and_refusals(runs, images, tmp_path):
  """IDE (the run's own TTA: none); five_crop and an unknown exit are refused in one
  line."""
  run = run_lib.load_run(runs["ide"])
  path = str(tmp_path / "ide.onnx")
  export.export_onnx(run, path)
  rand, real = images
  _check(path, run, [rand[:1], rand, real], ("ide",))
  with pytest.raises(ValueError, match="five_crop TTA .* pass --tta=none"):
    export.export_onnx(run_lib.load_run(runs["ide"], tta="five_crop"), path)
  with pytest.raises(ValueError, match="no exit 'fused'; its exits are ide"):
    export.export_onnx(run, path, exits=["fused"])


@needs_onnx
def test_cli_split_exits_are_truncated_graphs(runs, images, tmp_path):
  """The CLI with --split_exits: one graph per chosen exit, stageK stopping after stage
  K (fewer convs the earlier the exit), float input, fixed batch 5 (another batch is
  refused by onnxruntime)."""
  out = str(tmp_path / "m.onnx")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "reid_jax.export", f"--workdir={runs['dare']}",
                         "--format=onnx", f"--output={out}", "--exit=stage1,fused",
                         "--split_exits", "--tta=none", "--batch=5", "--input=float"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "input 32x16 RGB float" in proc.stdout, proc.stdout
  run = run_lib.load_run(runs["dare"], tta="none")
  rand, real = images
  convs = []
  for name in ("stage1", "fused"):
    path = export.split_path(out, name)
    assert f"wrote {path}" in proc.stdout and f"-> {name} [B,8]" in proc.stdout
    _check(path, run, [rand, real[:5]], (name,), "float")
    assert export.read_metadata(path)["truncated_after"] == (
        "none" if name == "fused" else name)
    assert export.read_metadata(path)["input"]["batch"] == 5
    convs.append(_conv_count(path))
  assert convs[0] < convs[1], convs  # stage1 stops after the first stage
  with pytest.raises(Exception, match="images"):  # wrong batch dimension
    export.onnx_embedder(export.split_path(out, "stage1"))(rand[:2].astype(np.float32))
