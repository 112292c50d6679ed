"""Re-ID done right (Almazan et al. 2018) on the shared core: two stages.

1. `classification`: backbone + global max pooling + softmax over the training
   identities, fixed-size batches (`config.input.height/width`), BatchNorm training.
2. `ranking`: from stage 1's backbone, a fresh FC + l2 trained with the triplet loss on
   triplets of their own image sizes, one at a time, gradients accumulated over
   `config.ranking.triplets_per_update` triplets (`step.SequentialTripletStep`), random
   triplets first and then mined hard ones (`stream.TripletStream`), progressive
   cut-out. `config.ranking.mode='padded'` replaces the sequential step by padded
   fixed-size batches, to measure what "no distortion" costs.

Evaluation embeds every image at its own rounded size (images grouped by shape); the
exits are `done_right` (the embedding) and `gmp` (the l2-normalised pooled feature, the
classification stage's representation).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from reid_jax.core import embedding, evaluators, experiment, loop, optim, parallel
from reid_jax.core import state as state_lib
from reid_jax.core.state import TrainState
from reid_jax.data import augment as aug
from reid_jax.data import identities, pipeline, sources
from reid_jax.data import samplers as smp
from reid_jax.losses.classification import cross_entropy, top1
from reid_jax.methods.done_right import sizes
from reid_jax.methods.done_right.model import DoneRightModel, l2_normalize
from reid_jax.methods.done_right.step import SequentialTripletStep, padded_step
from reid_jax.methods.done_right.stream import TripletStream
from reid_jax.models import BACKBONES
from reid_jax.models.reid_model import DTYPES, make_backbone
from reid_jax.pretrained import load_configured

AXIS = parallel.AXIS
STAGES = ("classification", "ranking")
MODES = ("sequential", "padded")
STATS_NAME = "ranking_stats.json"
STAGE1_RESULTS_NAME = "classification_results.json"


# ----------------------------------------------------------------------------- model


def backbone_stride(config: ml_collections.ConfigDict) -> int:
  """Total stride of the backbone's last map (32, or 16 with last_stride=1)."""
  return 32 if config.model.last_stride == 2 else 16


def min_side(config: ml_collections.ConfigDict) -> int:
  """The smallest side an image is fed at: config.input.min_side, or the backbone stride."""
  return int(config.input.min_side) or backbone_stride(config)


def build_model(config: ml_collections.ConfigDict, classes: int = 0,
                train: bool = False) -> DoneRightModel:
  """The stage's network: `classes > 0` is the classification stage."""
  m = config.model
  axis = AXIS if (train and config.train.sync_bn) else None
  return DoneRightModel(make_backbone(m, axis), embed_dim=m.embed_dim,
                        num_classes=classes, classifier_bn=bool(m.classifier_bn),
                        dtype=DTYPES[m.dtype], bn_axis_name=axis)


def init_variables(rng: jax.Array, config: ml_collections.ConfigDict, classes: int,
                   pretrained: bool = True) -> dict:
  """Random init, then the ImageNet backbone if the config names one."""
  model = build_model(config, classes)
  x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  variables = state_lib.run_once(functools.partial(model.init, train=False), rng, x)
  if pretrained:
    variables = load_configured(variables, config.model)
  return variables


def embed_fn(config: ml_collections.ConfigDict) -> Callable:
  """(variables, images) -> l2-normalised embeddings of the ranking model, BN frozen."""
  model = build_model(config)
  return lambda variables, x: model.apply(variables, x, train=False)["embedding"]


# ----------------------------------------------------------------------------- stage 1


