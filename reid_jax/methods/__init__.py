"""Method families, selected by `config.method`.

Each family is a package `reid_jax.methods.<family>` that owns its sampler, model
outputs, loss, step, optimiser and stages, and exports what the CLIs call:

  train_and_evaluate(config, workdir, *, evaluate_at_end=True, step_callback=None)
      -> final eval results (dict) or None
  load_variables(config, workdir, step=None) -> (variables, step)
      the model variables of a checkpoint (the last stage's for multi-stage methods)
  make_embedder(config) -> embed(variables, images) -> {name: [B, D]}
  evaluate_variables(config, variables, step, rerank=False, tta="") -> results dict
  checkpoint_dir(config, workdir) -> the folder of the final model's checkpoints
  run_embedder(config, variables, tta="") -> jitted embedder needing no dataset
      (both used by `reid_jax.inference.run` to load a run from its workdir alone)
  input_size(config, height, width) -> (h, w)   (optional: per-image input sizes)

The shared machinery (state, loop, checkpoints, optimisers, embedding, evaluators)
lives in `reid_jax.core`, which imports nothing from here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.method -> the family package implementing it.
METHODS: dict[str, str] = {
    "dare": "reid_jax.methods.dare",
    "trinet": "reid_jax.methods.dare",
    "ide": "reid_jax.methods.classification",
    "pcb": "reid_jax.methods.classification",
    "verif_ident": "reid_jax.methods.classification",
    "apr": "reid_jax.methods.classification",
    "done_right": "reid_jax.methods.done_right",
    "msp_cnn": "reid_jax.methods.msp_cnn",
    "pul": "reid_jax.methods.pul",
}


def get(name: str) -> ModuleType:
  """The family module of `config.method`; a one-line error names the registered ones."""
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not a registered method; choose one of "
                     f"{sorted(METHODS)}")
  return importlib.import_module(METHODS[name])
