"""ImageNet weight import: torchvision ResNet/DenseNet and GluonCV MobileNetV2.

The torch references below are written here in torchvision's exact module naming (there
is no torchvision dependency); their random weights, with randomised BatchNorm statistics,
go through `.pth` -> `python -m reid_jax.pretrained convert` -> `load_pretrained`, and the
flax stage outputs must match torch's to 1e-4 relative error. DenseNet-201's full-depth
forward takes about a minute on CPU: by default it is checked through stage 2 (all keys
still converted and loaded) and a shallower DenseNet checks all four stages; set
REID_JAX_SLOW_TESTS=1 to compare all four DenseNet-201 stages.
"""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import pretrained, torch_state
from reid_jax.models import BACKBONES, build_model
from reid_jax.models.densenet import DenseNet
from reid_jax.models.mobilenetv2 import mobilenetv2

REPO = Path(__file__).resolve().parents[1]
GLUON_NPZ = REPO.parent / "shared" / "pretrained" / "mobilenetv2_1.0_imagenet_gluon.npz"
H, W = 64, 32
SLOW = os.environ.get("REID_JAX_SLOW_TESTS") == "1"


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def abstract_variables(module):
  """Variable shapes of `module` (a standard backbone's come from the converter's cache)."""
  for arch in pretrained.ARCHS:  # params do not depend on last_stride
    if hasattr(module, "last_stride") and module.clone(last_stride=2) == BACKBONES[arch]():
      return pretrained.abstract_backbone_variables(arch)
  x = jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)


# ----------------------------------------------------------------------------- torch refs


