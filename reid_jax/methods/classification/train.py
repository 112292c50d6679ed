"""The classification family on the shared core: IDE, PCB (+ RPP stage),
verification + identification, and APR.

Every method here trains a softmax over the training identities (class = the rank of
the identity among the training split's identities, derived from the dataset, never
set by hand), with SGD and a lower learning rate for the ImageNet backbone
(`config.optimizer.lr_mult`). What differs is the head (`models.py`), the loss
(`losses.py`), the sampler (`config.input.sampler`: 'shuffle' images, 'pk', or
'pairs' for verification) and, for PCB with `model.rpp`, a second stage.
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
from reid_jax.core import video
from reid_jax.core.state import TrainState
from reid_jax.data import attributes as attr_lib
from reid_jax.data import identities
from reid_jax.data import pipeline, sources
from reid_jax.data import samplers as smp
from reid_jax.methods.classification import losses, models
from reid_jax.models import BACKBONES
from reid_jax.models.layers import l2_normalize
from reid_jax.models.reid_model import DTYPES, make_backbone
from reid_jax.pretrained import load_configured

AXIS = parallel.AXIS
METHODS = tuple(losses.LOSSES)
SAMPLERS = ("shuffle", "pk", "pairs", "tracklets")


# ----------------------------------------------------------------------------- data


def train_identities(config: ml_collections.ConfigDict) -> np.ndarray:
  """Sorted identities of the training split (ids >= 1; distractors/junk excluded)."""
  return identities.train_identities(config.dataset)


num_classes = identities.num_classes
class_labels = identities.class_labels


def attribute_table(config: ml_collections.ConfigDict, part: str) -> attr_lib.AttributeTable:
  """APR's identity attributes: `config.dataset.attributes` = market_attribute.mat, or
  'synthetic' (deterministic per-identity attributes for the synthetic set)."""
  path = config.dataset.get("attributes", "")
  if not path:
    raise ValueError("config.method=apr needs --config.dataset.attributes=PATH (the "
                     "market_attribute.mat of Lin et al.)")
  if path == "synthetic":
    split = config.dataset.train_split if part == "train" else config.dataset.gallery_split
    pids = smp.read_labels(sources.open_split(config.dataset, split))["person_id"]
    ids = np.unique(pids[pids >= 1])
    table = attr_lib.synthetic_attributes(ids, seed=config.seed)
    return attr_lib.AttributeTable(
        names=attr_lib.ATTRIBUTES, person_ids=np.asarray(sorted(table), np.int32),
        labels=np.stack([table[i] for i in sorted(table)]).astype(np.int32) - 1)
  return attr_lib.read_market_attributes(os.path.expanduser(path), part)


def attribute_classes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  if config.method != "apr":
    return ()
  return tuple(attr_lib.num_classes(n) for n in attr_lib.ATTRIBUTES)


def make_train_iterator(config: ml_collections.ConfigDict):
  """The grain iterator of this method's sampler over this process's batch slice."""
  source = sources.open_split(config.dataset, config.dataset.train_split)
  inp = config.input
  kw = dict(height=inp.height, width=inp.width, augment=inp.augment, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=inp.worker_count)
  if inp.sampler == "tracklets":  # video: P ids x K tracklets x T frames
    return pipeline.train_loader(source, **video.loader_kwargs(config), **kw)
  if inp.sampler == "pk":
    return pipeline.train_loader(source, sampler="pk", P=inp.P, K=inp.K, **kw)
  if inp.sampler == "pairs":
    return pipeline.train_loader(source, sampler="pairs", batch_size=inp.batch_size,
                                 neg_per_pos=inp.neg_per_pos,
                                 neg_per_pos_end=inp.get("neg_per_pos_end", None),
                                 neg_ramp_steps=inp.get("neg_ramp_steps", 0), **kw)
  return pipeline.train_loader(source, sampler="shuffle", batch_size=inp.batch_size, **kw)


def examples_per_step(config: ml_collections.ConfigDict) -> int:
  """Images per optimisation step (a pair counts two, a tracklet its T frames)."""
  inp = config.input
  if inp.sampler == "tracklets":
    return inp.P * inp.K * video.frames(config)
  if inp.sampler == "pk":
    return inp.P * inp.K
  return inp.batch_size * (2 if inp.sampler == "pairs" else 1)


class BatchPreparer:
  """Host batch -> the step's inputs: images, class labels, pairs, attributes."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.method = config.method
    self.ids = train_identities(config)
    self.table = attribute_table(config, "train") if config.method == "apr" else None

  def __call__(self, b: dict, step: int) -> dict:
    del step
    if self.method == "verif_ident":
      return {"image_a": b["image_a"], "image_b": b["image_b"],
              "label": class_labels(self.ids, b["person_id_a"]),
              "label_b": class_labels(self.ids, b["person_id_b"]),
              "same": b["same"].astype(np.int32)}
    out = {"image": b["image"], "label": class_labels(self.ids, b["person_id"])}
    if self.table is not None:
      out["attributes"], out["attributes_valid"] = self.table.lookup(b["person_id"])
    return out


