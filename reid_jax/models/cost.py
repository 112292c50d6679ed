"""Multiply-add (MAC) cost of reaching each exit of a model, counted from the model itself.

How: the model is traced abstractly (`jax.eval_shape`, no compile, no compute) inside
`flax.linen.intercept_methods`; every `nn.Conv` / `nn.Dense` call (and any module with a
`cost_macs(args, output)` method, e.g. the DaRe `Fusion`) records its per-image MACs
and its module path:

  conv:  out_h * out_w * k_h * k_w * (in_ch / groups) * out_ch
  dense: in_features * out_features (times any extra leading non-batch dims)

Why not XLA's cost analysis: it counts FLOPs of the compiled, backend-fused HLO (BN,
ReLU and pooling included, numbers vary with backend and fusion), needs a full compile
(slow for ResNet-101 on CPU) and loses the module structure we need to split costs
between exits. Counting convs/denses is the convention behind the well-known figures
(ResNet-50 at 224x224: 4.1 GMACs), so numbers are comparable with the literature.

Exit attribution. The model is traced once per `max_stage` s = 1..4 (a true early exit),
and an exit first produced at stage s costs:
  * backbone: every backbone op of the max_stage=s trace (stages 1..s);
  * head: for `stage{k}` exits, the head submodules named `stage{k}` / `stage{k}_*`
    (see `reid_jax.models.heads`); for aggregate exits (`fused`, `final`), every head op
    of that trace (all stage heads + fusion).
Ops outside `head` (the backbone) always count, except the ID classifier (`classifier`
module, `logits` output), which is training-only and not an exit. A bare backbone
(which returns a list of maps) has exits `stage1..stage4` with backbone cost only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax.models.layers import NUM_STAGES

_STAGE_EXIT = re.compile(r"^stage(\d+)$")
_NOT_EXITS = ("logits",)
_NOT_EXIT_MODULES = ("classifier",)


@dataclasses.dataclass(frozen=True)
class OpCost:
  """One counted layer call: module path, module type and per-image MACs."""

  path: tuple[str, ...]
  kind: str
  macs: int


def _layer_macs(module: nn.Module, args: tuple, output: Any) -> int | None:
  """Per-image MACs of one intercepted call, or None if the module is not counted."""
  if isinstance(module, nn.Conv):
    x = args[0]
    kernel = module.kernel_size
    kernel = (kernel,) * (x.ndim - 2) if isinstance(kernel, int) else tuple(kernel)
    in_per_group = x.shape[-1] // module.feature_group_count
    return math.prod(output.shape[1:-1]) * math.prod(kernel) * in_per_group * output.shape[-1]
  if isinstance(module, nn.Dense):
    x = args[0]
    return math.prod(output.shape[1:-1]) * x.shape[-1] * output.shape[-1]
  if hasattr(module, "cost_macs"):
    return int(module.cost_macs(args, output))
  return None


def _batched_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
  """(H, W, C) or (N, H, W, C) -> (1, H, W, C): costs are per image."""
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 4:
    shape = shape[1:]
  if len(shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got {tuple(input_shape)}")
  return (1,) + shape


def op_costs(
    model: nn.Module,
    variables: Mapping[str, Any] | None,
    input_shape: Sequence[int],
    max_stage: int | None = None,
) -> tuple[list[OpCost], Any]:
  """Traces `model(x, max_stage=...)` abstractly; returns counted ops and output shapes."""
  ops: list[OpCost] = []

  def interceptor(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      macs = _layer_macs(context.module, args, output)
      if macs is not None:
        ops.append(OpCost(tuple(context.module.path), type(context.module).__name__, macs))
    return output

  x = jax.ShapeDtypeStruct(_batched_shape(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    if variables is None:
      out = jax.eval_shape(
          lambda x: model.init_with_output(jax.random.PRNGKey(0), x, max_stage=max_stage)[0], x
      )
    else:
      out = jax.eval_shape(lambda v, x: model.apply(v, x, max_stage=max_stage), variables, x)
  return ops, out


def _exit_ops(ops: list[OpCost], exit_name: str, is_backbone_only: bool) -> int:
  """Sums the MACs of the ops needed for `exit_name` (see the module docstring)."""
  if is_backbone_only:
    return sum(op.macs for op in ops)
  total = 0
  stage_exit = _STAGE_EXIT.match(exit_name) is not None
  for op in ops:
    top = op.path[0] if op.path else ""
    if top == "head":
      sub = op.path[1] if len(op.path) > 1 else ""
      if not stage_exit or sub == exit_name or sub.startswith(exit_name + "_"):
        total += op.macs
    elif top not in _NOT_EXIT_MODULES:  # the backbone (or any other shared trunk)
      total += op.macs
  return total


def _exit_order(name: str) -> tuple[int, int, str]:
  """Sort key: stage exits by stage number, then aggregate exits by name."""
  match = _STAGE_EXIT.match(name)
  return (0, int(match.group(1)), "") if match else (1, 0, name)


def exit_costs(
    model: nn.Module, variables: Mapping[str, Any] | None, input_shape: Sequence[int]
) -> dict[str, int]:
  """Per-image MACs needed to reach each exit of `model` at `input_shape` (H, W, C).

  `model` is a `ReIDModel` (exits = its embedding keys, e.g. stage1..stage4, fused) or a
  bare backbone (exits stage1..stage4). `variables` may be None (shapes are inferred
  by an abstract init). Returns exits in the order they become available.
  """
  costs: dict[str, int] = {}
  for s in range(1, NUM_STAGES + 1):
    ops, out = op_costs(model, variables, input_shape, s if s < NUM_STAGES else None)
    if isinstance(out, Mapping):
      names, backbone_only = [k for k in out if k not in _NOT_EXITS], False
    else:
      names, backbone_only = [f"stage{i + 1}" for i in range(len(out))], True
    for name in sorted(names, key=_exit_order):
      if name not in costs:
        costs[name] = _exit_ops(ops, name, backbone_only)
  return costs


def format_costs(costs: Mapping[str, int]) -> str:
  """A plain-text table: exit, GMACs, MMACs and cost relative to the dearest exit."""
  if not costs:
    return "(no exits)"
  top = max(costs.values()) or 1
  width = max(4, *(len(k) for k in costs))
  lines = [f"{'exit':<{width}}  {'GMACs':>8}  {'MMACs':>10}  {'relative':>8}"]
  for name, macs in costs.items():
    lines.append(f"{name:<{width}}  {macs / 1e9:>8.3f}  {macs / 1e6:>10.1f}  {macs / top:>8.3f}")
  return "\n".join(lines)
