"""Cost model: MACs per exit, counted from the model, checked by hand and against literature."""

from __future__ import annotations

import flax.linen as nn
import pytest

from reid_jax.models import build_model, exit_costs, format_costs, resnet50
from reid_jax.models.cost import op_costs


class Tiny(nn.Module):
  """conv 3x3/2 (3->8), depthwise 3x3 (8 groups), GAP, dense 8->5."""

  @nn.compact
  def __call__(self, x, train: bool = False, max_stage=None):
    x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")(x)
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=8, name="dw")(x)
    return {"final": nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))}


def test_tiny_model_matches_hand_count():
  ops, _ = op_costs(Tiny(), None, (8, 8, 3))
  by_name = {op.path[-1]: op.macs for op in ops}
  assert by_name == {
      "conv": 4 * 4 * 3 * 3 * 3 * 8,  # out 4x4, k 3x3, 3 in, 8 out
      "dw": 4 * 4 * 3 * 3 * 1 * 8,  # depthwise: in/groups = 1
      "fc": 8 * 5,
  }
  # Per image: the batch size of input_shape does not matter.
  assert exit_costs(Tiny(), None, (4, 8, 8, 3)) == {"final": 3456 + 1152 + 40}


def test_resnet_small_dare_exits_by_hand():
  model = build_model({"backbone": "resnet_small", "width": 16})
  costs = exit_costs(model, None, (64, 32, 3))
  assert list(costs) == ["stage1", "stage2", "stage3", "stage4", "fused"]
  stem = 32 * 16 * 7 * 7 * 3 * 16  # conv1 7x7/2 at 32x16 output
  layer1 = 2 * 16 * 8 * 3 * 3 * 16 * 16  # two 3x3 16->16 convs at 16x8 (after the max pool)
  head1 = 16 * 1024 + 1024 * 128
  assert costs["stage1"] == stem + layer1 + head1
  layer2 = 8 * 4 * 9 * 16 * 32 + 8 * 4 * 9 * 32 * 32 + 8 * 4 * 16 * 32  # + 1x1/2 downsample
  head2 = 32 * 1024 + 1024 * 128
  assert costs["stage2"] == stem + layer1 + layer2 + head2
  heads = sum(c * 1024 + 1024 * 128 for c in (16, 32, 64, 128))
  backbone4 = costs["stage4"] - (128 * 1024 + 1024 * 128)
  assert costs["fused"] == backbone4 + heads + 4 * 128


def test_trinet_single_exit_and_classifier_excluded():
  model = build_model({"backbone": "resnet_small", "head": "trinet", "num_classes": 10})
  costs = exit_costs(model, None, (64, 32, 3))
  assert list(costs) == ["final"]
  dare = exit_costs(build_model({"backbone": "resnet_small"}), None, (64, 32, 3))
  assert costs["final"] == dare["stage4"]  # same backbone + one MLP; no classifier MACs


def test_truncated_trinet_costs_its_stages_plus_one_mlp():
  """A network cut after stage s costs DaRe's stage-s exit (same trunk, one MLP)."""
  dare = exit_costs(build_model({"backbone": "resnet_small"}), None, (64, 32, 3))
  for s in (1, 2, 3):
    model = build_model({"backbone": "resnet_small", "head": "trinet", "num_stages": s})
    assert exit_costs(model, None, (64, 32, 3)) == {"final": dare[f"stage{s}"]}


def test_resnet50_224_is_about_4_1_gmacs():
  costs = exit_costs(resnet50(), None, (224, 224, 3))
  assert costs["stage4"] == pytest.approx(4.1e9, rel=0.03)
  assert costs["stage1"] < costs["stage2"] < costs["stage3"] < costs["stage4"]


@pytest.mark.parametrize("depthwise", ["conv", "shift"])
def test_mobilenetv2_224_matches_published_count(depthwise):
  from reid_jax.models.mobilenetv2 import mobilenetv2
  costs = exit_costs(mobilenetv2(depthwise=depthwise), None, (224, 224, 3))
  # thop/fvcore count torchvision's MobileNetV2 at 300.77M MACs: 299,494,272 without the
  # 1000-way classifier (1,281,000). GluonCV's first bottleneck (t=1) keeps its 1x1
  # "expansion" conv, 32 -> 32 channels at 112x112: 32 * 32 * 112 * 112 = 12,845,056 more.
  assert costs["stage4"] == 299_494_272 + 32 * 32 * 112 * 112


def test_format_costs_table():
  text = format_costs({"stage1": 2_000_000_000, "fused": 4_000_000_000})
  lines = text.splitlines()
  assert lines[0].split() == ["exit", "GMACs", "MMACs", "relative"]
  assert lines[1].split() == ["stage1", "2.000", "2000.0", "0.500"]
  assert lines[2].split() == ["fused", "4.000", "4000.0", "1.000"]
  assert format_costs({}) == "(no exits)"


def test_costs_scale_with_input_size():
  small = exit_costs(build_model({"backbone": "resnet_small"}), None, (64, 32, 3))
  large = exit_costs(build_model({"backbone": "resnet_small"}), None, (128, 64, 3))
  head1 = 16 * 1024 + 1024 * 128
  assert large["stage1"] - head1 == 4 * (small["stage1"] - head1)
