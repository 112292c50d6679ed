"""PyTorch twins of the reid_jax DaRe networks, loss and optimiser, for side-by-side timing.

Written by hand (no torchvision), module for module after reid_jax/models, and named so
that a flax variable path is the torch module path (`backbone/layer2_0/conv1/kernel` ->
`backbone.layer2_0.conv1.weight`), so `load_flax_params` copies a flax DaRe model into
the torch one mechanically. tests/test_torch_reference.py checks that the two then agree:
embeddings of every exit (eval and train mode), the loss, and one optimiser step.

  * `MobileNetV2`: the GluonCV `mobilenetv2_1.0` layout of reid_jax/models/mobilenetv2.py
    (every bottleneck has its 1x1 expand conv, even at t=1; ReLU6; stages split where
    the stride changes; `last_stride=1` drops the stride of bottleneck 13).
  * `ResNet`: torchvision v1.5 (stride on the 3x3 conv of a Bottleneck), `width` base
    channels, `last_stride` for layer4: `resnet50()` and `resnet_small()` (BasicBlock,
    1-1-1-1) as in reid_jax/models/resnet.py.
  * `DaReHead`: per stage GAP -> Linear(hidden) + BatchNorm1d + ReLU -> Linear(embed), and
    `fused` = learned weighted sum of the four stage embeddings (reid_jax.models.heads).
  * `dare_loss`: reid_jax.methods.dare.loss.multi_exit_triplet_loss: the sum over
    `config.loss.exits` of the batch-hard (or batch-all) triplet loss with the soft
    (softplus) or a hinge margin, distances computed by the same formula.
  * `make_optimizer`: reid_jax.core.optim's Adam (TriNet schedule: constant lr, then
    exponential decay to end_lr and beta1 0.9 -> 0.5 from decay_start; coupled weight
    decay as optax.add_decayed_weights before Adam) or SGD (Nesterov, coupled decay).

Known differences, none of which changes the cost of a step: BatchNorm's running
variance is updated with the unbiased batch variance in PyTorch and the biased one in
flax (the normalisation itself is identical); DenseNet-201 and the `prenorm_stages` of
the DaRe head are not mirrored; per-parameter-group learning rates are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_STAGES = 4
BN_EPS = 1e-5        # reid_jax.models.layers.batch_norm: epsilon 1e-5 ...
BN_MOMENTUM = 0.1    # ... and flax momentum 0.9 (= PyTorch 0.1)


# ----------------------------------------------------------------------------- layers


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
  """float16/bfloat16 -> float32, anything else unchanged (reid_jax computes pooling,
  embeddings and the loss in float32; a float64 twin, used by the tests, stays float64)."""
  return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
         groups: int = 1) -> nn.Conv2d:
  """Bias-free conv with torchvision's init (kaiming normal, fan_out), as layers.conv."""
  c = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
  nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
  return c


