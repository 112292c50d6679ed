"""Exports a trained run as a served model:
`python -m reid_jax.export --workdir=RUN --format=onnx --output=model.onnx`.

The graph takes RGB images already resized to the run's input size (printed, and
stored in the file's metadata), NHWC uint8 0..255 (`--input=float`: [0, 1]), and holds
the normalisation, the model and the run's flip TTA; one output per exit (`--exit`
keeps some). `--split_exits` writes one graph per exit, DaRe's `stageK` truncated
after stage K, for anytime serving (`reid_jax.inference.export`). Needs the optional
packages jax2onnx, onnx and onnxruntime (the error says how to install them).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
  flags.DEFINE_enum("format", "onnx", ["onnx"], "Served-model format.")
  flags.DEFINE_string("output", None, "The file to write (with --split_exits: "
                      "OUTPUT.EXIT.onnx for each exit).")
  flags.DEFINE_list("exit", [], "Export only these exits, in this order (default: all).")
  flags.DEFINE_bool("all_exits", False, "Every exit of the run (the default, explicit).")
  flags.DEFINE_bool("split_exits", False, "One graph per exit instead of one with every "
                    "exit; DaRe's stageK graph stops after stage K (anytime serving).")
  flags.DEFINE_string("batch", "dynamic", "Batch dimension: dynamic (symbolic) or a fixed N.")
  flags.DEFINE_enum("input", "uint8", ["uint8", "float"],
                    "Input images: uint8 0..255, or float32 in [0, 1]; RGB, NHWC.")
  flags.DEFINE_enum("tta", None, ["none", "flip", "five_crop"], "Test-time augmentation "
                    "inside the graph (default: the run's eval.tta; five_crop is refused).")
  flags.DEFINE_integer("opset", None, "ONNX opset (default: reid_jax.inference.export.OPSET).")


def check_output(path: str, split: bool) -> str:
  """The output file's absolute path; its folder must exist (checked before any work)."""
  out = os.path.abspath(path)
  if os.path.isdir(out):
    raise app.UsageError(f"--output={path} is a folder; name a file such as {path}/model.onnx")
  if not os.path.isdir(os.path.dirname(out)):
    raise app.UsageError(f"--output={path}: folder {os.path.dirname(out)} does not exist")
  if not out.endswith(".onnx"):
    raise app.UsageError(f"--output={path}: name an .onnx file"
                         + (" (--split_exits adds .EXIT before it)" if split else ""))
  return out


@one_line_errors
def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  from reid_jax.inference import export, run as run_lib  # pylint: disable=import-outside-toplevel
  for name in ("workdir", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if FLAGS.exit and FLAGS.all_exits:
    raise app.UsageError(f"--exit={','.join(FLAGS.exit)} and --all_exits: give one of them")
  output = check_output(FLAGS.output, FLAGS.split_exits)
  batch = export.parse_batch(FLAGS.batch)
  export.require()
  run = run_lib.load_run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.tta)
  export.check_exportable(run)
  h, w = run.input_hw
  print(f"{run.method} run {FLAGS.workdir}, step {run.step}: input {h}x{w} RGB "
        f"{FLAGS.input} (resize to {h}x{w} before calling; normalisation inside), tta "
        f"{run.tta or 'none'}, batch {FLAGS.batch}", flush=True)
  written = export.export_onnx(run, output, exits=FLAGS.exit or None, batch=batch,
                               input_dtype=FLAGS.input, split=FLAGS.split_exits,
                               opset=FLAGS.opset or export.OPSET)
  for e in written:
    dims = {x["name"]: x["dim"] for x in json.loads(e.metadata["reid_jax.exits"])}
    outs = ", ".join(f"{k} [B,{d}]" for k, d in dims.items())
    print(f"wrote {e.path} ({os.path.getsize(e.path) / 1e6:.1f} MB): input images "
          f"[B,{h},{w},3] {FLAGS.input} -> {outs}")


def run() -> None:
  """Console-script entry point."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
