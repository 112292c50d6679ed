"""Images/s of the DaRe train step (ResNet-50, 256x128, P=18 K=4), fp32 and bf16.

  python benchmarks/train_step.py [--backbone=resnet50] [--height=256 --width=128]
                                  [--steps=20] [--warmup=5] [--dtypes=float32,bfloat16] [--torch]

Times the same pmapped step `python -m reid_jax.train` runs (synthetic inputs, so the
input pipeline is not measured; see benchmarks/input_pipeline.py). With --torch and
torchvision installed, times an equivalent PyTorch step (DaRe heads on torchvision
ResNet-50, batch-hard soft-margin triplet on every exit, Adam) in the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import dare  # noqa: E402
from reid_jax.core import parallel  # noqa: E402
from reid_jax.methods.dare import train  # noqa: E402


def time_jax(backbone: str, h: int, w: int, dtype: str, steps: int,
             warmup: int) -> tuple[float, float]:
  c = dare.get_config()
  c.model.backbone, c.model.dtype = backbone, dtype
  c.model.pretrained = "none"  # timing only: random weights, no download
  c.input.height, c.input.width = h, w
  n = jax.local_device_count()
  state = parallel.replicate(train.create_train_state(jax.random.key(0), c))
  step = jax.pmap(functools.partial(train.train_step, model=train.training_model(c),
                                    config=c),
                  axis_name=parallel.AXIS, donate_argnums=(0,))
  b = c.input.P * c.input.K
  rng = np.random.default_rng(0)
  batch = parallel.shard({"image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
                       "person_id": np.repeat(np.arange(c.input.P), c.input.K).astype(np.int32)}, n)
  # Put the batch on the devices once, so the loop times the step alone.
  batch = jax.pmap(lambda x: x)(batch)
  t0 = time.time()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  # The first steps after compilation run slower (allocator warm-up): not timed, as
  # for PyTorch below.
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return b * steps / (time.time() - t0), compile_s


def time_torch(h: int, w: int, steps: int, warmup: int, amp: bool) -> float:
  import torch
  import torchvision
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  net = torchvision.models.resnet50()
  dims = (256, 512, 1024, 2048)
  heads = torch.nn.ModuleList(torch.nn.Sequential(
      torch.nn.Linear(d, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
      torch.nn.Linear(1024, 128)) for d in dims)
  fuse = torch.nn.Parameter(torch.full((4,), 0.25))
  net, heads = net.to(dev), heads.to(dev)
  opt = torch.optim.Adam(list(net.parameters()) + list(heads.parameters()) + [fuse], 3e-4)
  x = torch.randn(72, 3, h, w, device=dev)
  pids = torch.arange(18, device=dev).repeat_interleave(4)

  def bh(e):
    d = torch.cdist(e, e)
    same = pids[:, None] == pids[None]
    hp = (d * same).max(1).values
    hn = d.masked_fill(same, float("inf")).min(1).values
    return torch.nn.functional.softplus(hp - hn).mean()

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
      embs = []
      for layer, head in zip((net.layer1, net.layer2, net.layer3, net.layer4), heads):
        y = layer(y)
        embs.append(head(y.mean((2, 3))).float())
      fused = sum(f * e for f, e in zip(fuse, embs))
      loss = sum(bh(e) for e in embs) + bh(fused)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for _ in range(warmup):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  t0 = time.time()
  for _ in range(steps):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  return 72 * steps / (time.time() - t0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--torch", action="store_true")
  a = p.parse_args()
  print(f"devices: {jax.devices()}")
  rows = []
  for dtype in a.dtypes.split(","):
    ips, comp = time_jax(a.backbone, a.height, a.width, dtype, a.steps, a.warmup)
    rows.append((f"reid_jax {dtype}", ips, comp))
  if a.torch:
    for amp in (False, True):
      rows.append((f"pytorch {'bf16 autocast' if amp else 'fp32'}",
                   time_torch(a.height, a.width, a.steps, a.warmup, amp), float("nan")))
  print(f"DaRe-{a.backbone} train step, {a.height}x{a.width}, P18 K4 (72 images)")
  print(f"{'implementation':<24}{'images/s':>10}{'compile s':>11}")
  for name, ips, comp in rows:
    print(f"{name:<24}{ips:>10.1f}{comp:>11.1f}")


if __name__ == "__main__":
  main()
