"""Pictures of a trained model.

`python -m reid_jax.visualize matching --config=... --workdir=DIR --query=A.jpg
--gallery=B.jpg [--output=matching.png] [--k=5]` writes, for a query/gallery pair, the
`k` embedding dimensions that contribute most to their similarity (largest q_i * d_i)
and, for each, a Grad-CAM heat map of that dimension on both images (Re-ID done right,
Almazan et al. 2018, its figure of "the 5 dimensions that contribute most"). Each image
is embedded at its own size, as in training. Methods that expose `matching_functions`
support it (config.method done_right).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from reid_jax import methods
from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors
from reid_jax.evaluation import matching

FLAGS = flags.FLAGS
COMMANDS = ("matching",)


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("query", None, "Query image file.")
  flags.DEFINE_string("gallery", None, "Gallery image file.")
  flags.DEFINE_integer("k", 5, "Number of dimensions shown.")
  flags.DEFINE_string("output", None, "PNG to write (default: WORKDIR/matching.png).")


@one_line_errors
def main(argv):
  writer_lib.quiet_library_logs()
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m reid_jax.visualize {{{','.join(COMMANDS)}}} "
                         "--config=... --workdir=... --query=... --gallery=...")
  for name in ("workdir", "query", "gallery"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  config = FLAGS.config
  family = methods.get(config.method)
  if not hasattr(family, "matching_functions"):
    raise app.UsageError(f"matching regions need a method that exposes its last feature "
                         f"map; config.method={config.method!r} does not (use done_right)")
  variables, step = family.load_variables(config, FLAGS.workdir, FLAGS.checkpoint)
  q, q_shown = family.load_image(config, FLAGS.query)
  g, g_shown = family.load_image(config, FLAGS.gallery)
  fmap, head = family.matching_functions(config, variables)
  res = matching.matching_regions(fmap, head, q, g, k=FLAGS.k)
  output = os.path.abspath(FLAGS.output or os.path.join(FLAGS.workdir, "matching.png"))
  matching.matching_figure(q_shown, g_shown, res["query_maps"], res["gallery_maps"],
                           res["dims"], res["products"], output,
                           similarity=res["similarity"])
  dims = ", ".join(f"{int(d)} ({p:+.3f})" for d, p in zip(res["dims"], res["products"]))
  print(f"checkpoint {step}: similarity {res['similarity']:.4f}; top dimensions {dims}")
  print(f"wrote {output}")


def run() -> None:
  """Console-script entry point (`pip install .` puts it on PATH)."""
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
