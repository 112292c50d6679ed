"""Trains a re-ID model: `python -m reid_jax.train --config=configs/dare.py --workdir=DIR`.

Data flows one way: tfds source -> grain sampler/augment -> pmapped train step ->
orbax checkpoint -> evaluator. Re-running the same command resumes from the newest
checkpoint (state, data-iterator position; all randomness derives from seed and step).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from reid_jax import checkpoint as ckpt_lib
from reid_jax import methods, optim, writer as writer_lib
from reid_jax.data import pipeline, sources
from reid_jax.models import build_model
from reid_jax.pretrained import load_pretrained

AXIS = "batch"


class TrainState(train_state.TrainState):
  batch_stats: Any


def training_model(config: ml_collections.ConfigDict):
  """The model with BatchNorm synchronised over the pmap axis when config.train.sync_bn."""
  mcfg = ml_collections.ConfigDict(config.model.to_dict())
  mcfg.bn_axis_name = AXIS if config.train.sync_bn else None
  return build_model(mcfg)


def eval_model(config: ml_collections.ConfigDict):
  """The same model for inference (no collectives, so it runs on any device subset)."""
  mcfg = ml_collections.ConfigDict(config.model.to_dict())
  mcfg.bn_axis_name = None
  return build_model(mcfg)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict) -> TrainState:
  """Initialises variables (on the host, outside pmap) and the optimiser state."""
  model = eval_model(config)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if config.model.pretrained:
    variables = load_pretrained(variables, config.model.pretrained, config.model.backbone,
                                truncated=config.model.get("num_stages", 4) < 4)
  tx = optim.make_optimizer(config.optimizer, config.train.steps)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *, model, loss_fn: Callable,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimisation step on this device's slice of the global batch (inside pmap).

  Gradients are averaged over devices. With `config.loss.mining == "global"` every
  device gathers the whole global batch and mines triplets over it (identical loss on
  every device; the all_gather transpose routes each device its share of the gradient,
  so the averaged gradient is that of the global-batch loss, exactly as on one device).
  """
  def compute_loss(params):
    outputs, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    batch["image"], train=True, mutable=["batch_stats"])
    outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}
    loss_batch = batch
    if config.loss.mining == "global":
      gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True)
      outputs = jax.tree_util.tree_map(gather, outputs)
      loss_batch = jax.tree_util.tree_map(gather, batch)
    elif config.loss.mining != "device":
      raise ValueError(f"config.loss.mining={config.loss.mining!r}: use 'global' or 'device'")
    loss, metrics = loss_fn(outputs, loss_batch, config.loss)
    return loss, (new_vars["batch_stats"], metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  batch_stats = jax.lax.pmean(batch_stats, AXIS)  # no-op when BN is already synchronised
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  return new_state, jax.lax.pmean(metrics, AXIS)


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmapped pytree, as host numpy arrays.

  (flax.jax_utils.unreplicate keeps the device axis when pmap ran on one device.)
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return x
  return jax.tree_util.tree_map(first, tree)


def shard(batch: dict[str, np.ndarray], n_devices: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [n_devices, B // n_devices, ...] for pmap."""
  def split(x):
    if x.shape[0] % n_devices:
      raise ValueError(f"per-process batch {x.shape[0]} is not divisible by {n_devices} "
                       "local devices; change config.input.P/K")
    return x.reshape((n_devices, x.shape[0] // n_devices) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run whose model/data/loss differ from the saved config."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in ("dataset", "model", "loss", "input"):
      if old.get(key) != new.get(key):
        raise ValueError(
            f"{workdir} holds a run with a different config.{key} (see {path}); use a new "
            "--workdir or the same config to resume")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(new, f, indent=2)


def make_train_iterator(config: ml_collections.ConfigDict):
  """The grain PK iterator over this process's slice of every global batch."""
  source = sources.open_split(config.dataset, config.dataset.train_split)
  return pipeline.train_loader(
      source, P=config.input.P, K=config.input.K, height=config.input.height,
      width=config.input.width, augment=config.input.augment,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.input.worker_count)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Trains for config.train.steps (resuming if possible); returns the final eval results.

  `step_callback(step)` runs after every step (tests use it to simulate a crash).
  """
  workdir = os.path.abspath(workdir)
  _check_workdir_config(config, workdir)
  is_main = jax.process_index() == 0
  n_local = jax.local_device_count()
  global_batch = config.input.P * config.input.K
  if global_batch % jax.device_count():
    raise ValueError(f"global batch P*K={global_batch} is not divisible by "
                     f"{jax.device_count()} devices; change config.input.P or K")

  rng = jax.random.key(config.seed)
  state = create_train_state(rng, config)
  train_iter = make_train_iterator(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=config.train.keep_checkpoints,
                               every=config.train.checkpoint_every)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state, train_iter)
    logging.info("resumed from step %d", start)
    if is_main:
      print(f"Resuming from checkpoint step {start} in {workdir}", flush=True)

  model = training_model(config)
  loss_fn = methods.get_loss(config.loss.name)
  p_train_step = jax.pmap(
      functools.partial(train_step, model=model, loss_fn=loss_fn, config=config),
      axis_name=AXIS, donate_argnums=(0,))
  state = jax_utils.replicate(state)
  writer = writer_lib.MetricWriter(workdir, config.train.steps, enabled=is_main)
  writer.start(start)
  lr_fn = optim.exponential_decay_after(config.optimizer.lr, config.optimizer.end_lr,
                                        config.optimizer.decay_start, config.train.steps)
  pending, t_last, s_last = [], time.time(), start
  results = None
  for step in range(start + 1, config.train.steps + 1):
    batch = next(train_iter)
    batch = {k: batch[k] for k in ("image", "person_id")}
    state, metrics = p_train_step(state, shard(batch, n_local))
    pending.append(metrics)
    if step % config.train.log_every == 0 or step == config.train.steps:
      host = [unreplicate(m) for m in pending]
      scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      scalars["lr"] = float(lr_fn(step))
      now = time.time()
      ips = (step - s_last) * global_batch / max(now - t_last, 1e-9)
      scalars["images_per_s"] = ips
      writer.write(step, scalars, prefix="train/")
      writer.progress(step, ips, scalars)
      pending, t_last, s_last = [], now, step
    if config.train.checkpoint_every and (step % config.train.checkpoint_every == 0
                                          or step == config.train.steps):
      ckpt.save(step, unreplicate(state), train_iter,
                force=step == config.train.steps)
    if (config.train.eval_every and step % config.train.eval_every == 0
        and step != config.train.steps):
      _periodic_eval(config, workdir, state, step, writer)
    if step_callback is not None:
      step_callback(step)
  ckpt.close()
  final = unreplicate(state)
  if evaluate_at_end:
    results = _periodic_eval(config, workdir, final, config.train.steps, writer,
                             replicated=False, write_json=True)
  writer.close()
  return results


def _periodic_eval(config, workdir, state, step, writer, replicated=True, write_json=False):
  """Evaluates every exit on query/gallery (process 0) and logs mAP and rank-1."""
  from reid_jax import evaluate as eval_lib
  if jax.process_index() != 0:
    return None
  if replicated:
    state = unreplicate(state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  results = eval_lib.evaluate_variables(config, variables, step=step,
                                        rerank=config.eval.rerank, tta=config.eval.tta)
  for exit_name, m in results["exits"].items():
    writer.write(step, {k: v for k, v in m.items() if isinstance(v, float)},
                 prefix=f"eval/{exit_name}/")
  print(eval_lib.format_table(results), flush=True)
  if write_json:
    eval_lib.write_results(results, workdir)
  return results


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dare.py:synthetic",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and eval results.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-host runs (SLURM/TPU auto-detect "
                      "when unset; see launch/).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_bool("eval_at_end", True, "Evaluate the final model and write eval_results.json.")


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize() when launched as one of several processes."""
  if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
    # CPU-only multi-process runs (tests, debugging) need gloo for cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get(
      "REID_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()  # SLURM / Cloud TPU: auto-detected.


def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (checkpoints, logs and eval results go there)")
  maybe_initialize_distributed()
  logging.info("JAX processes %d, devices %d (local %d)", jax.process_count(),
               jax.device_count(), jax.local_device_count())
  train_and_evaluate(FLAGS.config, FLAGS.workdir, evaluate_at_end=FLAGS.eval_at_end)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