# ----------------------------------------------------------------------------- model


def build_model(config: ml_collections.ConfigDict, classes: int, train: bool = False):
  """The method's network; BatchNorm synchronised over devices when training with sync_bn."""
  m = config.model
  dtype = DTYPES[m.dtype]
  axis = AXIS if (train and config.train.sync_bn) else None
  backbone = make_backbone(m, axis)
  if config.method == "pcb":
    return models.PCBModel(backbone, classes, num_parts=m.num_parts, reduce_dim=m.reduce_dim,
                           dropout=m.dropout, rpp=bool(m.get("rpp", False)), dtype=dtype,
                           bn_axis_name=axis)
  return models.IDEModel(backbone, classes, bottleneck=m.bottleneck, relu=m.bottleneck_relu,
                         dropout=m.dropout, attribute_classes=attribute_classes(config),
                         verification=config.method == "verif_ident",
                         verif_dropout=m.get("verif_dropout", 0.5), dtype=dtype,
                         bn_axis_name=axis, temporal_pool=video.pool_mode(config))


def init_variables(rng: jax.Array, config: ml_collections.ConfigDict, classes: int,
                   pretrained: bool = True) -> dict:
  """Random init (on the host), then the ImageNet backbone if the config names one."""
  model = build_model(config, classes)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  variables = state_lib.run_once(functools.partial(model.init, train=False),
                                 {"params": rng, "dropout": rng}, x)
  if pretrained:
    variables = load_configured(variables, config.model)
  return variables


def create_train_state(variables: dict, config: ml_collections.ConfigDict, classes: int,
                       steps: int, opt_cfg: ml_collections.ConfigDict | None = None
                       ) -> TrainState:
  model = build_model(config, classes)
  tx = optim.make_optimizer(opt_cfg or config.optimizer, steps, variables["params"])
  return state_lib.create(model.apply, variables, tx)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model, config,
               loss_fn: Callable) -> tuple[TrainState, dict]:
  """One SGD step on this device's slice (inside pmap); dropout keys differ per device.

  Video training (config.input.video.T = T): `image` holds the slice's tracklets x T
  frames and `label` one class per tracklet; the model pools the frames per tracklet.
  """
  pairs = "image_a" in batch
  images = jnp.concatenate([batch["image_a"], batch["image_b"]]) if pairs else batch["image"]
  t = video.frames(config)
  kwargs = {"pairs": True} if pairs else ({"frames": t} if t > 1 else None)
  return state_lib.loss_step(state, images, rng, lambda out: loss_fn(out, batch, config.loss),
                             model=model, axis_name=AXIS, apply_kwargs=kwargs)


# ----------------------------------------------------------------------------- embedding


def make_embedder(config: ml_collections.ConfigDict, tta: str = "",
                  classes: int | None = None) -> embedding.Embedder:
  """jitted images -> {exit: L2-normalised feature}, TTA views summed before normalising
  (IDE: the feature of the image plus that of its mirror)."""
  model = build_model(config, classes or num_classes(config))
  method = config.method
  tta = embedding.check_tta(tta, "--tta")

  def raw(variables, images):
    out = model.apply(variables, images, train=False)
    if method == "pcb":  # each part L2-normalised, then concatenated (the public code)
      b = images.shape[0]
      return {"pcb": l2_normalize(out["parts_h"]).reshape(b, -1),
              "pcb_g": l2_normalize(out["parts_g"]).reshape(b, -1)}
    if method == "verif_ident":
      return {"verif_ident": out["pool"]}
    return {method: out["feature"]}

  @jax.jit
  def embed(variables, images):
    views = [raw(variables, v) for v in embedding.tta_views(
        images, tta, (config.input.height, config.input.width))]
    summed = jax.tree_util.tree_map(lambda *a: sum(a), *views)
    return {k: l2_normalize(v) for k, v in summed.items()}
  return embed


