"""Progressive unsupervised learning (PUL; Fan, Zheng, Yan & Yang, TOMM 2018) on the core.

Stage 0 trains IDE on the labelled source domain (`config.source_dataset`; skipped when
`config.pul.source_workdir` names a finished IDE or PUL run). Then every round r:

  1. embed the unlabelled target training images (`config.dataset`) with round r-1's
     model (round 1: the source model), read through `data.Unlabelled` (no identities);
  2. k-means into `pul.num_clusters` clusters, centre = the image nearest each
     centroid, reliable = cosine similarity to the centre > `pul.lam`
     (`clustering.py`); saved atomically as `checkpoints/round_NN.pseudo_labels.npz`;
  3. re-initialise from the SOURCE model with a new K-way classifier (the public code
     reloads `0.ckpt` every round) and fine-tune on the reliable images, cluster = label.

Each round is a `loop.Stage` in `checkpoints/round_NN`, resumable like any stage; a
resumed round reuses its saved pseudo-labels and never clusters again. After each round
`pul_rounds.json` records the number of reliable images, the cluster purity against the
true target labels (read only by `report.py`) and rank-1/mAP on the target test split.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reid_jax.core import embedding, evaluators, experiment, loop, optim, parallel
from reid_jax.core import state as state_lib
from reid_jax.data import identities, pipeline
from reid_jax.methods.classification import losses, models
from reid_jax.methods.classification import train as ide
from reid_jax.methods.pul import clustering, data, report

SOURCE = "source"
FEATURES = ("pool", "feature")


def round_name(r: int) -> str:
  return f"round_{r:02d}"


# ----------------------------------------------------------------------------- configs


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def source_dataset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.source_dataset`, its empty data_dir meaning the target's."""
  d = _copy(config.source_dataset)
  if not d.data_dir:
    d.data_dir = config.dataset.data_dir
  return d


def source_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage 0's config: IDE with this config's model, input and optimiser on the source."""
  c = _copy(config)
  c.method = "ide"
  c.dataset = source_dataset(config)
  return c


def round_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What the rounds build, embed and fine-tune with: method 'pul' (exit name), the
  round optimiser and batch, image batches ('shuffle')."""
  c = _copy(config)
  c.optimizer = _copy(config.pul.optimizer)
  c.input.sampler = "shuffle"
  c.input.batch_size = int(config.pul.batch_size)
  c.loss.triplet_weight = 0.0
  return c


def _program_json(config: ml_collections.ConfigDict) -> str:
  """The sections a round's network, step and embedders depend on (cache keys: runs
  that differ only in data, PUL schedule or evaluation share compiled programs)."""
  c = round_config(config)
  view = {k: json.loads(c[k].to_json()) for k in ("model", "input", "loss", "optimizer")}
  view.update(method=c.method, seed=int(c.seed), train={"sync_bn": bool(c.train.sync_bn)})
  return json.dumps(view, sort_keys=True)


def validate(config: ml_collections.ConfigDict) -> None:
  """This family's settings, checked before any work (one line each, naming the field)."""
  p = config.pul
  if int(p.rounds) < 1:
    raise ValueError(f"config.pul.rounds={p.rounds}: must be at least 1")
  if int(p.num_clusters) < 1:
    raise ValueError(f"config.pul.num_clusters={p.num_clusters}: must be at least 1 (PUL: "
                     "750 for Market-1501, 700 for DukeMTMC-reID)")
  if not -1.0 <= float(p.lam) < 1.0:
    raise ValueError(f"config.pul.lam={p.lam}: a cosine similarity threshold in [-1, 1)")
  if p.reliable_rule not in clustering.RULES:
    raise ValueError(f"config.pul.reliable_rule={p.reliable_rule!r}: use 'own' or 'any'")
  if p.feature not in FEATURES:
    raise ValueError(f"config.pul.feature={p.feature!r}: use 'pool' (the pooled backbone "
                     "feature, as the public code) or 'feature' (IDE's test feature)")
  if int(p.steps) < 0 or (int(p.steps) == 0 and int(p.epochs) < 1):
    raise ValueError(f"config.pul.steps={p.steps}, config.pul.epochs={p.epochs}: set steps "
                     "per round (> 0) or epochs per round (>= 1) with steps=0")
  if int(p.kmeans_n_init) < 1:
    raise ValueError(f"config.pul.kmeans_n_init={p.kmeans_n_init}: must be at least 1")
  parallel.check_divisible(int(p.batch_size), "config.pul.batch_size")
  ide.validate(source_config(config))  # the IDE settings of stage 0 and of the rounds' model


