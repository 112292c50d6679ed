"""What every method's `train_and_evaluate` shares around `fit`: the workdir's saved
config, the writer, evaluating and logging a state, restoring a checkpoint's variables.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections

from reid_jax.core import evaluators
from reid_jax.core.checkpoint import Checkpointer
from reid_jax.core.writer import MetricWriter

# The config sections a resumed run must share with the one that wrote the workdir.
RESUME_KEYS = ("method", "dataset", "model", "loss", "input")
# Fields of those sections that only choose the initial weights, which a checkpoint
# replaces: a resumed run may name them differently (e.g. a weights file that moved).
INIT_ONLY = {"model": ("pretrained",)}


def _resume_view(section_name: str, section):
  """The part of a config section that must match to resume."""
  if not isinstance(section, dict):
    return section
  return {k: v for k, v in section.items() if k not in INIT_ONLY.get(section_name, ())}


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run whose method/model/data/loss differ from the saved config.

  A workdir without any checkpoint holds no run yet, so it never refuses a new config
  (a first start that failed before training leaves the folder reusable).
  """
  path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path) or not _has_checkpoint(ckpt_dir):
    return
  new = json.loads(config.to_json())
  with open(path) as f:
    old = json.load(f)
  for key in RESUME_KEYS:
    if (_resume_view(key, old.get(key, "" if key == "method" else None))
        != _resume_view(key, new.get(key))):
      raise ValueError(
          f"{workdir} holds a run with a different config.{key} (see {path}); use a new "
          "--workdir or the same config to resume")


def _has_checkpoint(ckpt_dir: str) -> bool:
  """True if the folder (or a stage folder inside it) holds a finished checkpoint."""
  if not os.path.isdir(ckpt_dir):
    return False
  for root, dirs, _ in os.walk(ckpt_dir):
    if any(d.isdigit() for d in dirs):
      return True
  return False


def save_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(json.loads(config.to_json()), f, indent=2)
  os.replace(path + ".tmp", path)


def saved_method(workdir: str) -> str | None:
  """config.method of the run saved in `workdir` (None when there is no config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("method", "")


def make_writer(workdir: str, total_steps: int) -> MetricWriter:
  """The run's metric writer (silent on processes other than 0)."""
  return MetricWriter(workdir, total_steps, enabled=jax.process_index() == 0)


def log_evaluation(results: dict, step: int, writer: MetricWriter) -> None:
  """Writes every exit's metrics to the writer and prints the table."""
  for exit_name, m in results["exits"].items():
    writer.write(step, {k: v for k, v in m.items() if isinstance(v, float)},
                 prefix=f"eval/{exit_name}/")
  print(evaluators.format_table(results), flush=True)


def evaluate_and_log(evaluate_fn: Callable[[Any, int], dict], variables: Any, step: int,
                     writer: MetricWriter, workdir: str | None = None) -> dict | None:
  """Process 0 evaluates `variables`, logs them, and writes eval_results.json if `workdir`."""
  if jax.process_index() != 0:
    return None
  results = evaluate_fn(variables, step)
  log_evaluation(results, step, writer)
  if workdir is not None:
    evaluators.write_results(results, workdir)
  return results


def infer_classes(abstract_params: Callable[[int], Any], params: Any) -> int:
  """The classifier size of `params`: `abstract_params(n)` gives the parameter shapes
  of the method's model with n classes; the leaves whose shape changes with n carry it.
  Returns 0 for a model without a classifier.
  """
  a = jax.tree_util.tree_leaves_with_path(abstract_params(7))
  b = dict(jax.tree_util.tree_leaves_with_path(abstract_params(11)))
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, leaf in a:
    other = b.get(path)
    if other is None or other.shape == leaf.shape or path not in got:
      continue
    axis = [i for i, (x, y) in enumerate(zip(leaf.shape, other.shape)) if x != y][0]
    return int(got[path].shape[axis])
  return 0


def restore_variables(ckpt_dir: str, template: Any = None, step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
  """{'params', 'batch_stats'} of checkpoint `step` (default: newest) of `ckpt_dir`.

  `template` is a host train state of the right structure. Without one the arrays are
  read as saved, so nothing else of the run (its dataset, its ImageNet file, the class
  count) is needed: for using a trained model outside its benchmark. Read-only.
  """
  ckpt = Checkpointer(ckpt_dir, create=False) if os.path.isdir(ckpt_dir) else None
  steps = ckpt.all_steps() if ckpt else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first with "
                            "`python -m reid_jax.train --config=... --workdir=...`")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"--checkpoint={step} is not in {ckpt_dir}; available: {steps}")
  try:
    state = ckpt.restore(step, None if template is None else jax.device_get(template))
  except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore errors)
    what = ("is unreadable (damaged)" if template is None or not ckpt.readable(step)
            else "does not match this config")
    raise ValueError(f"checkpoint {step} in {ckpt_dir} {what}: {type(e).__name__}; pick "
                     f"another with --checkpoint (available: {steps})") from None
  finally:
    ckpt.close()
  if template is not None:
    return {"params": state.params, "batch_stats": state.batch_stats}, step
  if not isinstance(state, dict) or "params" not in state:
    raise ValueError(f"checkpoint {step} in {ckpt_dir} holds no model parameters; is it "
                     "a reid_jax training checkpoint?")
  return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}, step