def attribute_accuracy(config: ml_collections.ConfigDict, variables: Any, classes: int
                       ) -> dict[str, float]:
  """APR: per-attribute and mean accuracy on the gallery images of the test identities
  (images of identities the test annotation lacks, e.g. distractors, are left out)."""
  model = build_model(config, classes)
  table = attribute_table(config, "test")
  m = len(table.names)

  @jax.jit
  def predict(variables, images):
    out = model.apply(variables, images, train=False)
    return jnp.stack([jnp.argmax(out[f"attr/{j}"], -1) for j in range(m)], -1)

  preds, embedded_labels = embedding.embed_split(
      config.dataset, config.dataset.gallery_split, lambda v, x: {"attr": predict(v, x)},
      variables, height=config.input.height, width=config.input.width,
      batch_size=config.input.eval_batch_size)
  truth, valid = table.lookup(embedded_labels["person_id"])
  if not valid.any():
    raise ValueError("no gallery image belongs to an identity of the test attribute "
                     f"annotation {config.dataset.attributes}")
  correct = preds["attr"][valid].astype(np.int64) == truth[valid]
  per = {name: float(correct[:, j].mean()) for j, name in enumerate(table.names)}
  return {"mean": float(np.mean(list(per.values()))), "num_images": int(valid.sum()),
          "per_attribute": per}


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = ""):
  """(q_embs, q_labels, g_embs, g_labels) for every exit of the method."""
  tta = embedding.check_tta(tta, "--tta")
  return evaluators.embed_query_gallery(config, make_embedder(config, tta), variables, tta)


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None) -> dict:
  """Ranks every exit of the method (and, for APR, the attribute accuracy)."""
  classes = num_classes(config)
  tta = embedding.check_tta(tta, "--tta")
  if embedded is None:
    embedded = embed_query_gallery(config, variables, tta)
  results = evaluators.evaluate_embeddings(config, embedded, step=step, rerank=rerank, tta=tta)
  if config.method == "apr":
    results["attributes"] = attribute_accuracy(config, variables, classes)
  return results


# ----------------------------------------------------------------------------- stages


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """The method's training stages: PCB with RPP adds 'rpp' after 'pcb'."""
  if config.method == "pcb" and config.model.get("rpp", False):
    return ["pcb", "rpp"]
  return [""]


def _stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The model config a stage trains (stage 'pcb' of an RPP run: uniform stripes)."""
  if stage == "pcb":
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.rpp = False
    return c
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks this family's settings before any work (one line each, naming the field)."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not a classification method "
                     f"({', '.join(METHODS)})")
  if config.input.sampler not in SAMPLERS:
    raise ValueError(f"config.input.sampler={config.input.sampler!r}: use one of {SAMPLERS}")
  if (config.method == "verif_ident") != (config.input.sampler == "pairs"):
    raise ValueError(f"config.input.sampler={config.input.sampler!r}: verif_ident trains on "
                     "'pairs' and the other methods on 'shuffle' or 'pk'")
  if config.loss.triplet_weight and config.input.sampler not in ("pk", "tracklets"):
    raise ValueError("config.loss.triplet_weight > 0 needs identities with several images "
                     "per batch: set --config.input.sampler=pk")
  video.validate(config)
  if (config.input.sampler == "tracklets") != (video.frames(config) > 0):
    raise ValueError(f"config.input.sampler={config.input.sampler!r}: video training "
                     "(config.input.video.T >= 1) uses sampler 'tracklets', and 'tracklets' "
                     "needs config.input.video.T (see configs/video.py)")
  if video.frames(config) and config.method != "ide":
    raise ValueError(f"config.input.video: temporal pooling is implemented for ide in "
                     f"this family, not {config.method}")
  if config.model.backbone not in BACKBONES:
    raise ValueError(f"config.model.backbone={config.model.backbone!r}: use one of "
                     f"{sorted(BACKBONES)}")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use float32 or bfloat16")
  if not 0.0 <= config.model.dropout < 1.0:
    raise ValueError(f"config.model.dropout={config.model.dropout}: must be in [0, 1)")
  embedding.check_tta(config.eval.tta)
  evaluators.protocol_names(config.eval.get("protocol", "market"))
  if config.input.sampler == "tracklets":  # whole tracklets per device
    parallel.check_divisible(config.input.P * config.input.K, "config.input.P*K tracklets")
  else:
    parallel.check_divisible(examples_per_step(config) // (
        2 if config.input.sampler == "pairs" else 1), "batch size")
  if config.method == "pcb" and config.model.get("rpp", False):
    if config.train.get("rpp_steps", 0) < 1:
      raise ValueError("config.train.rpp_steps must be >= 1 when config.model.rpp is set")


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> tuple[Any, int]:
  """{'params', 'batch_stats'} of the last stage's checkpoint `step` (default: newest)."""
  classes = num_classes(config)
  last = stage_names(config)[-1]
  cfg = _stage_config(config, last)
  variables = init_variables(jax.random.PRNGKey(0), cfg, classes, pretrained=False)
  template = create_train_state(variables, cfg, classes, max(int(config.train.steps), 1),
                                _stage_optimizer(config, last))
  return experiment.restore_variables(loop.stage_dir(workdir, last or None), template, step)