# ----------------------------------------------------------------------------- source


@dataclasses.dataclass
class Source:
  """The source model: its variables and classifier size."""
  variables: dict
  classes: int


def _source_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  return dataclasses.replace(ide.stages(source_config(config))[0], name=SOURCE)


def source_classes(config: ml_collections.ConfigDict) -> int:
  """The source run's class count: its training identities, or the saved run's."""
  if config.pul.source_workdir:
    return int(_source_run(config)[0]["model"]["num_classes"])
  return identities.num_classes(source_config(config))


def _source_run(config: ml_collections.ConfigDict) -> tuple[dict, str]:
  """(saved IDE config, checkpoint folder) of `pul.source_workdir` (an IDE run, or a
  PUL run whose stage 0 is used); one line if it is not one or its model differs."""
  wd = os.path.abspath(os.path.expanduser(config.pul.source_workdir))
  path = os.path.join(wd, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"config.pul.source_workdir={config.pul.source_workdir}: no {path}; "
                     "point it at a finished IDE (or PUL) training workdir")
  with open(path) as f:
    saved = json.load(f)
  if saved.get("method") == "pul":  # its stage 0
    classes = saved["pul"]["source_classes"]
    saved = source_config(ml_collections.ConfigDict(saved)).to_dict()
    saved["model"]["num_classes"] = classes
    ckpt = loop.stage_dir(wd, SOURCE)
  elif saved.get("method") == "ide":
    ckpt = loop.stage_dir(wd)
  else:
    raise ValueError(f"config.pul.source_workdir={config.pul.source_workdir} holds a "
                     f"config.method={saved.get('method')!r} run; PUL starts from an IDE run")
  mine = config.model.to_dict()
  for key in sorted(set(mine) | set(saved["model"])):
    if key not in ("pretrained", "num_classes") and mine.get(key) != saved["model"].get(key):
      raise ValueError(f"config.model.{key}={mine.get(key)!r} but the source run in "
                       f"{wd} has {saved['model'].get(key)!r}; use its model settings")
  return saved, ckpt


def _template(config: ml_collections.ConfigDict, classes: int, opt_cfg, steps: int):
  """A zero train state of the right structure to restore into (shapes from tracing
  the model's init: nothing is compiled)."""
  model = ide.build_model(config, classes)
  rng = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          {"params": rng, "dropout": rng},
                          jnp.zeros((1, config.input.height, config.input.width, 3)))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return ide.create_train_state(variables, config, classes, steps, opt_cfg)


def load_source(config: ml_collections.ConfigDict) -> Source:
  """The trained source model of `pul.source_workdir`."""
  saved, ckpt = _source_run(config)
  cfg = ml_collections.ConfigDict(saved)
  classes = int(saved["model"]["num_classes"])
  template = _template(cfg, classes, cfg.optimizer, max(int(cfg.train.steps), 1))
  variables, _ = experiment.restore_variables(ckpt, template)
  return Source(variables, classes)


# ----------------------------------------------------------------------------- embedding


@functools.lru_cache(maxsize=8)
def _feature_embedder(config_json: str, classes: int, feature: str) -> Callable:
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  model = ide.build_model(cfg, classes)

  @jax.jit
  def embed(variables, images):
    out = model.apply(variables, images, train=False)
    return out["pool"] if feature == "pool" else ide.l2_normalize(out["feature"])
  return embed


@functools.lru_cache(maxsize=8)
def _eval_embedder(config_json: str, tta: str, classes: int) -> embedding.Embedder:
  return ide.make_embedder(ml_collections.ConfigDict(json.loads(config_json)), tta, classes)