def torch_models():
  """torchvision-named ResNet and DenseNet (built lazily so torch stays optional)."""
  torch = pytest.importorskip("torch", reason="torch not installed: pip install torch to run the import tests")
  tnn = torch.nn
  F = torch.nn.functional

  class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + (x if self.downsample is None else self.downsample(x)))

  class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.downsample = downsample

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return F.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(tnn.Module):
    def __init__(self, block, layers, last_stride=2):
      super().__init__()
      self.inplanes = 64
      self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      self.layer1 = self._make_layer(block, 64, layers[0])
      self.layer2 = self._make_layer(block, 128, layers[1], 2)
      self.layer3 = self._make_layer(block, 256, layers[2], 2)
      self.layer4 = self._make_layer(block, 512, layers[3], last_stride)
      self.fc = tnn.Linear(512 * block.expansion, 1000)

    def _make_layer(self, block, planes, blocks, stride=1):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = tnn.Sequential(
            tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            tnn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return tnn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
      outs = []
      for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
        x = layer(x)
        outs.append(x)
      return outs

  class DenseLayer(tnn.Module):
    def __init__(self, cin, growth, bn_size):
      super().__init__()
      self.norm1 = tnn.BatchNorm2d(cin)
      self.relu1 = tnn.ReLU()
      self.conv1 = tnn.Conv2d(cin, bn_size * growth, 1, bias=False)
      self.norm2 = tnn.BatchNorm2d(bn_size * growth)
      self.relu2 = tnn.ReLU()
      self.conv2 = tnn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
      y = self.conv1(self.relu1(self.norm1(x)))
      return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)

  class DenseBlock(tnn.ModuleDict):
    def __init__(self, n, cin, growth, bn_size):
      super().__init__()
      for i in range(n):
        self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
      for layer in self.values():
        x = layer(x)
      return x

  class Transition(tnn.Sequential):
    def __init__(self, cin, cout):
      super().__init__()
      self.add_module("norm", tnn.BatchNorm2d(cin))
      self.add_module("relu", tnn.ReLU())
      self.add_module("conv", tnn.Conv2d(cin, cout, 1, bias=False))
      self.add_module("pool", tnn.AvgPool2d(2, 2))

  class DenseNetT(tnn.Module):
    def __init__(self, block_config, growth=32, bn_size=4, init=64):
      super().__init__()
      self.features = tnn.Sequential(OrderedDict([
          ("conv0", tnn.Conv2d(3, init, 7, 2, 3, bias=False)),
          ("norm0", tnn.BatchNorm2d(init)),
          ("relu0", tnn.ReLU()),
          ("pool0", tnn.MaxPool2d(3, 2, 1)),
      ]))
      c = init
      for i, n in enumerate(block_config):
        self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, growth, bn_size))
        c += n * growth
        if i != len(block_config) - 1:
          self.features.add_module(f"transition{i + 1}", Transition(c, c // 2))
          c //= 2
      self.features.add_module("norm5", tnn.BatchNorm2d(c))
      self.classifier = tnn.Linear(c, 1000)

    def forward(self, x, max_stage=4):
      outs = []
      for name, mod in self.features.named_children():
        x = mod(x)
        if name == "norm5":
          outs.append(F.relu(x))
        elif name.startswith("denseblock") and name != "denseblock4":
          outs.append(x)
          if len(outs) == max_stage:
            break
      return outs

  return torch, BasicBlock, Bottleneck, ResNet, DenseNetT


def randomise(torch, model, seed: int = 0):
  """Random conv weights and BN affine/running stats (so eval-mode BN matters)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
      elif isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
  return model.eval()


def torch_stages(torch, model, x_nhwc, **kwargs):
  with torch.no_grad():
    outs = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))), **kwargs)
  return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


def convert_cli(tmp_path, arch, state_dict, torch, name="weights.pth"):
  """torch.save -> `python -m reid_jax.pretrained convert` (in process) -> npz path."""
  src, dst = tmp_path / name, tmp_path / f"{arch}.npz"
  torch.save(state_dict, src)
  assert pretrained.main(["convert", f"--arch={arch}", f"--input={src}", f"--output={dst}"]) == 0
  return dst


RESNET_LAYERS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


@pytest.mark.parametrize("arch", sorted(RESNET_LAYERS))
def test_resnet_import_matches_torch(arch, tmp_path):
  torch, BasicBlock, Bottleneck, ResNet, _ = torch_models()
  torch.set_num_threads(1)
  torch.manual_seed(0)
  block, layers = RESNET_LAYERS[arch]
  last_stride = 1 if arch == "resnet50" else 2  # also covers the re-ID last-stride trick
  ref = randomise(torch, ResNet(BasicBlock if block == "basic" else Bottleneck, layers, last_stride))
  npz = convert_cli(tmp_path, arch, ref.state_dict(), torch)
  model = BACKBONES[arch](last_stride=last_stride)
  variables = pretrained.load_pretrained(abstract_variables(model), str(npz), arch)
  x = np.random.default_rng(0).normal(size=(1, H, W, 3)).astype(np.float32)
  ours = model.apply(variables, jnp.asarray(x))
  theirs = torch_stages(torch, ref, x)
  for s, (a, b) in enumerate(zip(ours, theirs), start=1):
    assert a.shape == b.shape, (s, a.shape, b.shape)
    assert rel_err(a, b) < 1e-4, (arch, s, rel_err(a, b))


def old_densenet_keys(state_dict):
  """Renames `denselayerN.norm1` -> `denselayerN.norm.1` as in old torchvision checkpoints."""
  out = OrderedDict()
  for k, v in state_dict.items():
    for mod in ("norm", "relu", "conv"):
      for i in ("1", "2"):
        k = k.replace(f".{mod}{i}.", f".{mod}.{i}.")
    out[k] = v
  return out


def test_densenet201_import_matches_torch(tmp_path):
  torch, *_, DenseNetT = torch_models()
  torch.set_num_threads(1)
  torch.manual_seed(0)
  ref = randomise(torch, DenseNetT((6, 12, 48, 32)))
  state = old_densenet_keys(ref.state_dict())
  assert "features.denseblock1.denselayer1.norm.1.weight" in state
  npz = convert_cli(tmp_path, "densenet201", state, torch)
  model = BACKBONES["densenet201"]()
  variables = pretrained.load_pretrained(abstract_variables(model), str(npz), "densenet201")
  assert variables["params"]["denseblock3"]["denselayer48"]["conv2"]["kernel"].shape == (3, 3, 128, 32)
  x = np.random.default_rng(1).normal(size=(1, H, W, 3)).astype(np.float32)
  stages = 4 if SLOW else 2
  ours = model.apply(variables, jnp.asarray(x), max_stage=stages)
  theirs = torch_stages(torch, ref, x, max_stage=stages)
  assert len(ours) == len(theirs) == stages
  for s, (a, b) in enumerate(zip(ours, theirs), start=1):
    assert a.shape == b.shape and rel_err(a, b) < 1e-4, (s, rel_err(a, b))


def test_shallow_densenet_all_stages_match_torch(tmp_path):
  """Same code path as DenseNet-201 (transitions, norm5) at a depth that runs fast."""
  torch, *_, DenseNetT = torch_models()
  torch.set_num_threads(1)
  torch.manual_seed(0)
  config = (2, 2, 3, 2)
  ref = randomise(torch, DenseNetT(config), seed=3)
  src = tmp_path / "shallow.pth"
  torch.save(old_densenet_keys(ref.state_dict()), src)
  model = DenseNet(block_config=config)
  variables = pretrained.load_pretrained(abstract_variables(model), str(src), "densenet201")
  x = np.random.default_rng(2).normal(size=(2, H, W, 3)).astype(np.float32)
  ours = model.apply(variables, jnp.asarray(x))
  theirs = torch_stages(torch, ref, x)
  for s, (a, b) in enumerate(zip(ours, theirs), start=1):
    assert a.shape == b.shape and rel_err(a, b) < 1e-4, (s, rel_err(a, b))


def test_torch_name_npz_and_reid_model_loading(tmp_path):
  torch, BasicBlock, _, ResNet, _ = torch_models()
  ref = randomise(torch, ResNet(BasicBlock, (2, 2, 2, 2)))
  arrays = {k: v.numpy() for k, v in ref.state_dict().items()}
  np.savez(tmp_path / "torchnames.npz", **arrays)
  model = build_model({"backbone": "resnet18", "hidden_dim": 16, "embed_dim": 4})
  variables = abstract_variables(model)
  loaded = pretrained.load_pretrained(variables, str(tmp_path / "torchnames.npz"), "resnet18")
  np.testing.assert_array_equal(
      np.asarray(loaded["params"]["backbone"]["layer2_0"]["downsample_0"]["kernel"]),
      arrays["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(loaded["batch_stats"]["backbone"]["layer2_0"]["downsample_1"]["mean"]),
      arrays["layer2.0.downsample.1.running_mean"])
  assert loaded["params"]["head"] is not None
  assert isinstance(loaded["params"]["head"]["stage1"]["fc1"]["kernel"], jax.ShapeDtypeStruct)


def test_truncated_model_takes_the_first_stages_of_a_whole_backbone(tmp_path):
  """`model.num_stages < 4`: the ImageNet file is a whole backbone; the layers the cut
  network has are loaded exactly, the deeper ones left unused; a file that is not a
  whole backbone of the arch is still refused."""
  rng = np.random.default_rng(0)
  shapes = pretrained.expected_shapes("resnet18")
  arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  path = tmp_path / "r18.npz"
  np.savez(path, __arch__=np.array("resnet18"), **arrays)
  model = build_model({"backbone": "resnet18", "head": "trinet", "num_stages": 2,
                       "hidden_dim": 16, "embed_dim": 4})
  variables = abstract_variables(model)
  assert "layer3_0" not in variables["params"]["backbone"]
  with pytest.raises(pretrained.PretrainedError, match="layer3_0.* is not a variable"):
    pretrained.load_pretrained(variables, str(path), "resnet18")
  loaded = pretrained.load_pretrained(variables, str(path), "resnet18", truncated=True)
  flat = pretrained._flatten({c: loaded[c]["backbone"] for c in ("params", "batch_stats")})
  assert sorted(flat) == sorted(k for k in arrays if not k.split("/")[1].startswith(
      ("layer3", "layer4")))
  for key, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), arrays[key])
  del arrays["params/layer4_1/conv2/kernel"]  # not a whole resnet18 file any more
  np.savez(path, __arch__=np.array("resnet18"), **arrays)
  with pytest.raises(pretrained.PretrainedError, match="missing params/layer4_1/conv2/kernel"):
    pretrained.load_pretrained(variables, str(path), "resnet18", truncated=True)


# ----------------------------------------------------------------------------- errors


def write_resnet18_npz(tmp_path, drop=None, reshape=None, extra=None) -> Path:
  shapes = pretrained.expected_shapes("resnet18")
  arrays = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  if drop:
    del arrays[drop]
  if reshape:
    arrays[reshape] = np.zeros((1, 2), np.float32)
  if extra:
    arrays[extra] = np.zeros((3,), np.float32)
  path = tmp_path / "ours.npz"
  np.savez(path, __arch__=np.array("resnet18"), **arrays)
  return path


def test_load_errors_name_file_and_key(tmp_path):
  variables = abstract_variables(BACKBONES["resnet18"]())
  good = write_resnet18_npz(tmp_path)
  loaded = pretrained.load_pretrained(variables, str(good), "resnet18")
  assert float(np.asarray(loaded["params"]["conv1"]["kernel"]).sum()) == 0.0
  cases = [
      (dict(drop="batch_stats/layer3_1/bn2/var"), "missing batch_stats/layer3_1/bn2/var"),
      (dict(reshape="params/layer1_0/conv1/kernel"), "params/layer1_0/conv1/kernel has shape (1, 2)"),
      (dict(extra="params/layer9_0/bn1/scale"), "params/layer9_0/bn1/scale is not a variable"),
  ]
  for kwargs, message in cases:
    path = write_resnet18_npz(tmp_path, **kwargs)
    with pytest.raises(pretrained.PretrainedError) as err:
      pretrained.load_pretrained(variables, str(path), "resnet18")
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text
  with pytest.raises(pretrained.PretrainedError, match="holds resnet18 weights, not resnet34"):
    pretrained.load_pretrained(variables, str(good), "resnet34")
  with pytest.raises(pretrained.PretrainedError, match="no such file"):
    pretrained.load_pretrained(variables, str(tmp_path / "absent.npz"), "resnet18")
  # The model's own shapes are the reference: a narrower ResNet does not take ImageNet weights.
  narrow = abstract_variables(BACKBONES["resnet18"](width=32))
  with pytest.raises(pretrained.PretrainedError, match=r"params/.* has shape"):
    pretrained.load_pretrained(narrow, str(good), "resnet18")


def test_torch_key_mapping_and_bad_keys(tmp_path):
  f = pretrained.torch_key_to_flax
  assert f("layer1.0.downsample.1.running_mean", "resnet50", 1) == "batch_stats/layer1_0/downsample_1/mean"
  assert f("layer1.0.downsample.0.weight", "resnet50", 4) == "params/layer1_0/downsample_0/kernel"
  assert f("layer4.2.bn3.weight", "resnet50", 1) == "params/layer4_2/bn3/scale"
  assert f("fc.weight", "resnet50", 2) is None
  assert f("bn1.num_batches_tracked", "resnet50", 0) is None
  assert (f("features.denseblock1.denselayer1.norm.1.weight", "densenet201", 1)
          == "params/denseblock1/denselayer1/norm1/scale")
  assert f("features.transition2.conv.weight", "densenet201", 4) == "params/transition2/conv/kernel"
  assert f("features.norm5.running_var", "densenet201", 1) == "batch_stats/norm5/var"
  assert f("classifier.bias", "densenet201", 1) is None
  assert (pretrained.gluon_key_to_flax("mobilenetv20_features_linearbottleneck3_batchnorm1_running_var")
          == "batch_stats/linearbottleneck3/batchnorm1/var")
  assert pretrained.gluon_key_to_flax("mobilenetv20_features_conv1_weight") == "params/conv1/kernel"
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"layer1.0.conv1.weird": np.zeros(3, np.float32)})
  with pytest.raises(pretrained.PretrainedError, match=r"bad.npz: key 'layer1.0.conv1.weird'"):
    pretrained.load_backbone_arrays(str(bad), "resnet18")
  gluon_like = tmp_path / "gl.npz"
  np.savez(gluon_like, mobilenetv20_features_conv0_weight=np.zeros((32, 3, 3, 3), np.float32))
  with pytest.raises(pretrained.PretrainedError, match="do not fit arch resnet50"):
    pretrained.load_backbone_arrays(str(gluon_like), "resnet50")
  with pytest.raises(pretrained.PretrainedError, match="missing"):
    pretrained.load_backbone_arrays(str(gluon_like), "mobilenetv2")


def test_missing_torch_and_safetensors_give_one_line_errors(tmp_path, monkeypatch, capsys):
  # Without torch: a garbage file, and a legacy-format torch file holding more than
  # tensors (the restricted reader refuses it); the one line says why and what to do.
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  garbage = tmp_path / "g.pth"
  garbage.write_bytes(b"not really a checkpoint")
  with pytest.raises(pretrained.PretrainedError,
                     match=r"g.pth: not a readable PyTorch file \(UnpicklingError.*pip install torch"):
    pretrained.read_arrays(str(garbage))
  pth = tmp_path / "w.pth"
  with open(pth, "wb") as f:
    for obj in (torch_state.LEGACY_MAGIC, 1001, {}, datetime.date(2020, 1, 1), []):
      pickle.dump(obj, f)
  with pytest.raises(pretrained.PretrainedError,
                     match=r"w.pth: refuses to unpickle datetime.date .*pip install torch.*safetensors or .npz"):
    pretrained.read_arrays(str(pth))
  assert pretrained.main(["convert", "--arch=resnet50", f"--input={pth}", f"--output={tmp_path / 'o.npz'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "pip install torch" in err and "\n" not in err
  st = tmp_path / "w.safetensors"
  st.write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(pretrained.PretrainedError, match="pip install safetensors"):
    pretrained.read_arrays(str(st))


def test_reid_jax_does_not_import_torch():
  code = ("import sys, reid_jax, reid_jax.models, reid_jax.pretrained; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ----------------------------------------------------------------------------- MobileNetV2


def numpy_conv(x, w, stride, pad, groups=1):
  """Reference NCHW conv (float64) for OIHW weights; groups 1 or depthwise."""
  n, c, h, wd = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, o, oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      if groups == 1:
        out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
      else:
        assert groups == c == o
        out += patch * w[:, 0, i, j][None, :, None, None]
  return out


def gluon_mobilenetv2_reference(npz, x_nchw):
  """GluonCV mobilenetv2_1.0 features in numpy, straight from the Gluon parameter names."""
  p = {k: npz[k].astype(np.float64) for k in npz.files}

  def bn(x, prefix):
    g, b = p[prefix + "_gamma"], p[prefix + "_beta"]
    m, v = p[prefix + "_running_mean"], p[prefix + "_running_var"]
    return ((x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5)) * g[:, None, None] + b[:, None, None]

  relu6 = lambda x: np.clip(x, 0, 6)
  pre = "mobilenetv20_features_"
  x = relu6(bn(numpy_conv(x_nchw, p[pre + "conv0_weight"], 2, 1), pre + "batchnorm0"))
  strides = [1, 2] * 2 + [1, 1, 2] + [1] * 6 + [2] + [1] * 3  # as in gluoncv.model_zoo.mobilenet
  stage_ends = {2, 5, 12}
  outs = []
  for i, s in enumerate(strides):
    q = f"{pre}linearbottleneck{i}_"
    y = relu6(bn(numpy_conv(x, p[q + "conv0_weight"], 1, 0), q + "batchnorm0"))
    dw = p[q + "conv1_weight"]
    y = relu6(bn(numpy_conv(y, dw, s, 1, groups=dw.shape[0]), q + "batchnorm1"))
    y = bn(numpy_conv(y, p[q + "conv2_weight"], 1, 0), q + "batchnorm2")
    x = x + y if (s == 1 and x.shape[1] == y.shape[1]) else y
    if i in stage_ends:
      outs.append(x)
  outs.append(relu6(bn(numpy_conv(x, p[pre + "conv1_weight"], 1, 0), pre + "batchnorm1")))
  return [o.transpose(0, 2, 3, 1) for o in outs]


needs_gluon = pytest.mark.skipif(
    not GLUON_NPZ.is_file(), reason=f"GluonCV MobileNetV2 weights not found at {GLUON_NPZ}")


@pytest.fixture(scope="module")
def gluon_mobilenet():
  model = mobilenetv2()
  variables = pretrained.load_pretrained(abstract_variables(model), str(GLUON_NPZ), "mobilenetv2")
  return model, variables


def smooth_image(batch: int = 1) -> np.ndarray:
  """A natural-looking synthetic RGB image in [0, 1], ImageNet-normalised (NHWC)."""
  yy, xx = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
  img = np.stack([0.5 + 0.4 * np.sin(3 * xx + 2 * yy), 0.3 + 0.5 * yy * xx,
                  0.6 - 0.3 * np.cos(5 * yy)], -1)
  img[H // 4:H // 2, W // 4:3 * W // 4] = [0.8, 0.2, 0.2]  # a "shirt"
  img = (img - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  return np.repeat(img[None], batch, 0).astype(np.float32)


@needs_gluon
def test_gluon_mobilenetv2_matches_numpy_reference(gluon_mobilenet):
  model, variables = gluon_mobilenet
  x = np.random.default_rng(0).normal(size=(1, H, W, 3)).astype(np.float32)
  ours = model.apply(variables, jnp.asarray(x))
  with np.load(GLUON_NPZ) as npz:
    theirs = gluon_mobilenetv2_reference(npz, x.transpose(0, 3, 1, 2).astype(np.float64))
  for s, (a, b) in enumerate(zip(ours, theirs), start=1):
    assert a.shape == b.shape, (s, a.shape, b.shape)
    assert rel_err(a, b) < 1e-4, (s, rel_err(a, b))


@needs_gluon
def test_gluon_mobilenetv2_features_not_degenerate(gluon_mobilenet):
  model, variables = gluon_mobilenet
  x = smooth_image()
  feats = model.apply(variables, jnp.asarray(x))
  for f in feats:
    f = np.asarray(f)
    assert np.isfinite(f).all()
    pooled = f.mean(axis=(1, 2))[0]
    assert pooled.std() > 1e-2 and (pooled > 1e-3).mean() > 0.1
  # Flipping the image changes the (spatial) features but barely the pooled descriptor.
  flipped = np.asarray(model.apply(variables, jnp.asarray(x[:, :, ::-1]))[3]).mean(axis=(1, 2))[0]
  pooled = np.asarray(feats[3]).mean(axis=(1, 2))[0]
  cos = pooled @ flipped / np.linalg.norm(pooled) / np.linalg.norm(flipped)
  assert cos > 0.8


@needs_gluon
def test_gluon_convert_cli_roundtrip(tmp_path, gluon_mobilenet):
  out = tmp_path / "mnv2.npz"
  code = pretrained.main(["convert", "--arch=mobilenetv2", f"--input={GLUON_NPZ}", f"--output={out}"])
  assert code == 0
  _, variables = gluon_mobilenet
  again = pretrained.load_pretrained(abstract_variables(mobilenetv2()), str(out), "mobilenetv2")
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), variables, again)
  assert all(jax.tree_util.tree_leaves(same))
