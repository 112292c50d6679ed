"""Embeds a folder of images with a trained run:
`python -m reid_jax.embed --workdir=RUN --images=DIR_OR_GLOB --output=FEATS.npz`.

Size, normalisation, model and test-time augmentation come from the run
(`reid_jax.inference.run.load_run`); images are preprocessed as its evaluation
does (`reid_jax.inference.images`). Unreadable files are listed in one warning
line and skipped. The output holds `feat/<exit>` [N, D] float32, `names`,
`root` and `run` (the run's identity, so `reid_jax.search` refuses features of
another run).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("images", None, "A folder (every file under it, recursively) or a "
                      "glob ('crops/**/*.jpg', quoted).")
  flags.DEFINE_string("output", None, "The features file to write (.npz).")
  flags.DEFINE_string("exit", None, "Keep only this exit (default: all of the run's).")
  flags.DEFINE_enum("tta", None, ["none", "flip"], "Test-time augmentation (default: the "
                    "run's eval.tta, as its evaluation).")
  flags.DEFINE_integer("batch_size", 64, "Images per batch (the last one padded).")


def check_output(path: str) -> str:
  """The output file's absolute path; its folder must exist (checked before any work)."""
  out = os.path.abspath(path)
  if os.path.isdir(out):
    raise ValueError(f"--output={path} is a folder; name a file such as {path}/feats.npz")
  if not os.path.isdir(os.path.dirname(out)):
    raise ValueError(f"--output={path}: folder {os.path.dirname(out)} does not exist")
  return out


@one_line_errors
def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  from reid_jax.inference import images, run as run_lib  # pylint: disable=import-outside-toplevel
  for name in ("workdir", "images", "output"):
    if not FLAGS[name].value:
      raise ValueError(f"--{name} is required")
  output = check_output(FLAGS.output)
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size}: must be at least 1")
  root, names = images.list_images(FLAGS.images)
  run = run_lib.load_run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.tta)
  exits = images.check_exit(run, FLAGS.exit)
  print(f"{len(names)} files under {root}; {run.method} run {FLAGS.workdir}, step "
        f"{run.step}, tta {run.tta or 'none'}", flush=True)
  embedded = images.embed_files(run, root, names, batch_size=FLAGS.batch_size, exits=exits)
  warning = embedded.warning()
  if warning:
    print(warning, file=sys.stderr, flush=True)
  if not embedded.names:
    raise ValueError(f"--images={FLAGS.images}: none of the {len(names)} files is a "
                     "readable image (see the warning above)")
  images.write_features(output, embedded, run.identity())
  print(embedded.summary())
  print(f"wrote {output}")


def run() -> None:
  """Console-script entry point (`pip install .` puts it on PATH)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