def make_embedder(config: ml_collections.ConfigDict, tta: str = "",
                  classes: int | None = None) -> embedding.Embedder:
  """jitted images -> {'pul': L2-normalised IDE feature} of a round's (K-class) model."""
  return _eval_embedder(_program_json(config), embedding.check_tta(tta, "--tta"),
                        int(classes or config.pul.num_clusters))


def embed_query_gallery(config: ml_collections.ConfigDict, variables: Any, tta: str = "",
                        classes: int | None = None):
  return evaluators.embed_query_gallery(config, make_embedder(config, tta, classes),
                                        variables, embedding.check_tta(tta, "--tta"))


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any, step: int,
                       rerank: bool = False, tta: str = "", embedded=None,
                       classes: int | None = None) -> dict:
  """Ranks the target (config.dataset) test split with the model's IDE feature."""
  tta = embedding.check_tta(tta, "--tta")
  if embedded is None:
    embedded = embed_query_gallery(config, variables, tta, classes)
  return evaluators.evaluate_embeddings(config, embedded, step=step, rerank=rerank, tta=tta)


# ----------------------------------------------------------------------------- rounds


def label_settings(config: ml_collections.ConfigDict, r: int, num_images: int) -> dict:
  """What a round's pseudo-labels depend on, saved with them and checked on reuse."""
  p = config.pul
  return {"round": r, "num_clusters": int(p.num_clusters), "lam": float(p.lam),
          "rule": p.reliable_rule, "feature": p.feature, "seed": int(config.seed) + r,
          "n_init": int(p.kmeans_n_init), "max_iter": int(p.kmeans_max_iter),
          "num_images": int(num_images)}


def compute_pseudo_labels(config: ml_collections.ConfigDict, r: int,
                          target: data.Unlabelled, variables: Any, classes: int
                          ) -> clustering.PseudoLabels:
  """Steps 1-2 of a round: embed the unlabelled target, cluster, select reliable images."""
  p = config.pul
  t0 = time.time()
  feats = data.embed_unlabelled(
      target, _feature_embedder(_program_json(config), classes, p.feature), variables,
      height=config.input.height, width=config.input.width,
      batch_size=config.input.eval_batch_size)
  t1 = time.time()
  settings = label_settings(config, r, len(target))
  cl = clustering.cluster(feats, int(p.num_clusters), seed=settings["seed"],
                          n_init=settings["n_init"], max_iter=settings["max_iter"])
  sel = clustering.select_reliable(feats, cl.assignment, cl.centres, float(p.lam),
                                   p.reliable_rule)
  if jax.process_index() == 0:
    print(f"{round_name(r)}: {int(sel.reliable.sum())} reliable of {len(feats)} target "
          f"images (embedding {t1 - t0:.1f} s, k-means {cl.iterations} iterations "
          f"{time.time() - t1:.1f} s)", flush=True)
  return clustering.PseudoLabels(assignment=cl.assignment, centres=cl.centres,
                                 similarity=sel.similarity, reliable=sel.reliable,
                                 settings=settings)


def round_pseudo_labels(config: ml_collections.ConfigDict, workdir: str, r: int,
                        target: data.Unlabelled, previous: Callable[[], Source]
                        ) -> clustering.PseudoLabels:
  """The round's saved pseudo-labels, computed (by process 0) and saved first if absent.

  Always read back from the file, so a resumed round trains on exactly what was saved.
  `previous()` gives round r-1's model; it is only called when clustering is needed.
  """
  path = clustering.labels_path(loop.stage_dir(workdir, round_name(r)))
  if not os.path.exists(path):
    if jax.process_index() == 0:
      prev = previous()
      clustering.save(path, compute_pseudo_labels(config, r, target, prev.variables,
                                                  prev.classes))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"pul {round_name(r)} pseudo-labels")
  return clustering.load(path, label_settings(config, r, len(target)))


