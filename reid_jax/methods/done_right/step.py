"""The ranking stage's update: triplets of their own image sizes, one at a time, with the
gradients accumulated until `triplets_per_update` triplets have been seen (Re-ID done
right: images are upscaled, not distorted, so every image can have its own size).

Per triplet, on its device: three forward passes give the embeddings; the loss
L = 1/2 max(0, m + |q - p|^2 - |q - n|^2) and its gradient with respect to the three
embeddings are computed; then each image's backward pass (a vjp of its embedding with
that cotangent) adds its share of the parameter gradient to the device's accumulator.
The forward is run again inside each vjp (3 extra forwards per triplet) so that each
compiled program depends on one image shape: 2 executables per shape, not shapes^3. BatchNorm uses its running statistics (frozen) —
with one image at a time there is no batch to normalise over.

Each local device works on its own contiguous block of the window's triplets; once per
update the device accumulators are summed over all devices (pmap psum), divided by the
global triplet count and applied by the optimiser, under the core's finite guard.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reid_jax.core import loop, parallel
from reid_jax.core.state import TrainState

AXIS = parallel.AXIS


def triplet_loss(q: jnp.ndarray, p: jnp.ndarray, n: jnp.ndarray, margin: float
                 ) -> jnp.ndarray:
  """L = 1/2 max(0, m + |q - p|^2 - |q - n|^2) for one triplet of embeddings [D]."""
  return 0.5 * jnp.maximum(0.0, margin + jnp.sum((q - p) ** 2) - jnp.sum((q - n) ** 2))


def batched_triplet_loss(q, p, n, margin: float) -> jnp.ndarray:
  """The mean of `triplet_loss` over a batch of triplets [B, D]."""
  return jnp.mean(jax.vmap(lambda a, b, c: triplet_loss(a, b, c, margin))(q, p, n))


class SequentialTripletStep:
  """`custom_step` for `core.loop.fit`: (replicated state, window, steps) -> (state, metrics).

  `embed_fn(variables, images [1, H, W, 3]) -> [1, D]` is the model's embedding in
  inference mode (frozen BatchNorm). The window is a dict with `triplets` (a list of
  (anchor, positive, negative) float32 HxWx3 arrays, this process's share; device d
  takes the d-th contiguous block) and `mining_s` (seconds the sampler spent mining).

  All devices run together: at each position r of their blocks, one pmapped call per
  distinct image shape among the devices' r-th images processes that image on every
  device; a device whose image has another shape runs a stand-in image with a zero
  cotangent in that call, which adds exactly nothing (a vjp is linear in its cotangent).
  So the programs compiled are 2 per shape, whatever the device count; on data of one
  crop size (Market-1501) no call is ever wasted.
  """

  def __init__(self, embed_fn: Callable, *, margin: float, triplets_per_update: int,
               seed: int, devices: list | None = None):
    self.margin = float(margin)
    self.total = int(triplets_per_update)
    self.devices = list(devices or jax.local_devices())
    self.compiled: dict[tuple, Any] = {}
    self.shapes: set[tuple[int, int]] = set()
    self.compile_s = 0.0
    margin = self.margin

    def embed(params, batch_stats, x):
      return embed_fn({"params": params, "batch_stats": batch_stats}, x)[0]

    def image_grad(params, batch_stats, x, cotangent, acc):
      f = lambda p: embed_fn({"params": p, "batch_stats": batch_stats}, x)[0]
      _, vjp = jax.vjp(f, params)
      (g,) = vjp(cotangent)
      return jax.tree_util.tree_map(jnp.add, acc, g)

    def loss_and_cotangents(q, p, n):
      loss, grads = jax.value_and_grad(
          lambda e: triplet_loss(e[0], e[1], e[2], margin))(jnp.stack([q, p, n]))
      return loss, (loss > 0).astype(jnp.float32), grads[0], grads[1], grads[2]

    pmap = lambda f, **kw: jax.pmap(f, axis_name=AXIS, devices=self.devices, **kw)
    self._fns = {"embed": pmap(embed), "grad": pmap(image_grad, donate_argnums=(4,)),
                 "loss": pmap(loss_and_cotangents)}
    # One program for the whole zero tree (jnp.zeros_like per leaf compiles per shape).
    self._zeros = pmap(lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree))

    def apply(state: TrainState, batch: dict, rng: jax.Array):
      del rng
      grads = jax.tree_util.tree_map(lambda g: jax.lax.psum(g, AXIS) / self.total,
                                     batch["grads"])
      new = state.apply_gradients(grads=grads)
      metrics = {"loss": jax.lax.psum(batch["loss"], AXIS) / self.total,
                 "active": jax.lax.psum(batch["active"], AXIS) / self.total,
                 "grad_norm": optax.global_norm(grads)}
      return new, metrics

    self._apply = pmap(loop.device_step(apply, seed), donate_argnums=(0,))

  def _run(self, name: str, *args) -> Any:
    """`name` on every device, through its executable for these shapes (AOT, timed)."""
    x = args[2] if name != "loss" else args[0]
    key = (name, tuple(np.shape(x)[1:]))
    exe = self.compiled.get(key)
    if exe is None:
      t = time.perf_counter()
      exe = self._fns[name].lower(*args).compile()
      self.compile_s += time.perf_counter() - t
      self.compiled[key] = exe
    return exe(*args)

  def _groups(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(stacked [n, 1, H, W, 3] images, [n] mask) per distinct shape, in first-seen order.

    A device whose image has another shape gets a copy of the group's first image (a
    real image: a zero image can have a zero embedding, where the l2 normalisation's
    gradient is NaN, and NaN x 0 is not 0); it is masked out of the results."""
    out = []
    for shape in dict.fromkeys(img.shape for img in images):
      self.shapes.add(tuple(shape[:2]))
      mask = np.array([img.shape == shape for img in images])
      filler = images[int(np.argmax(mask))]
      x = np.stack([img if ok else filler for img, ok in zip(images, mask)])[:, None]
      out.append((x, mask))
    return out

  def accumulate(self, state: TrainState, blocks: list[list[tuple]]
                 ) -> tuple[Any, jax.Array, jax.Array]:
    """Sums the gradients of every device's block of triplets (in order).

    `blocks[d]`: device d's triplets (all blocks of equal length). Returns the per-device
    (replicated-layout) gradient sums, summed losses and active-triplet counts.
    """
    params, bstats = state.params, state.batch_stats
    n = len(self.devices)
    acc = self._zeros(params)
    loss_sum = active_sum = None
    for r in range(len(blocks[0])):
      groups, embs = [], []
      for k in range(3):
        g = self._groups([np.asarray(blocks[d][r][k], np.float32) for d in range(n)])
        e = None
        for x, mask in g:
          out = self._run("embed", params, bstats, x)
          e = out if e is None else jnp.where(mask[:, None], out, e)
        groups.append(g)
        embs.append(e)
      loss, active, *cots = self._run("loss", *embs)
      loss_sum = loss if loss_sum is None else loss_sum + loss
      active_sum = active if active_sum is None else active_sum + active
      for g, cot in zip(groups, cots):
        for x, mask in g:
          c = cot if mask.all() else cot * mask[:, None].astype(np.float32)
          acc = self._run("grad", params, bstats, x, c, acc)
    return acc, loss_sum, active_sum

  def __call__(self, state: TrainState, window: dict, steps: np.ndarray
               ) -> tuple[TrainState, dict]:
    triplets = window["triplets"]
    n = len(self.devices)
    if not triplets or len(triplets) % n:
      raise ValueError(f"{len(triplets)} triplets on this process do not split over {n} "
                       "local devices; change config.ranking.triplets_per_update")
    per = len(triplets) // n
    t0 = time.perf_counter()
    compile_before = self.compile_s
    acc, losses, actives = self.accumulate(
        state, [triplets[d * per:(d + 1) * per] for d in range(n)])
    state, metrics = self._apply(state, {"grads": acc, "loss": losses, "active": actives},
                                 steps)
    metrics = dict(metrics, compiled_shapes=float(len(self.shapes)),
                   compile_s=self.compile_s - compile_before,
                   mining_s=float(window.get("mining_s", 0.0)),
                   step_s=time.perf_counter() - t0)
    return state, metrics


def padded_step(state: TrainState, batch: dict, rng: jax.Array, *, embed_fn: Callable,
                margin: float) -> tuple[TrainState, dict]:
  """The comparison step: the window's triplets as padded fixed-size batches, one
  pmapped step (the mean loss over the device's triplets, gradients averaged)."""
  del rng

  def loss_fn(params):
    v = {"params": params, "batch_stats": state.batch_stats}
    q, p, n = (embed_fn(v, batch[k]) for k in ("anchor", "positive", "negative"))
    per = jax.vmap(lambda a, b, c: triplet_loss(a, b, c, margin))(q, p, n)
    return jnp.mean(per), jnp.mean((per > 0).astype(jnp.float32))

  (loss, active), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new = state.apply_gradients(grads=grads)
  return new, jax.lax.pmean({"loss": loss, "active": active,
                             "grad_norm": optax.global_norm(grads)}, AXIS)
