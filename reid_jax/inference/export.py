"""A trained run as a served model: ONNX graphs that embed RGB images.

The graph takes images already resized to the run's input size (H x W, as the run's
evaluation resizes: `reid_jax.data.augment.resize`, PIL bilinear) as NHWC RGB, uint8
0..255 (default) or float [0, 1], and holds everything after that: the ImageNet
normalisation (x / 255 - mean) / std, the model in inference mode, the run's flip
test-time augmentation, and one named output per exit ([B, D] float32, ranked by
Euclidean distance). What a server needs besides the graph (input size, normalisation,
exits, the run's identity) is stored in the model's `metadata_props` under `reid_jax.*`.

Anytime serving (DaRe): onnxruntime runs the whole graph whatever outputs are asked
for, so one graph with every exit cannot stop early; `split=True` writes one graph per
exit, `stageK` truncated after backbone stage K (`max_stage=K`, what DaRe's budgeted
embedder runs), so a server picks the graph its budget affords.

The converter is jax2onnx (traces the jaxpr; no TensorFlow). The forward is traced with
`layers.plain_ops()`, so the CPU custom-VJP layers become plain Conv/MaxPool/MatMul.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax import methods
from reid_jax.core import embedding
from reid_jax.data import augment
from reid_jax.inference.run import Run
from reid_jax.models import layers

FORMATS = ("onnx",)
INPUT_DTYPES = ("uint8", "float")
INPUT_NAME = "images"
META_PREFIX = "reid_jax."
OPSET = 18  # onnxruntime >= 1.14 (jax2onnx 0.17 writes opset-18 reductions at 17)
INSTALL = ('pip install "onnx>=1.20.1" "onnx-ir>=1.1" "onnxruntime>=1.24.1" flatbuffers '
           '&& pip install --no-deps "jax2onnx==0.17.1"')
_STAGE = re.compile(r"stage(\d+)$")


class MissingDependency(ValueError):
  """The optional export packages are not installed (a one-line error naming them)."""


@dataclasses.dataclass(frozen=True)
class Exported:
  """One written graph: its file, its outputs (exit names, in order) and metadata."""

  path: str
  exits: tuple[str, ...]
  metadata: dict[str, str]


def require(modules: Sequence[str] = ("jax2onnx", "onnx")) -> None:
  """Imports the export packages or raises `MissingDependency` with the install line."""
  missing = []
  for name in modules:
    try:
      __import__(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise MissingDependency(f"ONNX export needs {', '.join(missing)} (optional, not in "
                            f"requirements.txt); install with: {INSTALL}")


def parse_batch(value: str | int | None, flag: str = "--batch") -> int | None:
  """'dynamic' (or None) -> None (a symbolic batch dimension); 'N' -> N >= 1."""
  if value is None or value == "dynamic":
    return None
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1:
    raise ValueError(f"{flag}={value}: use dynamic or a positive integer batch size")
  return n


def order_exits(names: Sequence[str]) -> list[str]:
  """Exits as a server reads them: stage1, stage2, ... by depth, then the others sorted
  (DaRe: stage1..4, fused)."""
  def key(name):
    m = _STAGE.match(name)
    return (0, int(m.group(1)), "") if m else (1, 0, name)
  return sorted(names, key=key)


def check_exportable(run: Run) -> None:
  """One-line refusals of what a fixed-size graph cannot reproduce."""
  if run.tta == "five_crop":
    raise ValueError(f"{run.workdir}: the run evaluates with five_crop TTA (ten crops of an "
                     "image loaded at x input.augment.resize_scale), which a graph taking "
                     f"{run.input_hw[0]}x{run.input_hw[1]} images cannot hold; pass "
                     "--tta=none (or --tta=flip) to export without it")
  if getattr(methods.get(run.method), "input_size", None) is not None:
    raise ValueError(f"{run.workdir}: config.method={run.method!r} embeds each image at its "
                     "own size, which this fixed-size export does not support yet")


def normalizer(input_dtype: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """images -> normalised float32, in-graph, as `augment.normalize` computes it
  (uint8: x / (255 std) - mean / std with the same float32 constants)."""
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f"--input={input_dtype}: use one of {', '.join(INPUT_DTYPES)}")
  m = np.asarray(augment.IMAGENET_MEAN, np.float32)
  s = np.asarray(augment.IMAGENET_STD, np.float32)
  if input_dtype == "uint8":
    scale, offset = (1.0 / (255.0 * s)).astype(np.float32), (m / s).astype(np.float32)
    return lambda x: x.astype(jnp.float32) * scale - offset
  return lambda x: (x.astype(jnp.float32) - m) / s


def exit_embedder(run: Run, name: str | None = None) -> embedding.Embedder:
  """A fresh embedder of `run` (traced anew, e.g. inside `plain_ops()`), with the run's
  TTA. For exit `stageK` of a family whose `make_embedder` takes `max_stage` (DaRe), the
  network is truncated after stage K; otherwise it is the run's whole model."""
  family = methods.get(run.method)
  m = _STAGE.match(name or "")
  if m and "max_stage" in inspect.signature(family.make_embedder).parameters:
    embed = family.make_embedder(run.config, max_stage=int(m.group(1)))
    return embedding.with_tta(embed, run.tta, run.input_hw)
  return family.run_embedder(run.config, run.variables, run.tta)