def bn2d(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs, the stride on the first."""

  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, downsample: bool):
    super().__init__()
    self.conv1, self.bn1 = conv(cin, planes, 3, stride, 1), bn2d(planes)
    self.conv2, self.bn2 = conv(planes, planes, 3, 1, 1), bn2d(planes)
    self.has_downsample = downsample
    if downsample:
      self.downsample_0 = conv(cin, planes, 1, stride)
      self.downsample_1 = bn2d(planes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.has_downsample:
      x = self.downsample_1(self.downsample_0(x))
    return F.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck v1.5: 1x1, 3x3 (carries the stride), 1x1 x4."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, downsample: bool):
    super().__init__()
    out = planes * self.expansion
    self.conv1, self.bn1 = conv(cin, planes, 1), bn2d(planes)
    self.conv2, self.bn2 = conv(planes, planes, 3, stride, 1), bn2d(planes)
    self.conv3, self.bn3 = conv(planes, out, 1), bn2d(out)
    self.has_downsample = downsample
    if downsample:
      self.downsample_0 = conv(cin, out, 1, stride)
      self.downsample_1 = bn2d(out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.has_downsample:
      x = self.downsample_1(self.downsample_0(x))
    return F.relu(y + x)


class ResNet(nn.Module):
  """reid_jax.models.resnet.ResNet: stem, maxpool, 4 stages; returns the 4 stage maps.

  Blocks are attributes `layer{i}_{j}` (flax's names). Stage s uses width * 2**(s-1)
  planes; layer4's first block has stride `last_stride`.
  """

  def __init__(self, stage_sizes: Sequence[int] = (3, 4, 6, 3), block: str = "bottleneck",
               width: int = 64, last_stride: int = 2):
    super().__init__()
    if last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    self.conv1, self.bn1 = conv(3, width, 7, 2, 3), bn2d(width)
    self.stages: list[list[str]] = []
    cin = width
    for i, n in enumerate(stage_sizes):
      planes = width * 2**i
      stride = 1 if i == 0 else (last_stride if i == 3 else 2)
      names = []
      for j in range(n):
        s = stride if j == 0 else 1
        down = s != 1 or cin != planes * block_cls.expansion
        setattr(self, f"layer{i + 1}_{j}", block_cls(cin, planes, s, down))
        names.append(f"layer{i + 1}_{j}")
        cin = planes * block_cls.expansion
      self.stages.append(names)
    self.stage_channels = tuple(width * 2**i * block_cls.expansion for i in range(4))

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    features = []
    for names in self.stages:
      for name in names:
        x = getattr(self, name)(x)
      features.append(x)
    return features


def resnet50(last_stride: int = 2, width: int = 64) -> ResNet:
  """ResNet-50 (Bottleneck 3-4-6-3); stage channels 256/512/1024/2048 at width 64."""
  return ResNet((3, 4, 6, 3), "bottleneck", width, last_stride)


def resnet_small(width: int = 16, last_stride: int = 2,
                 stage_sizes: Sequence[int] = (1, 1, 1, 1)) -> ResNet:
  """reid_jax's tiny CPU ResNet: BasicBlock 1-1-1-1, stage channels width x 1/2/4/8."""
  return ResNet(stage_sizes, "basic", width, last_stride)


# ----------------------------------------------------------------------------- MobileNetV2

# GluonCV settings per bottleneck (output channels, expansion t, stride), as
# reid_jax.models.mobilenetv2.
_CHANNELS = (16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)
_EXPANSIONS = (1,) + (6,) * 16
_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
_STAGE_STARTS = (0, 3, 6, 13, 17)
_LAST_STRIDE_BLOCK = 13


class LinearBottleneck(nn.Module):
  """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN (+ x)."""

  def __init__(self, cin: int, channels: int, expansion: int, stride: int):
    super().__init__()
    hidden = cin * expansion
    self.conv0, self.batchnorm0 = conv(cin, hidden, 1), bn2d(hidden)
    self.conv1 = conv(hidden, hidden, 3, stride, 1, groups=hidden)  # depthwise
    self.batchnorm1 = bn2d(hidden)
    self.conv2, self.batchnorm2 = conv(hidden, channels, 1), bn2d(channels)
    self.residual = stride == 1 and cin == channels

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu6(self.batchnorm0(self.conv0(x)))
    y = F.relu6(self.batchnorm1(self.conv1(y)))
    y = self.batchnorm2(self.conv2(y))
    return y + x if self.residual else y


class MobileNetV2(nn.Module):
  """reid_jax.models.mobilenetv2.MobileNetV2 (Gluon layout); returns the 4 stage maps."""

  def __init__(self, multiplier: float = 1.0, last_stride: int = 2):
    super().__init__()
    if last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    m = multiplier
    cin = int(32 * m)
    self.conv0, self.batchnorm0 = conv(3, cin, 3, 2, 1), bn2d(cin)
    self.stages: list[list[str]] = []
    for s in range(NUM_STAGES):
      names = []
      for i in range(_STAGE_STARTS[s], _STAGE_STARTS[s + 1]):
        stride = 1 if (i == _LAST_STRIDE_BLOCK and last_stride == 1) else _STRIDES[i]
        c = int(_CHANNELS[i] * m)
        setattr(self, f"linearbottleneck{i}", LinearBottleneck(cin, c, _EXPANSIONS[i], stride))
        names.append(f"linearbottleneck{i}")
        cin = c
      self.stages.append(names)
    last = int(1280 * m) if m > 1.0 else 1280
    self.conv1, self.batchnorm1 = conv(cin, last, 1), bn2d(last)
    self.stage_channels = (int(24 * m), int(32 * m), int(96 * m), last)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    x = F.relu6(self.batchnorm0(self.conv0(x)))
    features = []
    for s, names in enumerate(self.stages):
      for name in names:
        x = getattr(self, name)(x)
      if s == 3:
        x = F.relu6(self.batchnorm1(self.conv1(x)))
      features.append(x)
    return features


# ----------------------------------------------------------------------------- DaRe head


class EmbeddingMLP(nn.Module):
  """Linear(hidden) + BatchNorm1d + ReLU + Linear(embed) (PyTorch's default Linear init)."""

  def __init__(self, cin: int, hidden_dim: int, embed_dim: int):
    super().__init__()
    self.fc1 = nn.Linear(cin, hidden_dim)
    self.bn = nn.BatchNorm1d(hidden_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
    self.fc2 = nn.Linear(hidden_dim, embed_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.relu(self.bn(self.fc1(x))))


class Fusion(nn.Module):
  """sum_s w_s e_s; w ~ U(-1/sqrt(S), 1/sqrt(S)) (the official code's Conv1d init)."""

  def __init__(self, num_inputs: int = NUM_STAGES):
    super().__init__()
    bound = 1.0 / math.sqrt(num_inputs)
    self.weights = nn.Parameter(torch.empty(num_inputs).uniform_(-bound, bound))

  def forward(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack([at_least_fp32(e) for e in embeddings], 0)
    return torch.tensordot(self.weights, stacked, dims=1)


class DaReHead(nn.Module):
  """reid_jax.models.heads.DaReHead: `stage{s}` embeddings (float32) and `fused`."""

  def __init__(self, stage_channels: Sequence[int], hidden_dim: int = 1024,
               embed_dim: int = 128):
    super().__init__()
    for s, c in enumerate(stage_channels, start=1):
      setattr(self, f"stage{s}", EmbeddingMLP(c, hidden_dim, embed_dim))
    self.fused = Fusion(len(stage_channels))

  def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for s, fmap in enumerate(features, start=1):
      pooled = at_least_fp32(fmap).mean((2, 3))  # as layers.global_avg_pool
      out[f"stage{s}"] = at_least_fp32(getattr(self, f"stage{s}")(pooled))
    if len(features) == NUM_STAGES:
      out["fused"] = self.fused([out[f"stage{s}"] for s in range(1, NUM_STAGES + 1)])
    return out


class DaReNet(nn.Module):
  """Backbone + DaRe head: NCHW images -> {stage1..4, fused} float32 embeddings."""

  def __init__(self, backbone: nn.Module, hidden_dim: int = 1024, embed_dim: int = 128):
    super().__init__()
    self.backbone = backbone
    self.head = DaReHead(backbone.stage_channels, hidden_dim, embed_dim)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return self.head(self.backbone(x))


def build_backbone(name: str, last_stride: int = 2, width: int = 16) -> nn.Module:
  """The torch backbone a reid_jax `config.model.backbone` names (width: resnet_small)."""
  if name == "resnet50":
    return resnet50(last_stride)
  if name == "resnet_small":
    return resnet_small(width, last_stride)
  if name == "mobilenetv2":
    return MobileNetV2(1.0, last_stride)
  raise ValueError(f"no torch twin of backbone {name!r}: resnet50, resnet_small, mobilenetv2")


class TorchvisionStages(nn.Module):
  """torchvision's ResNet returning its four stage maps (a second torch row: the
  library's own network, which `ResNet` above mirrors layer for layer)."""

  def __init__(self, net: nn.Module, last_stride: int = 2):
    super().__init__()
    self.net = net
    if last_stride == 1:  # layer4's first block: the 3x3 conv and the shortcut
      block = net.layer4[0]
      (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
      if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
    expansion = 4 if hasattr(net.layer1[0], "conv3") else 1
    self.stage_channels = tuple(64 * 2**i * expansion for i in range(4))

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    n = self.net
    x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
    features = []
    for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
      x = layer(x)
      features.append(x)
    return features


def torchvision_backbone(name: str, last_stride: int = 2) -> TorchvisionStages:
  """torchvision.models.<name>() (random init) as a 4-stage backbone; needs torchvision."""
  import torchvision  # pylint: disable=import-outside-toplevel
  return TorchvisionStages(getattr(torchvision.models, name)(), last_stride)


def build_dare(model_cfg: Any) -> DaReNet:
  """The torch twin of `reid_jax.models.build_model(config.model)` for the DaRe head."""
  if model_cfg.head != "dare":
    raise ValueError(f"torch twin only for head='dare', got {model_cfg.head!r}")
  backbone = build_backbone(model_cfg.backbone, model_cfg.last_stride,
                            model_cfg.get("width", 16))
  return DaReNet(backbone, model_cfg.hidden_dim, model_cfg.embed_dim)


# ----------------------------------------------------------------------------- flax <-> torch


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
  """HWIO -> OIHW; a depthwise (3, 3, 1, C) kernel becomes (C, 1, 3, 3)."""
  return np.transpose(k, (3, 2, 0, 1))


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


_BN = nn.modules.batchnorm._BatchNorm  # pylint: disable=protected-access  (1d and 2d)
# (module type, flax leaf name) -> (torch attribute, flax->torch, torch->flax)
_IDENT = (lambda a: a, lambda a: a)
_RULES: dict[tuple[type, str], tuple[str, Callable, Callable]] = {
    (nn.Conv2d, "kernel"): ("weight", _conv_to_torch, _conv_to_flax),
    (nn.Linear, "kernel"): ("weight", np.transpose, np.transpose),
    (nn.Linear, "bias"): ("bias", *_IDENT),
    (_BN, "scale"): ("weight", *_IDENT),
    (_BN, "bias"): ("bias", *_IDENT),
    (_BN, "mean"): ("running_mean", *_IDENT),
    (_BN, "var"): ("running_var", *_IDENT),
    (Fusion, "weights"): ("weights", *_IDENT),
}


def _rule(module: nn.Module, leaf: str, path: str) -> tuple[str, Callable, Callable]:
  for (cls, name), rule in _RULES.items():
    if isinstance(module, cls) and name == leaf:
      return rule
  raise ValueError(f"flax variable {path} has no torch counterpart on "
                   f"{type(module).__name__}")


def _pairs(torch_model: nn.Module, variables: Mapping[str, Mapping]
           ) -> Iterator[tuple[str, tuple[str, ...], nn.Module, str, Callable, Callable]]:
  """(collection, flax path, torch module, torch attribute, to_torch, to_flax) per leaf."""
  for collection in ("params", "batch_stats"):
    for path, _ in _flatten(variables.get(collection, {}) or {}):
      name = "/".join(path)
      try:
        module = torch_model.get_submodule(".".join(path[:-1]))
      except AttributeError as e:
        raise ValueError(f"flax {collection}/{name} has no torch module "
                         f"{'.'.join(path[:-1])!r}") from e
      attr, to_torch, to_flax = _rule(module, path[-1], f"{collection}/{name}")
      yield collection, path, module, attr, to_torch, to_flax


def load_flax_params(torch_model: nn.Module, params: Mapping, batch_stats: Mapping) -> None:
  """Copies a flax DaRe model's variables into `torch_model` (in place).

  Conv kernels HWIO -> OIHW (depthwise (3,3,1,C) -> (C,1,3,3)), Dense kernels
  transposed, BatchNorm scale/bias/mean/var -> weight/bias/running_mean/running_var,
  the fusion weights as they are; every BatchNorm gets flax's eps (1e-5) and momentum
  (0.9, i.e. torch 0.1). Raises if a flax variable has no torch place, if shapes differ,
  or if a torch parameter or buffer is left unset (so a layout mismatch cannot pass).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  flat = {(c, p): v for c in variables for p, v in _flatten(variables[c] or {})}
  done: set[int] = set()
  with torch.no_grad():
    for collection, path, module, attr, to_torch, _ in _pairs(torch_model, variables):
      target = getattr(module, attr)
      value = torch.from_numpy(np.array(
          to_torch(np.asarray(flat[(collection, path)], np.float32)), np.float32, copy=True))
      if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{collection}/{'/'.join(path)}: flax {tuple(value.shape)} vs "
                         f"torch {tuple(target.shape)}")
      target.copy_(value)
      done.add(id(target))
      if isinstance(module, _BN):
        module.eps, module.momentum = BN_EPS, BN_MOMENTUM
  missing = [n for n, t in list(torch_model.named_parameters()) + list(torch_model.named_buffers())
             if id(t) not in done and not n.endswith("num_batches_tracked")]
  if missing:
    raise ValueError(f"torch tensors with no flax variable: {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")


def to_flax_layout(torch_model: nn.Module, template: Mapping[str, Mapping],
                   value: Callable[[torch.Tensor], torch.Tensor | None] = lambda t: t
                   ) -> dict[str, dict]:
  """`{'params', 'batch_stats'}` with `template`'s structure, filled from `torch_model`.

  `value(tensor)` picks what to read for each torch parameter or buffer (the tensor
  itself, `p.grad`, an optimiser state such as Adam's `exp_avg`); tests compare the
  result leaf by leaf with the flax side.
  """
  out: dict[str, dict] = {}
  for collection, path, module, attr, _, to_flax in _pairs(torch_model, template):
    t = value(getattr(module, attr))
    arr = None if t is None else to_flax(at_least_fp32(t.detach()).cpu().numpy())
    node = out.setdefault(collection, {})
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = arr
  return out


# ----------------------------------------------------------------------------- loss


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
  """reid_jax.losses.pairwise_distances: sqrt(max(|x|^2 + |y|^2 - 2 x.y, 0), clamped 1e-12)."""
  x = at_least_fp32(x)
  sq = (x * x).sum(-1)
  d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
  return torch.sqrt(d2.clamp_min(1e-12))


def _apply_margin(x: torch.Tensor, margin: str | float) -> torch.Tensor:
  return F.softplus(x) if margin == "soft" else torch.clamp_min(x + float(margin), 0.0)


def batch_hard_triplet_loss(emb: torch.Tensor, pids: torch.Tensor,
                            margin: str | float = "soft") -> torch.Tensor:
  """Mean over anchors of margin(d(a, hardest p) - d(a, hardest n)), as reid_jax's."""
  b = emb.shape[0]
  dist = pairwise_distances(emb)
  same = pids[:, None] == pids[None, :]
  eye = torch.eye(b, dtype=torch.bool, device=emb.device)
  pos, neg = same & ~eye, ~same
  hardest_pos = dist.masked_fill(~pos, -math.inf).amax(1)
  hardest_neg = dist.masked_fill(~neg, math.inf).amin(1)
  has = pos.any(1) & neg.any(1)
  diff = torch.where(has, hardest_pos - hardest_neg, torch.zeros_like(hardest_pos))
  losses = torch.where(has, _apply_margin(diff, margin), torch.zeros_like(diff))
  return losses.sum() / has.sum().clamp_min(1)


def batch_all_triplet_loss(emb: torch.Tensor, pids: torch.Tensor,
                           margin: str | float = "soft") -> torch.Tensor:
  """Mean over valid triplets (soft margin) or over active ones (hinge), as reid_jax's."""
  b = emb.shape[0]
  dist = pairwise_distances(emb)
  same = pids[:, None] == pids[None, :]
  eye = torch.eye(b, dtype=torch.bool, device=emb.device)
  mask = (same & ~eye)[:, :, None] & (~same)[:, None, :]
  diff = dist[:, :, None] - dist[:, None, :]
  losses = torch.where(mask, _apply_margin(diff, margin), torch.zeros_like(diff)).sum()
  if margin == "soft":
    return losses / mask.sum().clamp_min(1)
  active = ((diff + float(margin) > 0) & mask).sum()
  return losses / active.clamp_min(1)


def parse_margin(margin: Any) -> str | float:
  """'soft' or a float, as reid_jax.methods.dare.loss.parse_margin."""
  return "soft" if isinstance(margin, str) and margin == "soft" else float(margin)


def dare_loss(outputs: Mapping[str, torch.Tensor], pids: torch.Tensor, loss_cfg: Any
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """multi_exit_triplet_loss: the sum over `loss_cfg.exits` (stage1..4 and fused for
  DaRe; the fused exit is one more term, weight 1) of the `loss_cfg.kind` triplet loss."""
  margin = parse_margin(loss_cfg.margin)
  fn = {"batch_hard": batch_hard_triplet_loss, "batch_all": batch_all_triplet_loss}[loss_cfg.kind]
  per_exit = {name: fn(at_least_fp32(outputs[name]), pids, margin) for name in loss_cfg.exits}
  return sum(per_exit.values()), per_exit


# ----------------------------------------------------------------------------- optimiser


class ScheduledOptimizer:
  """A torch optimiser plus reid_jax.core.optim's schedule, set before every update.

  optax's `inject_hyperparams` evaluates the schedule at the update count before the
  update (0 for the first), so `step()` sets lr (and Adam's beta1) for count k, then
  steps. Call `zero_grad`/`step` as on a torch optimiser.
  """

  def __init__(self, opt: torch.optim.Optimizer, cfg: Any, total_steps: int):
    self.opt, self.cfg, self.total, self.count = opt, cfg, int(total_steps), 0

  def lr(self, k: int) -> float:
    c = self.cfg
    name = c.get("schedule", "") or ("trinet" if c.name == "adam" else "step")
    if name == "trinet":
      frac = min(max((k - c.decay_start) / max(self.total - c.decay_start, 1), 0.0), 1.0)
      return c.lr * (c.end_lr / c.lr) ** frac
    if name == "constant":
      return c.lr
    if name == "step":
      return c.lr * c.get("decay_factor", 0.1) ** sum(k >= b for b in c.get("decay_steps", ()))
    raise ValueError(f"schedule {name!r} not mirrored in torch")

  def zero_grad(self, set_to_none: bool = True) -> None:
    self.opt.zero_grad(set_to_none=set_to_none)

  def step(self) -> None:
    lr = self.lr(self.count)
    for g in self.opt.param_groups:
      g["lr"] = lr
      if self.cfg.name == "adam":
        b1 = self.cfg.b1 if self.count < self.cfg.decay_start else self.cfg.b1_after_decay
        g["betas"] = (b1, self.cfg.b2)
    self.opt.step()
    self.count += 1

  @property
  def state(self) -> Any:
    return self.opt.state


def make_optimizer(params: Any, cfg: Any, total_steps: int) -> ScheduledOptimizer:
  """torch twin of reid_jax.core.optim.make_optimizer(cfg) (Adam or SGD, one group).

  Weight decay is coupled (added to the gradient), as optax.add_decayed_weights chained
  before the optimiser; torch.optim.Adam's `weight_decay` does exactly that.
  """
  if dict(cfg.get("lr_mult", None) or {}):
    raise ValueError("per-group learning rates (optimizer.lr_mult) are not mirrored in torch")
  if int(cfg.get("accumulate_steps", 1) or 1) > 1:
    raise ValueError("optimizer.accumulate_steps > 1 is not mirrored in torch")
  wd = float(cfg.get("weight_decay", 0.0) or 0.0)
  if cfg.name == "adam":
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                           weight_decay=wd)
  elif cfg.name == "sgd":
    momentum = cfg.get("momentum", 0.9) or 0.0
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=wd,
                          nesterov=bool(cfg.get("nesterov", False)) and momentum > 0)
  else:
    raise ValueError(f"optimizer {cfg.name!r} not mirrored in torch")
  return ScheduledOptimizer(opt, cfg, total_steps)


# ----------------------------------------------------------------------------- train step


class DaReStep:
  """One DaRe train step in PyTorch: forward (optionally under bf16 autocast), the
  multi-exit loss, backward, optimiser update; returns the loss (a tensor, not synced).

  `compile=True` wraps forward + loss in `torch.compile` (the optimiser stays eager,
  as most training scripts leave it).
  """

  def __init__(self, model: nn.Module, opt: ScheduledOptimizer, loss_cfg: Any, *,
               amp_dtype: torch.dtype | None = None, compile: bool = False):
    self.model, self.opt, self.loss_cfg, self.amp_dtype = model, opt, loss_cfg, amp_dtype
    self.device_type = next(model.parameters()).device.type
    fwd = self._forward_loss
    self.forward_loss = torch.compile(fwd) if compile else fwd

  def _forward_loss(self, x: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                        enabled=self.amp_dtype is not None):
      out = self.model(x)
    return dare_loss({k: at_least_fp32(v) for k, v in out.items()}, pids, self.loss_cfg)[0]

  def __call__(self, x: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    self.model.train()
    loss = self.forward_loss(x, pids)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach()
