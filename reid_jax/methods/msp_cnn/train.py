"""MSP-CNN (Chen et al., ACM MM 2017) on the shared core: a small inception network
(`model.JSTLNet`) trained from scratch on Siamese pairs (negatives : positives = 2 : 1,
`data.samplers.PairSampler`) through one shared network, with similarity at two levels:

  stage "similarity"  softmax identity loss on both images + a Euclidean (contrastive)
                      loss on the l2-normalised FC7 features of the pair
  stage "ncc"         the same plus the normalized cross-correlation loss on the two
                      Pool1 maps (`ncc.ncc_loss`), from stage 1's weights

At test time one image goes through the network; its l2-normalised FC7 is the descriptor.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reid_jax.core import embedding, evaluators, experiment, loop, optim, parallel
from reid_jax.core import state as state_lib
from reid_jax.core.state import TrainState
from reid_jax.data import identities, pipeline, sources
from reid_jax.losses.classification import cross_entropy, top1
from reid_jax.methods.msp_cnn import ncc
from reid_jax.methods.msp_cnn.model import JSTLNet
from reid_jax.models.layers import l2_normalize
from reid_jax.models.reid_model import DTYPES

AXIS = parallel.AXIS
EXIT = "msp_cnn"


# ----------------------------------------------------------------------------- model


def build_model(config: ml_collections.ConfigDict, classes: int, train: bool = False
                ) -> JSTLNet:
  """The JSTL network; BatchNorm statistics averaged over devices when training."""
  m = config.model
  return JSTLNet(num_classes=classes, conv_channels=tuple(m.conv_channels),
                 inception_channels=tuple(m.inception_channels), fc_dim=m.fc_dim,
                 dropout=m.dropout, dtype=DTYPES[m.dtype],
                 bn_axis_name=AXIS if (train and config.train.sync_bn) else None)


def init_variables(rng: jax.Array, config: ml_collections.ConfigDict, classes: int) -> dict:
  """Random init on the host (MSP-CNN trains from scratch: no ImageNet weights)."""
  model = build_model(config, classes)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  return state_lib.run_once(functools.partial(model.init, train=False),
                            {"params": rng, "dropout": rng}, x)


def create_train_state(variables: dict, config: ml_collections.ConfigDict, classes: int,
                       steps: int, opt_cfg: ml_collections.ConfigDict) -> TrainState:
  model = build_model(config, classes)
  tx = optim.make_optimizer(opt_cfg, steps, variables["params"])
  return state_lib.create(model.apply, variables, tx)


# ----------------------------------------------------------------------------- loss


def contrastive_loss(fa: jnp.ndarray, fb: jnp.ndarray, same: jnp.ndarray, margin: float
                     ) -> jnp.ndarray:
  """Mean of y d^2 + (1 - y) max(0, margin - d)^2 over pairs, d = |fa - fb| of the
  l2-normalised features (Hadsell, Chopra & LeCun 2006)."""
  d = jnp.sqrt(jnp.maximum(jnp.sum((l2_normalize(fa) - l2_normalize(fb)) ** 2, -1), 1e-12))
  y = same.astype(jnp.float32)
  return jnp.mean(y * d ** 2 + (1.0 - y) * jnp.maximum(margin - d, 0.0) ** 2)


def pair_loss(out: dict, batch: dict, loss_cfg: ml_collections.ConfigDict, use_ncc: bool
              ) -> tuple[jnp.ndarray, dict]:
  """Softmax on both images + Euclidean on FC7 (+ NCC on Pool1 in stage 2)."""
  b = batch["same"].shape[0]
  labels = jnp.concatenate([batch["label"], batch["label_b"]])
  ident = cross_entropy(out["logits"], labels)
  euclid = contrastive_loss(out["fc7"][:b], out["fc7"][b:], batch["same"],
                            loss_cfg.euclid_margin)
  loss = loss_cfg.id_weight * ident + loss_cfg.euclid_weight * euclid
  metrics = {"id_loss": ident, "euclid_loss": euclid, "top1": top1(out["logits"], labels)}
  if use_ncc:
    low, ncc_metrics = ncc.ncc_loss(out["pool1"][:b], out["pool1"][b:], batch["same"],
                                    patch=loss_cfg.ncc_patch, row_radius=loss_cfg.ncc_row_radius,
                                    eps=loss_cfg.ncc_eps, margin=loss_cfg.ncc_margin)
    loss = loss + loss_cfg.ncc_weight * low
    metrics.update({"ncc_loss": low}, **{f"ncc_{k}": v for k, v in ncc_metrics.items()})
  return loss, metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model, config,
               use_ncc: bool) -> tuple[TrainState, dict]:
  """One SGD step on this device's pairs (inside pmap); dropout keys differ per device."""
  images = jnp.concatenate([batch["image_a"], batch["image_b"]])
  return state_lib.loss_step(state, images, rng,
                             lambda out: pair_loss(out, batch, config.loss, use_ncc),
                             model=model, axis_name=AXIS)