def exit_dims(run: Run) -> dict[str, int]:
  """{exit: embedding size} of the run's embedder, in `order_exits` order (no compute)."""
  with layers.plain_ops():
    shapes = jax.eval_shape(exit_embedder(run), run.variables,
                            jax.ShapeDtypeStruct((1, *run.input_hw, 3), jnp.float32))
  return {k: int(shapes[k].shape[-1]) for k in order_exits(list(shapes))}


def select_exits(available: Sequence[str], exits: Sequence[str] | None) -> list[str]:
  """The exits to export (None or empty: all); an unknown name is a one-line error."""
  if not exits:
    return list(available)
  bad = [e for e in exits if e not in available]
  if bad:
    raise ValueError(f"--exit={','.join(exits)}: the run has no exit {bad[0]!r}; its exits "
                     f"are {', '.join(available)}")
  return list(dict.fromkeys(exits))


def serving_fn(run: Run, exits: Sequence[str], input_dtype: str,
               embed: embedding.Embedder) -> Callable[[jnp.ndarray], tuple]:
  """images -> tuple of [B, D] embeddings, one per exit: normalisation, model, TTA,
  with the run's variables as constants."""
  norm = normalizer(input_dtype)
  variables = run.variables

  def serve(images):
    out = embed(variables, norm(images))
    return tuple(out[e].astype(jnp.float32) for e in exits)
  return serve


def metadata(run: Run, exits: dict[str, int], input_dtype: str, batch: int | None,
             truncated: str | None = None) -> dict[str, str]:
  """The `metadata_props` a server reads (string values; json where structured)."""
  h, w = run.input_hw
  meta = {
      "input": {"name": INPUT_NAME, "layout": "NHWC", "channels": "RGB",
                "dtype": "uint8" if input_dtype == "uint8" else "float32",
                "range": "0..255" if input_dtype == "uint8" else "0..1",
                "height": h, "width": w, "batch": batch or "dynamic",
                "resize": f"outside the graph: resize every image to {h}x{w} (PIL bilinear, "
                          "reid_jax.data.augment.resize) before calling"},
      "normalization": {"inside": True, "mean": list(augment.IMAGENET_MEAN),
                        "std": list(augment.IMAGENET_STD),
                        "formula": "(x / 255 - mean) / std" if input_dtype == "uint8"
                                   else "(x - mean) / std"},
      "exits": [{"name": k, "dim": d} for k, d in exits.items()],
      "distance": "euclidean",
      "tta": run.tta or "none",
      "truncated_after": truncated or "none",
      "run": run.identity(),
  }
  return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v)
          for k, v in meta.items()}