def round_steps(config: ml_collections.ConfigDict, num_reliable: int) -> int:
  """`pul.steps`, or `pul.epochs` passes over the reliable images (the public code's
  steps_per_epoch = len(images) / BATCH_SIZE + 1)."""
  p = config.pul
  if int(p.steps) > 0:
    return int(p.steps)
  return int(p.epochs) * (num_reliable // int(p.batch_size) + 1)


def fresh_classifier(rng: jax.Array, config: ml_collections.ConfigDict, k: int) -> dict:
  """A new K-way classifier (N(0, 0.001) weights, zero bias: the public code's fc8)."""
  layer = models.classifier(k, jnp.float32, "classifier")
  return layer.init(rng, jnp.zeros((1, int(config.model.bottleneck)), jnp.float32))["params"]


def round_variables(source: Source, classifier: dict) -> dict:
  """The source model with its classifier replaced (every round starts here)."""
  params = dict(source.variables["params"])
  params["head"] = dict(params["head"], classifier=classifier)
  return {"params": params, "batch_stats": source.variables["batch_stats"]}


def round_iterator(config: ml_collections.ConfigDict, r: int, target: data.Unlabelled,
                   labels: clustering.PseudoLabels):
  """Shuffled, augmented batches of the round's reliable images, person_id = cluster + 1."""
  view = data.PseudoLabelled(target, labels.indices, labels.labels)
  inp = config.input
  return pipeline.train_loader(
      view, sampler="shuffle", batch_size=int(config.pul.batch_size), labels=view.labels(),
      height=inp.height, width=inp.width, augment=inp.augment, seed=int(config.seed) + r,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=inp.worker_count)


def prepare_round_batch(b: dict, step: int) -> dict:
  del step
  return {"image": b["image"], "label": (b["person_id"] - 1).astype(np.int32)}


def _round_key(config: ml_collections.ConfigDict, steps: int) -> str:
  """What a round's compiled step and optimiser depend on (equal for every round)."""
  return json.dumps({"config": json.loads(_program_json(config)),
                     "k": int(config.pul.num_clusters), "steps": int(steps)}, sort_keys=True)


@functools.lru_cache(maxsize=4)
def _round_program(key: str) -> tuple[Any, Any, Callable, Callable]:
  """(model, optimiser, step_fn, pmapped guarded step) shared by all rounds of a run.

  Each `loop.fit` would otherwise pmap (and compile) the step anew every round: one
  program, the same model and optimiser objects (static parts of the train state), and
  the run's seed for the step keys let every round reuse the first round's compile.
  """
  spec = json.loads(key)
  cfg, k = ml_collections.ConfigDict(spec["config"]), spec["k"]
  model = ide.build_model(cfg, k)
  rng = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          {"params": rng, "dropout": rng},
                          jnp.zeros((1, cfg.input.height, cfg.input.width, 3), jnp.float32))
  tx = optim.make_optimizer(cfg.optimizer, spec["steps"], shapes["params"])
  step_fn = functools.partial(ide.train_step, model=ide.build_model(cfg, k, train=True),
                              config=cfg, loss_fn=losses.LOSSES["ide"])
  p_step = jax.pmap(loop.device_step(step_fn, int(cfg.seed)), axis_name=parallel.AXIS,
                    donate_argnums=(0,))
  return model, tx, step_fn, p_step


def round_stage(config: ml_collections.ConfigDict, r: int, source: Source,
                target: data.Unlabelled, labels: clustering.PseudoLabels) -> loop.Stage:
  """Step 3 of round r as a resumable stage: fine-tune the source model on the labels."""
  k = int(config.pul.num_clusters)
  if not labels.reliable.any():
    raise ValueError(f"{round_name(r)}: no target image is more similar than "
                     f"config.pul.lam={config.pul.lam} to its cluster centre; lower it")
  steps = round_steps(config, int(labels.reliable.sum()))
  model, tx, step_fn, p_step = _round_program(_round_key(config, steps))

  def init_state(previous):
    del previous  # PUL re-initialises from the source model every round
    clf = fresh_classifier(jax.random.PRNGKey(int(config.seed) + r), config, k)
    return state_lib.create(model.apply, round_variables(source, clf), tx)

  def custom_step(state, batch, step):
    return p_step(state, parallel.shard(batch, jax.local_device_count()), step)

  return loop.Stage(
      name=round_name(r), fit_cfg=loop.FitConfig.from_config(config, steps),
      init_state=init_state, step_fn=step_fn,
      make_iterator=lambda: round_iterator(config, r, target, labels),
      prepare_batch=prepare_round_batch, examples_per_step=int(config.pul.batch_size),
      custom_step=custom_step)


