"""DaRe and TriNet training on the shared core: a PK batch, one forward pass, the
multi-exit batch-hard triplet loss (DaRe §3.2; TriNet is the single-exit case).

Data flows one way: tfds source -> grain PK sampler/augment -> pmapped train step ->
orbax checkpoint -> evaluator. Re-running the same command resumes from the newest
checkpoint (state, data-iterator position; all randomness derives from seed and step).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from reid_jax.core import embedding, evaluators, experiment, loop, optim, parallel
from reid_jax.core import state as state_lib
from reid_jax.core import video
from reid_jax.core.state import TrainState
from reid_jax.data import pipeline, sources
from reid_jax.methods.dare import loss as loss_lib
from reid_jax.models import build_model
from reid_jax.models.temporal import temporal_pool
from reid_jax.pretrained import load_configured

AXIS = parallel.AXIS


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
  variables = state_lib.run_once(functools.partial(model.init, train=False), rng, x)
  variables = load_configured(variables, config.model,
                              truncated=config.model.get("num_stages", 4) < 4)
  tx = optim.make_optimizer(config.optimizer, config.train.steps, variables["params"])
  return state_lib.create(model.apply, variables, tx)


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], rng: jax.Array = None, *,
               model, config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimisation step on this device's slice of the global batch (inside pmap).

  Gradients are averaged over devices. With `config.loss.mining == "global"` every
  device gathers the whole global batch and mines triplets over it (identical loss on
  every device; the all_gather transpose routes each device its share of the gradient,
  so the averaged gradient is that of the global-batch loss, exactly as on one device).
  `rng` is unused (the model has no dropout); the core loop passes every step one.
  Video training (config.input.video.T = T): `image` holds the slice's tracklets x T
  frames, `person_id` one id per tracklet; every exit's frame embeddings are pooled
  per tracklet (config.model.temporal_pool) and the triplets are mined over tracklets.
  """
  del rng
  frames = max(video.frames(config), 1)
  mode = video.pool_mode(config)

  def compute_loss(params):
    outputs, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    batch["image"], train=True, mutable=["batch_stats"])
    outputs = {k: temporal_pool(v.astype(jnp.float32), frames, mode)
               for k, v in outputs.items()}
    loss_batch = batch
    if config.loss.mining == "global":
      gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True)
      outputs = jax.tree_util.tree_map(gather, outputs)
      loss_batch = jax.tree_util.tree_map(gather, batch)
    loss, metrics = loss_lib.multi_exit_triplet_loss(outputs, loss_batch, config.loss)
    return loss, (new_vars["batch_stats"], metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  batch_stats = jax.lax.pmean(batch_stats, AXIS)  # no-op when BN is already synchronised
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  return new_state, jax.lax.pmean(metrics, AXIS)


def make_train_iterator(config: ml_collections.ConfigDict):
  """The grain PK iterator (video: P ids x K tracklets x T frames) over this process's
  slice of every global batch."""
  source = sources.open_split(config.dataset, config.dataset.train_split)
  sampling = (video.loader_kwargs(config) if video.frames(config)
              else dict(P=config.input.P, K=config.input.K))
  return pipeline.train_loader(
      source, **sampling, height=config.input.height,
      width=config.input.width, augment=config.input.augment,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.input.worker_count)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks this family's settings before any work (one line each, naming the field)."""
  if config.loss.name not in loss_lib.LOSSES:
    raise ValueError(f"config.loss.name={config.loss.name!r}: method {config.method} "
                     f"trains {', '.join(loss_lib.LOSSES)}")
  if config.loss.mining not in loss_lib.MINING:
    raise ValueError(f"config.loss.mining={config.loss.mining!r}: use 'global' or 'device'")
  loss_lib.parse_margin(config.loss.margin)
  embedding.check_tta(config.eval.tta)
  evaluators.protocol_names(config.eval.get("protocol", "market"))
  video.validate(config)
  parallel.check_divisible(config.input.P * config.input.K, "config.input.P*K")


def make_embedder(config: ml_collections.ConfigDict, max_stage: int | None = None
                  ) -> embedding.Embedder:
  """images -> {exit: embedding} (stage1..4 + fused for DaRe, final for TriNet)."""
  model = eval_model(config)

  def embed(variables, images):
    out = model.apply(variables, images, train=False, max_stage=max_stage)
    return {k: v for k, v in out.items() if k != "logits"}
  return embed


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = ""):
  """(q_embs, q_labels, g_embs, g_labels) for every exit."""
  tta = embedding.check_tta(tta, "--tta")
  embed = embedding.with_tta(make_embedder(config), tta,
                             (config.input.height, config.input.width))
  return evaluators.embed_query_gallery(config, embed, variables, tta)


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None) -> dict:
  """Embeds query and gallery with `variables` and ranks every exit."""
  embedded = embedded or embed_query_gallery(config, variables, tta)
  return evaluators.evaluate_embeddings(config, embedded, step=step, rerank=rerank,
                                        tta=embedding.check_tta(tta))


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores {'params', 'batch_stats'} of checkpoint `step` (default: newest)."""
  # The checkpoint holds every weight: build the template without reading the
  # ImageNet file (faster, and the run still evaluates if that file has moved).
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = "none"
  template = create_train_state(jax.random.key(0), config)
  return experiment.restore_variables(loop.stage_dir(workdir), template, step)


def stages(config: ml_collections.ConfigDict) -> list[loop.Stage]:
  """DaRe/TriNet train in one stage: PK batches, the multi-exit triplet step."""
  return [loop.Stage(
      name="", fit_cfg=loop.FitConfig.from_config(config),
      init_state=lambda previous: create_train_state(jax.random.key(config.seed), config),
      step_fn=functools.partial(train_step, model=training_model(config), config=config),
      make_iterator=lambda: make_train_iterator(config),
      prepare_batch=lambda b, step: {k: b[k] for k in ("image", "person_id")},
      examples_per_step=config.input.P * config.input.K * max(video.frames(config), 1))]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Trains for config.train.steps (resuming if possible); returns the final eval results.

  `step_callback(step)` runs after every step (tests use it to simulate a crash).
  """
  workdir = os.path.abspath(workdir)
  validate(config)
  plan = stages(config)
  experiment.check_workdir_config(config, workdir)
  experiment.save_workdir_config(config, workdir)
  writer = experiment.make_writer(workdir, config.train.steps)
  evaluate_fn = lambda variables, step: evaluate_variables(
      config, variables, step, rerank=config.eval.rerank, tta=config.eval.tta)
  final = loop.run_stages(
      plan, workdir, writer, step_callback=step_callback,
      evaluate_fn=lambda stage, host, step: experiment.evaluate_and_log(
          evaluate_fn, state_lib.variables(host), step, writer))
  results = None
  if evaluate_at_end:
    results = experiment.evaluate_and_log(evaluate_fn, state_lib.variables(final),
                                          config.train.steps, writer, workdir)
  writer.close()
  return results
