"""The one training loop every method runs: `fit` steps a state from a start to a stop.

A method hands `fit` a per-device step function `step_fn(state, batch, rng) -> (state,
metrics)` (pmapped here over the local devices with axis `parallel.AXIS`), an iterator
of host batches and how to turn one into the step's inputs. `fit` restores the newest
checkpoint of its folder (state and iterator position), runs the remaining steps, logs,
evaluates periodically, saves every `checkpoint_every` steps and always at the end, and
returns the final state. The step's random key is `fold_in(key(seed), step)` (folded
again with the device index inside `step_fn` if the method wants per-device keys), so a
resumed run draws exactly the keys an uninterrupted one does.

A method with several stages runs one `fit` per stage, each in its own checkpoint
folder (`stage_dir`); a finished stage is restored, not trained again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.core import optim, parallel
from reid_jax.core.checkpoint import Checkpointer
from reid_jax.core.state import TrainState
from reid_jax.core.writer import MetricWriter

StepFn = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
CustomStep = Callable[[TrainState, Any, np.ndarray], tuple[TrainState, dict]]


class TrainingDiverged(RuntimeError):
  """A loss or gradient norm became NaN or infinite; no such state is ever saved."""


NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass
class FitConfig:
  """What `fit` needs of `config.train` (and the seed)."""
  steps: int
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0          # 0 = only at the end (done by the method)
  checkpoint_every: int = 1000  # 0 = only at the end
  keep_checkpoints: int = 3
  nan_policy: str = "stop"     # or "skip": drop non-finite updates, up to nan_skip_limit
  nan_skip_limit: int = 10

  @classmethod
  def from_config(cls, config, steps: int | None = None) -> "FitConfig":
    t = config.train
    steps = int(t.steps if steps is None else steps)
    if steps < 1:
      raise ValueError(f"config.train.steps={steps}: must be at least 1")
    for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if int(t[field]) < (1 if field in ("log_every", "keep_checkpoints") else 0):
        raise ValueError(f"config.train.{field}={t[field]}: must be "
                         f"{'positive' if field in ('log_every', 'keep_checkpoints') else '>= 0'}")
    policy = t.get("nan_policy", "stop")
    if policy not in NAN_POLICIES:
      raise ValueError(f"config.train.nan_policy={policy!r}: use 'stop' (end the run at a "
                       "non-finite loss) or 'skip' (drop that update)")
    limit = int(t.get("nan_skip_limit", 10))
    if limit < 0:
      raise ValueError(f"config.train.nan_skip_limit={limit}: must be >= 0")
    return cls(steps=steps, seed=int(config.seed),
               log_every=int(t.log_every), eval_every=int(t.eval_every),
               checkpoint_every=int(t.checkpoint_every),
               keep_checkpoints=int(t.keep_checkpoints), nan_policy=policy,
               nan_skip_limit=limit)


def stage_dir(workdir: str, stage: str | None = None) -> str:
  """Checkpoint folder of a stage: `workdir/checkpoints` for single-stage methods,
  `workdir/checkpoints/<stage>` for each stage of a multi-stage method."""
  base = os.path.join(os.path.abspath(workdir), "checkpoints")
  return os.path.join(base, stage) if stage else base


def step_key(seed: int, step: int) -> jax.Array:
  """The (raw uint32) random key of optimisation step `step` (1-based), the same after
  a resume."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def finite_guard(step_fn: StepFn) -> StepFn:
  """`step_fn` that keeps the old state when the update is not finite.

  A step whose loss metrics or new parameters hold a NaN or inf (on any device) returns
  its input state unchanged, so a non-finite state never exists to be saved; its
  metrics gain `nonfinite` (1.0 for such a step). Finite steps are untouched, bit for bit.
  """
  def step(state, batch, rng):
    new, metrics = step_fn(state, batch, rng)
    leaves = [x for x in jax.tree_util.tree_leaves((new.params, metrics))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    ok = jax.lax.pmin(ok.astype(jnp.int32), parallel.AXIS) > 0  # every device agrees
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, dict(metrics, nonfinite=1.0 - ok.astype(jnp.float32))
  return step


def device_step(step_fn: StepFn, seed: int) -> Callable:
  """(state, batch, step number) -> guarded `step_fn` with the step's key, per device.

  The key is folded from the step number inside the compiled step, so the host loop
  never waits on the device for it (an eager fold_in read back every step would queue
  behind the running step and stall the next dispatch).
  """
  guarded = finite_guard(step_fn)
  return lambda state, batch, step: guarded(state, batch, step_key(seed, step))


def _last_good(last_good: int | None, ckpt_dir: str) -> str:
  return (f"the last good checkpoint is step {last_good} in {ckpt_dir}" if last_good
          else "no checkpoint was saved")


def _host_metrics(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  return [(step, {k: float(np.mean(v)) for k, v in parallel.unreplicate(m).items()})
          for step, m in pending]


def _summarise(host: list[tuple[int, dict]], cfg: FitConfig, skipped_before: int,
               last_good: int | None, ckpt_dir: str) -> tuple[dict[str, float], int]:
  """(mean metrics of the finite steps, skipped-step total); raises TrainingDiverged
  at a non-finite step under nan_policy='stop', or past the skip limit under 'skip'."""
  bad = [(step, m) for step, m in host if m["nonfinite"]]
  if bad and cfg.nan_policy == "stop":
    step, m = bad[0]
    names = sorted(k for k, v in m.items() if not np.isfinite(v)) or [
        "the update (parameters, or a loss on another device)"]
    raise TrainingDiverged(
        f"training diverged at step {step}: {', '.join(names)} not finite (the update was "
        f"not applied and nothing non-finite was saved; {_last_good(last_good, ckpt_dir)}); "
        "lower the learning rate and re-run, or set --config.train.nan_policy=skip")
  skipped = skipped_before + len(bad)
  if skipped > cfg.nan_skip_limit:
    raise TrainingDiverged(
        f"training diverged: {skipped} non-finite updates skipped by step {bad[-1][0]}, "
        f"more than config.train.nan_skip_limit={cfg.nan_skip_limit} "
        f"({_last_good(last_good, ckpt_dir)}); lower the learning rate and re-run")
  good = [m for _, m in host if not m["nonfinite"]]
  keys = [k for k in host[0][1] if k != "nonfinite"]
  scalars = {k: float(np.mean([m[k] for m in good])) if good else float("nan")
             for k in keys}
  if cfg.nan_policy == "skip":
    scalars["skipped_steps"] = float(skipped)
  return scalars, skipped


def fit(state: TrainState, step_fn: StepFn, train_iter: Iterator[dict], *,
        ckpt_dir: str, cfg: FitConfig, prepare_batch: Callable[[dict, int], dict],
        examples_per_step: int, writer: MetricWriter, log_prefix: str = "train/",
        evaluate_fn: Callable[[TrainState, int], Any] | None = None,
        step_callback: Callable[[int], None] | None = None,
        donate: bool = True, custom_step: CustomStep | None = None,
        before_batch: Callable[[TrainState, int], None] | None = None) -> TrainState:
  """Trains `state` (a fresh host state, the template for restoring) to `cfg.steps`.

  `prepare_batch(host_batch, step)` selects and converts what `step_fn` reads (e.g.
  identity labels) before sharding. `evaluate_fn(host_state, step)` runs every
  `cfg.eval_every` steps (not at the last one: the method evaluates the final model).
  `step_callback(step)` runs after every step (tests simulate a crash with it).

  `custom_step(state, host_batch, steps)` replaces the pmapped `step_fn` for a method
  whose update cannot be one compiled function (inputs of varying shapes): it gets the
  replicated state, the unsharded host batch and `np.full(n_local, step)`, and returns
  the replicated state and per-device metrics holding `nonfinite` (build its final
  update with `device_step`, which adds the guard). `before_batch(state, step)` runs
  before each batch is drawn, with the current replicated state, for samplers that
  depend on the model (hard-triplet mining, clustering rounds).
  Returns the final state on the host (unreplicated).
  """
  is_main = jax.process_index() == 0
  n_local = jax.local_device_count()
  ckpt = Checkpointer(ckpt_dir, keep=max(cfg.keep_checkpoints, 1))
  state, start = ckpt.restore_newest_readable(state, train_iter)
  start = start or 0
  if start:
    if is_main:
      print(f"Resuming from checkpoint step {start} in {ckpt_dir}", flush=True)
  if start >= cfg.steps:
    ckpt.close()
    return state

  p_step = custom_step or jax.pmap(device_step(step_fn, cfg.seed), axis_name=parallel.AXIS,
                    donate_argnums=(0,) if donate else ())
  state = parallel.replicate(state)
  writer.total = cfg.steps  # progress and ETA of this stage
  writer.start(start)
  pending: list[tuple[int, dict]] = []
  t_last, s_last = time.time(), start
  last_saved = start or None
  skipped = 0
  for step in range(start + 1, cfg.steps + 1):
    if before_batch is not None:
      before_batch(state, step)
    batch = prepare_batch(next(train_iter), step)
    if custom_step is None:
      batch = parallel.shard(batch, n_local)
    state, metrics = p_step(state, batch, np.full(n_local, step, np.int32))
    pending.append((step, metrics))
    last = step == cfg.steps
    save = last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    if pending and (save or step % cfg.log_every == 0 or last):
      scalars, skipped = _summarise(_host_metrics(pending), cfg, skipped, last_saved,
                                    ckpt_dir)
      scalars.update(optim.current_learning_rates(parallel.unreplicate(state.opt_state)))
      now = time.time()
      ips = (step - s_last) * examples_per_step / max(now - t_last, 1e-9)
      scalars["images_per_s"] = ips
      writer.write(step, scalars, prefix=log_prefix)
      writer.progress(step, ips, scalars)
      pending, t_last, s_last = [], now, step
    if save:
      ckpt.save(step, parallel.unreplicate(state), train_iter)
      last_saved = step
    if evaluate_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and not last:
      evaluate_fn(parallel.unreplicate(state), step)
    if step_callback is not None:
      step_callback(step)
  ckpt.close()
  return parallel.unreplicate(state)


@dataclasses.dataclass
class Stage:
  """One training stage of a method: what `fit` needs, built lazily.

  `init_state(previous)` returns the stage's fresh host state (the restore template)
  from the previous stage's final state (None for the first stage); `make_iterator()`
  opens the stage's data stream. `name` is '' for a single-stage method (checkpoints in
  `workdir/checkpoints`) or the stage's folder name under it.
  """
  name: str
  fit_cfg: FitConfig
  init_state: Callable[[TrainState | None], TrainState]
  step_fn: StepFn
  make_iterator: Callable[[], Iterator[dict]]
  prepare_batch: Callable[[dict, int], dict]
  examples_per_step: int
  custom_step: CustomStep | None = None   # see `fit`
  before_batch: Callable[[TrainState, int], None] | None = None


def run_stages(stages: list[Stage], workdir: str, writer: MetricWriter, *,
               evaluate_fn: Callable[[Stage, TrainState, int], Any] | None = None,
               step_callback: Callable[[int], None] | None = None,
               stage_end: Callable[[Stage, TrainState], None] | None = None) -> TrainState:
  """Runs `fit` for each stage in order; a finished stage is restored, not retrained,
  so a re-run after a kill anywhere (inside or between stages) continues exactly.
  `stage_end(stage, host_state)` runs after each stage (also when it was restored)."""
  state = None
  for stage in stages:
    train_iter = stage.make_iterator()  # data errors (e.g. too few identities) come first
    template = stage.init_state(state)
    periodic = None
    if evaluate_fn is not None:
      periodic = lambda host, step, stage=stage: evaluate_fn(stage, host, step)
    state = fit(template, stage.step_fn, train_iter,
                ckpt_dir=stage_dir(workdir, stage.name or None), cfg=stage.fit_cfg,
                prepare_batch=stage.prepare_batch,
                examples_per_step=stage.examples_per_step, writer=writer,
                log_prefix=f"train/{stage.name + '/' if stage.name else ''}",
                evaluate_fn=periodic, step_callback=step_callback,
                custom_step=stage.custom_step, before_batch=stage.before_batch)
    if stage_end is not None:
      stage_end(stage, state)
  return state