def stages(config: ml_collections.ConfigDict) -> list[loop.Stage]:
  """Stage 0 (IDE on the source), when trained here. The rounds cannot be listed ahead:
  each needs the previous round's model; `train_and_evaluate` builds them one by one."""
  return [] if config.pul.source_workdir else [_source_stage(config)]


# ----------------------------------------------------------------------------- run


_UNCHECKED = ("eval_each_round",)


def _check_resume(saved: ml_collections.ConfigDict, workdir: str) -> None:
  """Besides the shared check: a started run keeps its source and PUL settings."""
  experiment.check_workdir_config(saved, workdir)
  path = os.path.join(workdir, "config.json")
  ckpt = loop.stage_dir(workdir)
  if not os.path.exists(path) or not os.path.isdir(ckpt) or not os.listdir(ckpt):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(saved.to_json())
  for section in ("source_dataset", "pul"):
    a = {k: v for k, v in (old.get(section) or {}).items() if k not in _UNCHECKED}
    b = {k: v for k, v in new[section].items() if k not in _UNCHECKED}
    if a != b:
      raise ValueError(f"{workdir} holds a run with a different config.{section} (see "
                       f"{path}); use a new --workdir or the same config to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_at_end: bool = True,
                       step_callback: Callable[[int], None] | None = None) -> dict | None:
  """Stage 0 (unless `pul.source_workdir`), then `pul.rounds` rounds, each resumable;
  writes pul_rounds.json after every round and eval_results.json (last round) at the end."""
  workdir = os.path.abspath(workdir)
  validate(config)
  target = data.open_target(config)
  saved = _copy(config)
  saved.pul.source_classes = source_classes(config)
  _check_resume(saved, workdir)
  experiment.save_workdir_config(saved, workdir)
  writer = experiment.make_writer(workdir, 1)
  p = config.pul
  if p.source_workdir:
    source = load_source(config)
  else:
    final = loop.run_stages(stages(config), workdir, writer, step_callback=step_callback)
    source = Source(state_lib.variables(final), saved.pul.source_classes)
  rows = report.load_rows(workdir)
  if 0 not in rows:
    results = evaluate_variables(config, source.variables, 0, classes=source.classes) if (
        p.eval_each_round) else None
    rows[0] = report.round_row(0, None, None, results)
    report.write_rows(workdir, rows)
  current = source
  rounds = int(p.rounds)
  for r in range(1, rounds + 1):
    used = r < rounds and os.path.exists(clustering.labels_path(
        loop.stage_dir(workdir, round_name(r + 1))))
    if used and r in rows:
      continue  # finished, and round r+1 already clustered with its model
    labels = round_pseudo_labels(config, workdir, r, target, lambda: current)
    final = loop.run_stages([round_stage(config, r, source, target, labels)], workdir,
                            writer, step_callback=step_callback)
    current = Source(state_lib.variables(final), int(p.num_clusters))
    last_step = int(final.step)  # results carry the round's step, as its checkpoint
    if r not in rows:
      last = r == rounds
      results = evaluate_variables(config, current.variables, last_step) if (
          p.eval_each_round or (last and evaluate_at_end)) else None
      rows[r] = report.round_row(r, labels, report.true_target_labels(config), results)
      report.write_rows(workdir, rows)
      if jax.process_index() == 0:
        print(report.format_table(rows), flush=True)
  results = None
  if evaluate_at_end:
    results = rows[rounds].get("results") or evaluate_variables(
        config, current.variables, last_step)
    if jax.process_index() == 0:
      experiment.log_evaluation(results, last_step, writer)
      evaluators.write_results(results, workdir)
  writer.close()
  return results


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> tuple[Any, int]:
  """{'params', 'batch_stats'} of the last round's checkpoint `step` (default: newest)."""
  k = int(config.pul.num_clusters)
  cfg = round_config(config)
  template = _template(cfg, k, cfg.optimizer, 1)
  return experiment.restore_variables(
      loop.stage_dir(workdir, round_name(int(config.pul.rounds))), template, step)