# ----------------------------------------------------------------------------- data


def make_train_iterator(config: ml_collections.ConfigDict):
  """The grain iterator of Siamese pairs over this process's slice of every batch."""
  source = sources.open_split(config.dataset, config.dataset.train_split)
  inp = config.input
  return pipeline.train_loader(
      source, sampler="pairs", batch_size=inp.batch_size, neg_per_pos=inp.neg_per_pos,
      height=inp.height, width=inp.width, augment=inp.augment, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=inp.worker_count)


class BatchPreparer:
  """Host pair batch -> the step's inputs (class labels from the training identities)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.ids = identities.train_identities(config.dataset)

  def __call__(self, b: dict, step: int) -> dict:
    del step
    return {"image_a": b["image_a"], "image_b": b["image_b"],
            "label": identities.class_labels(self.ids, b["person_id_a"]),
            "label_b": identities.class_labels(self.ids, b["person_id_b"]),
            "same": b["same"].astype(np.int32)}


# ----------------------------------------------------------------------------- embedding


def make_embedder(config: ml_collections.ConfigDict, tta: str = "",
                  classes: int | None = None) -> embedding.Embedder:
  """jitted images -> {'msp_cnn': l2-normalised FC7} (TTA views summed first)."""
  model = build_model(config, classes or identities.num_classes(config))
  tta = embedding.check_tta(tta, "--tta")

  @jax.jit
  def embed(variables, images):
    views = embedding.tta_views(images, tta, (config.input.height, config.input.width))
    summed = sum(model.apply(variables, v, train=False)["fc7"] for v in views)
    return {EXIT: l2_normalize(summed)}
  return embed


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = ""):
  tta = embedding.check_tta(tta, "--tta")
  return evaluators.embed_query_gallery(config, make_embedder(config, tta), variables, tta)


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None) -> dict:
  tta = embedding.check_tta(tta, "--tta")
  if embedded is None:
    embedded = embed_query_gallery(config, variables, tta)
  return evaluators.evaluate_embeddings(config, embedded, step=step, rerank=rerank, tta=tta)


# ----------------------------------------------------------------------------- stages


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """'similarity' (softmax + Euclidean), then 'ncc' when config.train.ncc_steps > 0."""
  return ["similarity"] + (["ncc"] if config.train.ncc_steps > 0 else [])


def _stage_optimizer(config: ml_collections.ConfigDict, stage: str):
  if stage != "ncc":
    return config.optimizer
  c = ml_collections.ConfigDict(config.optimizer.to_dict())
  c.lr = config.optimizer.ncc_lr
  c.decay_steps = tuple(config.optimizer.get("ncc_decay_steps", ()))
  return c


def _stage_steps(config: ml_collections.ConfigDict, stage: str) -> int:
  return int(config.train.ncc_steps if stage == "ncc" else config.train.steps)


def validate(config: ml_collections.ConfigDict) -> None:
  """This family's settings, checked before any work (one line each, naming the field)."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use float32 or bfloat16")
  if not 0.0 <= config.model.dropout < 1.0:
    raise ValueError(f"config.model.dropout={config.model.dropout}: must be in [0, 1)")
  n = len(config.model.inception_channels)
  if n < 2 or n % 2 or not config.model.conv_channels:
    raise ValueError(f"config.model.inception_channels={tuple(config.model.inception_channels)}: "
                     "needs pairs of (size-keeping 'a', halving 'b') modules, 6 in the JSTL "
                     "network; config.model.conv_channels at least one value")
  if config.input.neg_per_pos < 0:
    raise ValueError(f"config.input.neg_per_pos={config.input.neg_per_pos}: must be >= 0")
  if config.input.augment.resize_scale < 1:
    raise ValueError(f"config.input.augment.resize_scale={config.input.augment.resize_scale}: "
                     "the random crop (config.input.height x width) must fit in the resized "
                     "image, so the scale must be >= 1")
  if config.train.ncc_steps < 0:
    raise ValueError(f"config.train.ncc_steps={config.train.ncc_steps}: must be >= 0")
  if config.train.ncc_steps:
    ncc.check_map_size(config.input.height // 2, config.input.width // 2,
                       config.loss.ncc_patch,
                       f"config.input.height/width={config.input.height}x{config.input.width}")
  embedding.check_tta(config.eval.tta)
  evaluators.protocol_names(config.eval.get("protocol", "market"))
  parallel.check_divisible(config.input.batch_size, "config.input.batch_size (pairs)")


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> tuple[Any, int]:
  """{'params', 'batch_stats'} of the last stage's checkpoint `step` (default: newest)."""
  classes = identities.num_classes(config)
  last = stage_names(config)[-1]
  variables = init_variables(jax.random.PRNGKey(0), config, classes)
  template = create_train_state(variables, config, classes, max(_stage_steps(config, last), 1),
                                _stage_optimizer(config, last))
  return experiment.restore_variables(loop.stage_dir(workdir, last), template, step)