def classification_step(state: TrainState, batch: dict, rng: jax.Array, *, model,
                        smoothing: float) -> tuple[TrainState, dict]:
  """One softmax step on this device's slice (inside pmap)."""
  del rng

  def loss_fn(params):
    out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                batch["image"], train=True, mutable=["batch_stats"])
    loss = cross_entropy(out["logits"], batch["label"], smoothing)
    return loss, (new_vars["batch_stats"], top1(out["logits"], batch["label"]))

  (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new = state.apply_gradients(grads=grads, batch_stats=jax.lax.pmean(batch_stats, AXIS))
  return new, jax.lax.pmean({"loss": loss, "top1/id": acc,
                             "grad_norm": optax.global_norm(grads)}, AXIS)


class LabelBatch:
  """Host batch -> images and training-identity classes."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.ids = identities.train_identities(config.dataset)

  def __call__(self, b: dict, step: int) -> dict:
    del step
    return {"image": b["image"], "label": identities.class_labels(self.ids, b["person_id"])}


def classification_iterator(config: ml_collections.ConfigDict):
  source = sources.open_split(config.dataset, config.dataset.train_split)
  inp = config.input
  return pipeline.train_loader(
      source, sampler="shuffle", batch_size=inp.batch_size, height=inp.height,
      width=inp.width, augment=inp.augment, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=inp.worker_count)


# ----------------------------------------------------------------------------- stage 2


def padded_canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The fixed canvas of the padded comparison: config.ranking.padded_height/width, or
  the longer side x half of it (rounded), the shape a 2:1 person crop gets anyway."""
  r, inp = config.ranking, config.input
  if r.padded_height and r.padded_width:
    return int(r.padded_height), int(r.padded_width)
  return (sizes.round_to(inp.longer_side, inp.size_multiple),
          sizes.round_to(inp.longer_side / 2, inp.size_multiple))


def ranking_stream(config: ml_collections.ConfigDict) -> TripletStream:
  source = sources.open_split(config.dataset, config.dataset.train_split)
  r, inp = config.ranking, config.input
  return TripletStream(
      source, triplets_per_update=r.triplets_per_update, seed=config.seed,
      longer_side=inp.longer_side, size_multiple=inp.size_multiple, min_side=min_side(config),
      augment=aug.AugmentConfig.from_options(r.augment), mining_cfg=config.mining,
      pool_size=(inp.height, inp.width),
      process_index=jax.process_index(), process_count=jax.process_count(),
      padded=padded_canvas(config) if r.mode == "padded" else None)


class Miner:
  """`before_batch` of the ranking stage: re-mines the stream's table when it is due,
  embedding the pool with the current model at the fixed pool size, in large batches
  split over the local devices (every process mines the same table)."""

  def __init__(self, config: ml_collections.ConfigDict, stream: TripletStream):
    n = jax.local_device_count()
    self.stream, self.n = stream, n
    self.batch_size = -(-int(config.input.eval_batch_size) // n) * n  # a multiple of n
    self.embed = jax.pmap(embed_fn(config), axis_name=AXIS)
    self.on_update: Callable[[], None] | None = None

  def __call__(self, state: TrainState, step: int) -> None:
    if self.on_update is not None:
      self.on_update()
    if not self.stream.mining_due(step - 1):
      return
    variables = state_lib.variables(state)  # replicated: each device embeds its share
    embed = lambda x: np.asarray(self.embed(
        variables, x.reshape((self.n, -1) + x.shape[1:]))).reshape(len(x), -1)
    self.stream.refresh(step - 1, embed, self.batch_size)


def stack_window(window: dict, step: int) -> dict:
  """Padded mode: the window's triplets as [T, H, W, 3] arrays per role."""
  del step
  trips = window["triplets"]
  return {k: np.stack([t[i] for t in trips]) for i, k in
          enumerate(("anchor", "positive", "negative"))}


# ----------------------------------------------------------------------------- evaluation


def make_embedder(config: ml_collections.ConfigDict, tta: str = "",
                  stage: str = "ranking") -> embedding.Embedder:
  """jitted images -> {'done_right': embedding, 'gmp': l2(pooled)} ({'gmp'} for the
  classification stage); with tta='flip' the two views are summed before normalising."""
  tta = embedding.check_tta(tta, "--tta")
  if tta == "five_crop":
    raise ValueError("--tta=five_crop needs one input size; Re-ID done right embeds each "
                     "image at its own size: use none or flip")
  classes = identities.num_classes(config) if stage == "classification" else 0
  model = build_model(config, classes)

  def raw(variables, images):
    out = model.apply(variables, images, train=False)
    feats = {"gmp": out["pool"]}
    if not classes:
      feats["done_right"] = out["embedding"]
    return feats

  @jax.jit
  def embed(variables, images):
    views = [raw(variables, images)] + ([raw(variables, images[:, :, ::-1])] if tta else [])
    summed = jax.tree_util.tree_map(lambda *a: sum(a), *views)
    return {k: l2_normalize(v) for k, v in summed.items()}
  return embed


@functools.lru_cache(maxsize=8)
def _split_shapes(dataset_json: str, split: str) -> np.ndarray:
  """image_shapes of a split, read once per process (evaluation runs after each stage)."""
  dataset = ml_collections.ConfigDict(json.loads(dataset_json))
  return image_shapes(sources.open_split(dataset, split))


def image_shapes(source: Any) -> np.ndarray:
  """[N, 2] (height, width) of every record."""
  reader = pipeline.RecordReader(source)
  out = np.empty((len(reader), 2), np.int64)
  chunk = 512
  for lo in range(0, len(reader), chunk):
    for k, rec in enumerate(reader.read(range(lo, min(lo + chunk, len(reader))))):
      img = rec["image"]
      if isinstance(img, np.ndarray):
        out[lo + k] = img.shape[:2]
      else:
        im = aug.to_pil(img)
        out[lo + k] = (im.height, im.width)
  return out


def embed_split(config: ml_collections.ConfigDict, split: str, embed: embedding.Embedder,
                variables: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Embeds every record of `split` at its own rounded size, in order (records grouped by
  shape, `config.input.eval_batch_size` per batch; the last batch of a shape padded)."""
  source = sources.open_split(config.dataset, split)
  labels = smp.read_labels(source)
  inp = config.input
  shapes = [sizes.target_shape(h, w, inp.longer_side, inp.size_multiple, min_side(config))
            for h, w in _split_shapes(config.dataset.to_json(), split)]
  reader = pipeline.RecordReader(source)
  bs = int(inp.eval_batch_size)
  out: dict[str, np.ndarray] = {}
  for shape in sorted(set(shapes)):
    idx = np.array([i for i, s in enumerate(shapes) if s == shape], np.int64)
    for lo in range(0, len(idx), bs):
      part = idx[lo:lo + bs]
      x = np.zeros((bs,) + shape + (3,), np.float32)
      for k, rec in enumerate(reader.read(part)):
        aug.normalize(aug.eval_transform(rec["image"], *shape), out=x[k])
      embs = jax.device_get(embed(variables, jnp.asarray(x)))
      for name, v in embs.items():
        if name not in out:
          out[name] = np.zeros((len(shapes), v.shape[-1]), np.float32)
        out[name][part] = np.asarray(v, np.float32)[:len(part)]
  return out, {k: np.asarray(v) for k, v in labels.items()}


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = "",
                        stage: str = "ranking"):
  """(q_embs, q_labels, g_embs, g_labels) for the exits of `stage`'s model."""
  embed = make_embedder(config, tta, stage)
  q = embed_split(config, config.dataset.query_split, embed, variables)
  g = embed_split(config, config.dataset.gallery_split, embed, variables)
  return q + g


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None,
                       stage: str = "ranking") -> dict:
  """Ranks the exits of `stage`'s model on the config's query and gallery."""
  tta = embedding.check_tta(tta, "--tta")
  if embedded is None:
    embedded = embed_query_gallery(config, variables, tta, stage)
  return evaluators.evaluate_embeddings(config, embedded, step=step, rerank=rerank, tta=tta)


# ----------------------------------------------------------------------------- stages


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the method's settings before any work (one line each, naming the field)."""
  inp, r, mcfg = config.input, config.ranking, config.mining
  if config.model.backbone not in BACKBONES:
    raise ValueError(f"config.model.backbone={config.model.backbone!r}: use one of "
                     f"{sorted(BACKBONES)}")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use float32 or bfloat16")
  if r.mode not in MODES:
    raise ValueError(f"config.ranking.mode={r.mode!r}: use one of {MODES}")
  if inp.size_multiple < 1:
    raise ValueError(f"config.input.size_multiple={inp.size_multiple}: must be >= 1")
  if inp.longer_side < min_side(config):
    raise ValueError(f"config.input.longer_side={inp.longer_side} is below the backbone's "
                     f"minimum input {min_side(config)} (its total stride); raise it")
  if r.triplets_per_update < 1 or r.triplets_per_update % jax.device_count():
    raise ValueError(f"config.ranking.triplets_per_update={r.triplets_per_update} is not "
                     f"divisible by the {jax.device_count()} devices; change it")
  if not isinstance(config.loss.margin, (int, float)) or config.loss.margin < 0:
    raise ValueError(f"config.loss.margin={config.loss.margin!r}: the paper's loss needs a "
                     "number >= 0 (0.1)")
  for f in ("every", "top"):
    if mcfg[f] < 1:
      raise ValueError(f"config.mining.{f}={mcfg[f]}: must be >= 1")
  if mcfg.hard_fraction and mcfg.pool < 2:
    raise ValueError(f"config.mining.pool={mcfg.pool}: must be >= 2")
  if not 0.0 <= mcfg.hard_fraction <= 1.0:
    raise ValueError(f"config.mining.hard_fraction={mcfg.hard_fraction}: must be in [0, 1]")
  if config.train.steps < 1 or r.steps < 1:
    raise ValueError("config.train.steps (classification) and config.ranking.steps "
                     "(ranking) must both be >= 1")
  parallel.check_divisible(inp.batch_size, "config.input.batch_size")
  embedding.check_tta(config.eval.tta)
  if config.eval.tta == "five_crop":
    raise ValueError("config.eval.tta=five_crop needs one input size: use none or flip")
  evaluators.protocol_names(config.eval.get("protocol", "market"))


def _stage1_state(config, classes: int, steps: int) -> TrainState:
  variables = init_variables(jax.random.PRNGKey(config.seed), config, classes)
  tx = optim.make_optimizer(config.optimizer, steps, variables["params"])
  return state_lib.create(build_model(config, classes).apply, variables, tx)


def _fresh_fc(config: ml_collections.ConfigDict, rng: jax.Array, features: int) -> dict:
  """A new FC layer's params (the ranking stage's), initialised on its own: cheaper than
  initialising the whole model again."""
  model = build_model(config)
  return nn.Dense(config.model.embed_dim, dtype=model.dtype, param_dtype=jnp.float32).init(
      rng, jnp.zeros((1, features), jnp.float32))["params"]


def _stage2_state(config, previous: TrainState | None, steps: int,
                  abstract: bool = False) -> TrainState:
  """Stage 1's backbone (params and BN statistics) + a fresh FC. Without `previous`, a
  random model (or, `abstract`, only its shapes: a restore template, nothing computed)."""
  model = build_model(config)
  tx = lambda params: optim.make_optimizer(config.ranking.optimizer, steps, params)
  if previous is None:
    rng = jax.random.PRNGKey(config.seed + 1)
    if abstract:
      x = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
      return jax.eval_shape(lambda: state_lib.create(
          model.apply, model.init(rng, x), tx(model.init(rng, x)["params"])))
    variables = init_variables(rng, config, 0, pretrained=False)
  else:
    backbone = previous.params["backbone"]
    stats = {"backbone": previous.batch_stats["backbone"]}
    features = jax.eval_shape(lambda: model.apply(
        {"params": {"backbone": backbone}, "batch_stats": stats},
        jnp.zeros((1, config.input.height, config.input.width, 3)),
        method=DoneRightModel.feature_map)).shape[-1]
    variables = {"params": {"backbone": backbone,
                            "fc": _fresh_fc(config, jax.random.PRNGKey(config.seed + 1),
                                            features)},
                 "batch_stats": stats}
  return state_lib.create(model.apply, variables, tx(variables["params"]))


class RankingPlan:
  """The ranking stage's stream, step and miner, built once and shared by the stage."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.stream = ranking_stream(config)
    r = config.ranking
    if r.mode == "sequential":
      self.step = SequentialTripletStep(embed_fn(config), margin=config.loss.margin,
                                        triplets_per_update=r.triplets_per_update,
                                        seed=config.seed)
    else:
      self.step = None
    self.miner = Miner(config, self.stream)
    self.miner.on_update = self._count
    self.started: float | None = None   # the first ranking update of this process run
    self.updates = 0

  def _count(self) -> None:
    if self.started is None:
      self.started = time.time()
    self.updates += 1

  def stats(self) -> dict:
    """What the stage cost in this process run (not carried over a resume)."""
    inp = self.config.input
    s = {"mode": self.config.ranking.mode, "updates": self.updates,
         "triplets_per_update": int(self.config.ranking.triplets_per_update),
         "wall_s": time.time() - self.started if self.started else 0.0,
         "max_distortion": self.stream.max_distortion,
         "upscaled_short_side": self.stream.upscaled_short_side,
         "shape_bound": sizes.shape_bound(inp.longer_side, inp.size_multiple,
                                          min_side(self.config))}
    if self.step is not None:
      s.update(compiled_shapes=sorted(self.step.shapes), num_shapes=len(self.step.shapes),
               executables=len(self.step.compiled), compile_s=self.step.compile_s)
    s["mining_s"] = self.stream.mining_total_s
    return s


def stages(config: ml_collections.ConfigDict) -> list[loop.Stage]:
  """[classification, ranking] (the family interface)."""
  return plan_stages(config)[0]


def plan_stages(config: ml_collections.ConfigDict) -> tuple[list[loop.Stage], RankingPlan]:
  """[classification, ranking] and the ranking plan (for its statistics)."""
  classes = identities.num_classes(config)
  s1, s2 = int(config.train.steps), int(config.ranking.steps)
  plan = RankingPlan(config)
  r = config.ranking
  cls_stage = loop.Stage(
      name="classification", fit_cfg=loop.FitConfig.from_config(config, s1),
      init_state=lambda previous: _stage1_state(config, classes, s1),
      step_fn=functools.partial(classification_step,
                                model=build_model(config, classes, train=True),
                                smoothing=config.loss.label_smoothing),
      make_iterator=lambda: classification_iterator(config), prepare_batch=LabelBatch(config),
      examples_per_step=int(config.input.batch_size))
  rank_stage = loop.Stage(
      name="ranking", fit_cfg=loop.FitConfig.from_config(config, s2),
      init_state=lambda previous: _stage2_state(config, previous, s2),
      step_fn=functools.partial(padded_step, embed_fn=embed_fn(config),
                                margin=config.loss.margin),
      make_iterator=lambda: plan.stream,
      prepare_batch=(lambda w, step: w) if r.mode == "sequential" else stack_window,
      examples_per_step=3 * int(r.triplets_per_update),
      custom_step=plan.step, before_batch=plan.miner)
  return [cls_stage, rank_stage], plan


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> tuple[Any, int]:
  """{'params', 'batch_stats'} of the ranking stage's checkpoint `step` (default newest)."""
  template = _stage2_state(config, None, max(int(config.ranking.steps), 1), abstract=True)
  return experiment.restore_variables(loop.stage_dir(workdir, "ranking"), template, step)


def _write_json(obj: dict, workdir: str, name: str) -> None:
  if jax.process_index() == 0:
    evaluators.write_results(obj, workdir, name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Trains both stages (each resumable), evaluates after each, writes eval_results.json
  (the final model, with the classification stage's figures under
  `classification_stage`) and ranking_stats.json (compiled shapes, compile and mining
  time of this process run)."""
  workdir = os.path.abspath(workdir)
  validate(config)
  stage_list, plan = plan_stages(config)
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model.num_classes = identities.num_classes(config)
  experiment.check_workdir_config(saved, workdir)
  experiment.save_workdir_config(saved, workdir)
  total = sum(s.fit_cfg.steps for s in stage_list)
  writer = experiment.make_writer(workdir, total)
  ev = lambda stage: (lambda variables, step: evaluate_variables(
      config, variables, step, rerank=config.eval.rerank, tta=config.eval.tta, stage=stage))
  stage1 = {}

  def stage_end(stage: loop.Stage, host: TrainState) -> None:
    if not evaluate_at_end:
      return
    if stage.name == "classification":
      path = os.path.join(workdir, STAGE1_RESULTS_NAME)
      if os.path.exists(path):  # a resumed run: the finished stage was evaluated already
        with open(path) as f:
          stage1.update(json.load(f))
        return
      res = experiment.evaluate_and_log(ev("classification"), state_lib.variables(host),
                                        stage.fit_cfg.steps, writer)
      if res is not None:
        stage1.update(res)
        _write_json(res, workdir, STAGE1_RESULTS_NAME)
    else:
      _write_json(plan.stats(), workdir, STATS_NAME)

  final = loop.run_stages(
      stage_list, workdir, writer, step_callback=step_callback, stage_end=stage_end,
      evaluate_fn=lambda stage, host, step: experiment.evaluate_and_log(
          ev(stage.name), state_lib.variables(host), step, writer))
  results = None
  if evaluate_at_end and jax.process_index() == 0:
    results = ev("ranking")(state_lib.variables(final), total)
    if stage1:
      results["classification_stage"] = {"step": stage1.get("step"),
                                         "exits": stage1.get("exits")}
    experiment.log_evaluation(results, total, writer)
    evaluators.write_results(results, workdir)
  writer.close()
  return results


# ----------------------------------------------------------------------------- matching


def load_image(config: ml_collections.ConfigDict, path: str) -> tuple[np.ndarray, np.ndarray]:
  """(normalised float32 HxWx3 at the image's own rounded size, the uint8 image shown)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such image file")
  with open(path, "rb") as f:
    im = aug.to_pil(f.read())
  inp = config.input
  h, w = sizes.target_shape(im.height, im.width, inp.longer_side, inp.size_multiple,
                            min_side(config))
  shown = aug.eval_transform(im, h, w)
  return aug.normalize(shown), shown


def matching_functions(config: ml_collections.ConfigDict, variables: Any
                       ) -> tuple[Callable, Callable]:
  """(feature_map_fn(images) -> last map, head_fn(map) -> embedding) of a trained model,
  for `evaluation.matching` (the paper's "dimensions that contribute most")."""
  model = build_model(config)
  fmap = jax.jit(lambda x: model.apply(variables, x, train=False,
                                       method=DoneRightModel.feature_map))
  head = lambda a: model.apply(variables, a, method=DoneRightModel.embed_from_map)
  return fmap, head
