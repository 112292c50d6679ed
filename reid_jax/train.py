"""Trains a re-ID model: `python -m reid_jax.train --config=configs/dare.py --workdir=DIR`.

`config.method` selects the method family (`reid_jax.methods`); this CLI only parses
flags, starts multi-host JAX when launched so, and calls the family's
`train_and_evaluate`. Re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from reid_jax import methods, pretrained
from reid_jax.core import parallel
from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dare.py:synthetic",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and eval results.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-host runs (SLURM/TPU auto-detect "
                      "when unset; see launch/).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_bool("eval_at_end", True, "Evaluate the final model and write eval_results.json.")


@one_line_errors
def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (checkpoints, logs and eval results go there)")
  method = methods.get(FLAGS.config.method)
  parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  logging.info("JAX processes %d, devices %d (local %d)", jax.process_count(),
               jax.device_count(), jax.local_device_count())
  warning = pretrained.announce(FLAGS.config.model)
  if warning:
    logging.warning(warning)
  method.train_and_evaluate(FLAGS.config, FLAGS.workdir, evaluate_at_end=FLAGS.eval_at_end)


def run() -> None:
  """Console-script entry point (`pip install .` puts it on PATH)."""
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