def stages(config: ml_collections.ConfigDict) -> list[loop.Stage]:
  """Stage 1 from random init; stage 2 from stage 1's weights with a fresh optimiser."""
  classes = identities.num_classes(config)
  prepare = BatchPreparer(config)
  plan = []
  for name in stage_names(config):
    steps = _stage_steps(config, name)

    def init_state(previous, name=name, steps=steps):
      if previous is None:
        variables = init_variables(jax.random.PRNGKey(config.seed), config, classes)
      else:
        variables = {"params": previous.params, "batch_stats": previous.batch_stats}
      return create_train_state(variables, config, classes, steps,
                                _stage_optimizer(config, name))

    plan.append(loop.Stage(
        name=name, fit_cfg=loop.FitConfig.from_config(config, steps), init_state=init_state,
        step_fn=functools.partial(train_step, model=build_model(config, classes, train=True),
                                  config=config, use_ncc=name == "ncc"),
        make_iterator=lambda: make_train_iterator(config), prepare_batch=prepare,
        examples_per_step=2 * config.input.batch_size))
  return plan


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Trains both stages (each resumable; a finished one is restored, not retrained),
  evaluates the end of each stage, and writes eval_results.json for the final model
  with the first stage's numbers under 'similarity_stage'."""
  workdir = os.path.abspath(workdir)
  validate(config)
  plan = stages(config)
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model.num_classes = identities.num_classes(config)
  experiment.check_workdir_config(saved, workdir)
  experiment.save_workdir_config(saved, workdir)
  total = sum(s.fit_cfg.steps for s in plan)
  writer = experiment.make_writer(workdir, total)
  evaluate = lambda variables, step: evaluate_variables(
      config, variables, step, rerank=config.eval.rerank, tta=config.eval.tta)
  stage_results = {}

  def stage_end(stage: loop.Stage, host: TrainState) -> None:
    if (evaluate_at_end and len(plan) > 1 and stage.name != plan[-1].name
        and jax.process_index() == 0):
      stage_results[stage.name] = evaluate(state_lib.variables(host), int(host.step))

  final = loop.run_stages(
      plan, workdir, writer, step_callback=step_callback, stage_end=stage_end,
      evaluate_fn=lambda stage, host, step: experiment.evaluate_and_log(
          evaluate, state_lib.variables(host), step, writer))
  results = None
  if evaluate_at_end:
    variables = state_lib.variables(final)
    wrapped = lambda v, step: dict(evaluate(v, step), **(
        {"similarity_stage": stage_results["similarity"]} if stage_results else {}))
    results = experiment.evaluate_and_log(wrapped, variables, total, writer, workdir)
  writer.close()
  return results