def _convert(fn: Callable, run: Run, exits: Sequence[str], input_dtype: str,
             batch: int | None, opset: int) -> Any:
  """jax2onnx's ModelProto of `fn` (called inside `plain_ops()`)."""
  from jax2onnx import to_onnx
  # jax2onnx imports all of its plugins on first use and logs a warning with a
  # traceback for each optional one whose package (equinox, dm_pix) is absent.
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  dtype = jnp.uint8 if input_dtype == "uint8" else jnp.float32
  spec = jax.ShapeDtypeStruct((batch or "B", *run.input_hw, 3), dtype)
  model = to_onnx(fn, [spec], model_name=f"reid_jax_{run.method}", opset=opset,
                  input_names=[INPUT_NAME], output_names=list(exits))
  # The converter annotates some intermediate shapes in NCHW where they are NHWC
  # (onnxruntime then warns "Error merging shape info"); drop them, it infers its own.
  del model.graph.value_info[:]
  return model


def _write(model: Any, path: str, meta: dict[str, str]) -> None:
  """Checks the model, adds the metadata and writes it atomically."""
  import onnx
  onnx.helper.set_model_props(model, meta)
  model.producer_name, model.doc_string = "reid_jax", (
      "Person re-identification embedder; see metadata_props reid_jax.*")
  onnx.checker.check_model(model)
  tmp = f"{path}.partial.{os.getpid()}"
  try:
    onnx.save(model, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def split_path(path: str, exit_name: str) -> str:
  """model.onnx -> model.EXIT.onnx."""
  root, ext = os.path.splitext(path)
  return f"{root}.{exit_name}{ext or '.onnx'}"


def export_onnx(run: Run, path: str, *, exits: Sequence[str] | None = None,
                batch: int | None = None, input_dtype: str = "uint8", split: bool = False,
                opset: int = OPSET) -> list[Exported]:
  """Writes `path` (one graph, an output per exit) or, with `split`, one graph per exit
  at `split_path(path, exit)`; returns what was written."""
  require()
  check_exportable(run)
  normalizer(input_dtype)  # checks the name
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--output={path}: folder {folder} does not exist; create it "
                            "or write elsewhere")
  dims = exit_dims(run)
  chosen = select_exits(list(dims), exits)
  groups = [[e] for e in chosen] if split else [chosen]
  written = []
  for group in groups:
    out = split_path(path, group[0]) if split else path
    truncated = group[0] if split and _STAGE.match(group[0]) else None
    with layers.plain_ops():
      embed = exit_embedder(run, group[0] if split else None)
      model = _convert(serving_fn(run, group, input_dtype, embed), run, group, input_dtype,
                       batch, opset)
    meta = metadata(run, {e: dims[e] for e in group}, input_dtype, batch, truncated)
    _write(model, out, meta)
    written.append(Exported(out, tuple(group), meta))
  return written


# ------------------------------------------------------------------ reading an export


def read_metadata(path: str) -> dict[str, Any]:
  """The `reid_jax.*` metadata of an exported file, json values decoded."""
  require(("onnx",))
  import onnx
  model = onnx.load(path, load_external_data=False)
  out = {}
  for p in model.metadata_props:
    if p.key.startswith(META_PREFIX):
      try:
        out[p.key[len(META_PREFIX):]] = json.loads(p.value)
      except ValueError:
        out[p.key[len(META_PREFIX):]] = p.value
  return out


def onnx_embedder(path: str, threads: int | None = None
                  ) -> Callable[..., dict[str, np.ndarray]]:
  """onnxruntime (CPU) embedder of an exported file: images -> {exit: [B, D]}; pass
  `outputs=[...]` to fetch only some exits."""
  require(("onnxruntime",))
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]

  def embed(images: np.ndarray, outputs: Sequence[str] | None = None):
    wanted = list(outputs or names)
    return dict(zip(wanted, session.run(wanted, {INPUT_NAME: np.asarray(images)})))
  return embed