def _stage_optimizer(config: ml_collections.ConfigDict, stage: str):
  if stage != "rpp":
    return config.optimizer
  c = ml_collections.ConfigDict(config.optimizer.to_dict())
  c.lr = config.optimizer.rpp_lr  # Sun et al. §3.2 / syfafterzy/PCB_RPP_for_reID
  c.decay_steps = tuple(config.optimizer.get("rpp_decay_steps", ()))
  return c


def _stage_steps(config: ml_collections.ConfigDict, stage: str) -> int:
  return int(config.train.rpp_steps if stage == "rpp" else config.train.steps)


def stages(config: ml_collections.ConfigDict) -> list[loop.Stage]:
  """The method's training stages (PCB with RPP: 'pcb', then 'rpp' from its result)."""
  classes = num_classes(config)
  prepare = BatchPreparer(config)
  plan = []
  for name in stage_names(config):
    cfg = _stage_config(config, name)
    steps = _stage_steps(config, name)

    def init_state(previous, name=name, cfg=cfg, steps=steps):
      if previous is None:
        variables = init_variables(jax.random.PRNGKey(config.seed), cfg, classes)
      else:  # RPP (Sun et al. §3.2): the trained PCB plus a new part classifier
        fresh = init_variables(jax.random.PRNGKey(config.seed + 1), cfg, classes,
                               pretrained=False)
        params = dict(fresh["params"])
        params.update(previous.params)
        variables = {"params": params, "batch_stats": previous.batch_stats}
      return create_train_state(variables, cfg, classes, steps, _stage_optimizer(config, name))

    plan.append(loop.Stage(
        name=name, fit_cfg=loop.FitConfig.from_config(config, steps), init_state=init_state,
        step_fn=functools.partial(train_step, model=build_model(cfg, classes, train=True),
                                  config=cfg, loss_fn=losses.LOSSES[config.method]),
        make_iterator=lambda: make_train_iterator(config), prepare_batch=prepare,
        examples_per_step=examples_per_step(config)))
  return plan


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Trains every stage (each resumable, a finished one restored, not retrained), then
  evaluates the final model. `step_callback(step)` runs after every step of every stage."""
  workdir = os.path.abspath(workdir)
  validate(config)
  plan = stages(config)
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model.num_classes = num_classes(config)  # what the classifier was built with
  experiment.check_workdir_config(saved, workdir)
  experiment.save_workdir_config(saved, workdir)
  total = sum(s.fit_cfg.steps for s in plan)
  writer = experiment.make_writer(workdir, total)
  last = _stage_config(config, plan[-1].name)
  evaluate_fn = lambda cfg: (lambda variables, step: evaluate_variables(
      cfg, variables, step, rerank=config.eval.rerank, tta=config.eval.tta))
  final = loop.run_stages(
      plan, workdir, writer, step_callback=step_callback,
      evaluate_fn=lambda stage, host, step: experiment.evaluate_and_log(
          evaluate_fn(_stage_config(config, stage.name)), state_lib.variables(host), step,
          writer))
  results = None
  if evaluate_at_end:
    results = experiment.evaluate_and_log(evaluate_fn(last), state_lib.variables(final),
                                          total, writer, workdir)
  writer.close()
  return results
