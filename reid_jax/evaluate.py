"""Evaluates a checkpoint: `python -m reid_jax.evaluate --config=... --workdir=DIR`.

Embeds query and gallery with the method's embedder (`config.method`), ranks the
gallery per query with the config's protocol(s) and writes `DIR/evaluate_results.json`
(or `--output`; training's own `DIR/eval_results.json` is never touched):
  {"step": int, "dataset": str, "exits": {"stage1": {"rank1", "rank5", "rank10",
   "mAP", "mINP"}, ..., "fused": {...}}, "num_queries", "num_valid_queries", ...}
with metrics as fractions in [0, 1], and prints the same as a table. DaRe models
also give the §4 anytime / budgeted-stream curves (`--budget`). `--report` adds
report.html beside the results file (`reid_jax.evaluation.report`).
"""

from __future__ import annotations

import os

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from reid_jax import methods
from reid_jax.core import embedding, evaluators, experiment
from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors

FLAGS = flags.FLAGS
BUDGET_MODES = ("anytime", "stream")
RESULTS_NAME = "evaluate_results.json"


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("output", None, "Results file (default: WORKDIR/evaluate_results.json; "
                      "training's WORKDIR/eval_results.json is never overwritten).")
  flags.DEFINE_bool("rerank", None, "k-reciprocal re-ranking (Zhong et al. 2017); "
                    "default: the config's eval.rerank.")
  flags.DEFINE_enum("tta", None, ["", "none", "flip", "five_crop"],
                    "Test-time augmentation; default: the config's eval.tta (as in training).")
  flags.DEFINE_list("budget", [],
                    "DaRe §4: anytime and/or stream curves (+ PNG plots), e.g. "
                    "--budget=anytime,stream (the images are embedded once for both).")
  flags.DEFINE_list("ensemble", [],
                    "Anytime baseline: single-exit models as WORKDIR (the config saved "
                    "there by training) or CONFIG@WORKDIR, e.g. runs/r18,runs/r34 or "
                    "configs/trinet.py:resnet18@runs/r18,...")
  flags.DEFINE_string("dataset", None, "Evaluate on another prepared dataset, NAME[/CONFIG] "
                      "(e.g. market1501, synthetic_reid/tiny; cross-domain); default: the "
                      "config's. The checkpoint is still built from the config's own.")
  flags.DEFINE_string("data_dir", None, "tfds data_dir of the evaluated dataset (default: "
                      "config.dataset.data_dir).")
  flags.DEFINE_bool("report", False, "Also write report.html beside the results file: "
                    "metrics, CMC and budget plots, ranked lists of the worst and best "
                    "queries (one self-contained page).")
  flags.DEFINE_string("report_exit", None, "The exit whose ranked lists --report shows "
                      "(default: fused for DaRe, otherwise the method's first exit).")


def with_dataset(config, name: str | None, data_dir: str | None):
  """`config` with the evaluated dataset replaced (--dataset=NAME[/CONFIG], --data_dir)."""
  if name is None and data_dir is None:
    return config
  if name is not None and not name.partition("/")[0]:
    raise app.UsageError(f"--dataset={name}: give NAME or NAME/CONFIG, e.g. market1501")
  c = ml_collections.ConfigDict(config.to_dict())
  if name is not None:
    c.dataset.name, _, c.dataset.builder_config = name.partition("/")
  if data_dir is not None:
    c.dataset.data_dir = data_dir
  return c


def check_method_matches(config, workdir: str) -> None:
  """A checkpoint of one method evaluated with another method's config: one line."""
  saved = experiment.saved_method(workdir)
  if saved is not None and saved and saved != config.method:
    raise app.UsageError(f"{workdir} holds a config.method={saved!r} run but --config is "
                         f"config.method={config.method!r}; pass the config it was trained "
                         "with")


@one_line_errors
def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  trained = FLAGS.config  # builds the checkpoint's model (class counts of its dataset)
  config = with_dataset(trained, FLAGS.dataset, FLAGS.data_dir)  # what is evaluated
  method = methods.get(config.method)
  check_method_matches(config, FLAGS.workdir)
  rerank = config.eval.rerank if FLAGS.rerank is None else FLAGS.rerank
  tta = embedding.check_tta(config.eval.tta if FLAGS.tta is None else FLAGS.tta, "--tta")
  bad = [m for m in FLAGS.budget if m not in BUDGET_MODES]
  if bad:
    raise app.UsageError(f"--budget={','.join(FLAGS.budget)}: unknown mode(s) {bad}; use "
                         f"{' and/or '.join(BUDGET_MODES)}, e.g. --budget=anytime,stream")
  if FLAGS.ensemble and "anytime" not in FLAGS.budget:
    raise app.UsageError("--ensemble is the baseline of the anytime curve: add "
                         "--budget=anytime")
  if FLAGS.budget and config.method not in ("dare", "trinet"):
    raise app.UsageError(f"--budget needs a multi-exit DaRe model; config.method is "
                         f"{config.method!r}")
  output = os.path.abspath(FLAGS.output or os.path.join(FLAGS.workdir, RESULTS_NAME))
  if FLAGS.output and os.path.basename(output) == evaluators.TRAIN_RESULTS_NAME and (
      os.path.dirname(output) == os.path.abspath(FLAGS.workdir)):
    raise app.UsageError(f"--output={FLAGS.output}: that is training's results file; "
                         "name another")
  if FLAGS.output and not os.path.isdir(os.path.dirname(output)):
    raise app.UsageError(f"--output={FLAGS.output}: folder {os.path.dirname(output)} does "
                         "not exist")
  anytime = None
  if FLAGS.budget:
    from reid_jax.methods.dare import anytime  # DaRe §4 only
    # Read (and check) the members first, so a bad entry fails before any embedding.
    ensemble = anytime.load_ensemble(FLAGS.ensemble, config.dataset)
  if FLAGS.report_exit and not FLAGS.report:
    raise app.UsageError("--report_exit chooses the ranked lists of --report: add --report")
  if FLAGS.report:
    from reid_jax.evaluation import report  # pylint: disable=import-outside-toplevel
    report.check_image_protocol(evaluators.protocol_names(
        config.eval.get("protocol", "market"))[0], {})
  variables, step = method.load_variables(trained, FLAGS.workdir, FLAGS.checkpoint)
  if anytime is None and not FLAGS.report:
    results = method.evaluate_variables(config, variables, step, rerank, tta)
  else:  # embedded once, for the evaluation, the budget curves and the report
    embedded = method.embed_query_gallery(config, variables, tta)
    results = method.evaluate_variables(config, variables, step, rerank, tta,
                                        embedded=embedded)
  if FLAGS.report:
    report_exit = report.check_exit(FLAGS.report_exit, list(results["exits"]))
  if anytime is not None:
    from reid_jax.models import format_costs
    costs = anytime.model_exit_costs(config)  # counted once for every mode
    print(format_costs(costs), flush=True)
    results["budget"] = {}
    for mode in dict.fromkeys(FLAGS.budget):  # each mode once, in the order given
      results["budget"][mode] = anytime.budget_curves(config, embedded, mode, FLAGS.workdir,
                                                      ensemble, costs, tta)
      print(f"wrote {results['budget'][mode]['plot']}")
  path = evaluators.write_results(results, *os.path.split(output))
  print(evaluators.format_table(results))
  print(f"wrote {path}")
  if FLAGS.report:
    page = report.write_for_config(config, results, embedded, os.path.join(
        os.path.dirname(output), report.REPORT_NAME), report_exit)
    print(f"wrote {page}")


def run() -> None:
  """Console-script entry point (`pip install .` puts it on PATH)."""
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
