"""Searches a gallery for query people: `python -m reid_jax.search --gallery=FEATS.npz
--query=IMG_OR_DIR_OR_FEATS.npz --workdir=RUN --output=DIR`.

The query images are embedded with the run that embedded the gallery (a gallery
of another run is refused, naming both), or read from a features file of the same
run. The gallery is ranked per query by Euclidean distance, as evaluation ranks it
(exactly, in memory-bounded blocks; `--index=faiss` approximately; `--rerank`
k-reciprocal re-ranking). Writes `DIR/results.json` ({query name: [{"name",
"distance"[, "match"]}, ...]}) and one ranked-list PNG per query, coloured
correct/wrong/junk when the file names carry person id and camera
(`--name_pattern`), neutral otherwise. See `reid_jax.inference.search`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from reid_jax.core import writer as writer_lib
from reid_jax.core.errors import one_line_errors

FLAGS = flags.FLAGS
RESULTS_NAME = "results.json"


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  from reid_jax.inference.search import MARKET_PATTERN  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("gallery", None, "Gallery features file (python -m reid_jax.embed).")
  flags.DEFINE_string("query", None, "A query image, a folder or glob of them, or a "
                      "features file (.npz) of the same run.")
  flags.DEFINE_string("workdir", None, "The run that embedded the gallery (embeds the query "
                      "images; optional when --query is a features file).")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the gallery's).")
  flags.DEFINE_enum("tta", None, ["none", "flip"], "Test-time augmentation of the query "
                    "images (default: the gallery's).")
  flags.DEFINE_string("output", None, "Folder for results.json and the ranked-list PNGs.")
  flags.DEFINE_integer("top", 10, "Gallery items per query.")
  flags.DEFINE_bool("rerank", False, "k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3, as "
                    "evaluation); needs the whole gallery's neighbours (exact index only).")
  flags.DEFINE_string("exit", None, "The exit to search (default: fused, or the only one).")
  flags.DEFINE_enum("index", "exact", ["exact", "faiss"], "exact: blocked brute force; "
                    "faiss: approximate IndexIVFFlat (pip install faiss-cpu).")
  flags.DEFINE_integer("nlist", 0, "faiss IVF lists (0: 2 sqrt(gallery size)).")
  flags.DEFINE_integer("nprobe", 0, "faiss lists visited per query (0: nlist / 64, at least 8).")
  flags.DEFINE_string("name_pattern", MARKET_PATTERN, "Regular expression with two groups, "
                      "person id and camera, matched against file names to colour matches.")
  flags.DEFINE_bool("pictures", True, "Write one ranked-list PNG per query.")
  flags.DEFINE_string("gallery_images", None, "Folder of the gallery images (default: the "
                      "one recorded in --gallery) for the pictures.")
  flags.DEFINE_integer("batch_size", 64, "Query images per batch.")


def _load_run(gallery, run_lib, search_lib):
  """The --workdir run at the gallery's checkpoint and tta unless flags say otherwise;
  refused (one line naming both) when it is not the run that embedded the gallery."""
  want = gallery.run
  if os.path.abspath(FLAGS.workdir) != want.get("workdir"):
    raise ValueError(f"--gallery={FLAGS.gallery} was embedded by "
                     f"{search_lib.describe(want)}, not by --workdir={FLAGS.workdir}; "
                     "pass that --workdir, or embed the gallery again with this run")
  step = want.get("step") if FLAGS.checkpoint is None else FLAGS.checkpoint
  tta = (want.get("tta") or "none") if FLAGS.tta is None else FLAGS.tta
  try:
    run = run_lib.load_run(FLAGS.workdir, step, tta)
  except ValueError as e:
    if FLAGS.checkpoint is None and "is not in" in str(e):
      raise ValueError(f"--gallery={FLAGS.gallery} was embedded with checkpoint {step} of "
                       f"{FLAGS.workdir}, which is gone ({e}); embed the gallery again"
                       ) from None
    raise
  search_lib.refuse_other_run(f"--gallery={FLAGS.gallery}", want,
                              f"--workdir={FLAGS.workdir} --checkpoint={run.step}",
                              run.identity())
  return run


def _query(gallery, exit_name, images, search_lib, run_lib):
  """(names, [Q, D] features, image folder) of --query."""
  if FLAGS.query.endswith(".npz") and os.path.isfile(FLAGS.query):
    q = images.read_features(FLAGS.query, "--query")
    search_lib.refuse_other_run(f"--query={FLAGS.query}", q.run,
                                f"--gallery={FLAGS.gallery}'s run", gallery.run)
    if FLAGS.workdir:
      _load_run(gallery, run_lib, search_lib)  # the same identity check against --workdir
    return q.names, q.exit(exit_name, "--exit")[1], q.root
  if not FLAGS.workdir:
    raise ValueError(f"--query={FLAGS.query} holds images: pass --workdir (the run "
                     "that embedded the gallery) to embed them")
  root, names = images.list_images(FLAGS.query, "--query")
  run = _load_run(gallery, run_lib, search_lib)
  got = images.embed_files(run, root, names, batch_size=FLAGS.batch_size, exits=[exit_name])
  warning = got.warning()
  if warning:
    print(warning, file=sys.stderr, flush=True)
  if not got.names:
    raise ValueError(f"--query={FLAGS.query}: none of the {len(names)} files is a readable "
                     "image (see the warning above)")
  if exit_name not in got.features:
    raise ValueError(f"--exit={exit_name}: the run's embedder has exits "
                     f"{list(images.exit_dims(run))}, the gallery's file another")
  return got.names, got.features[exit_name], root


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.partial.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


@one_line_errors
def main(argv):
  del argv
  writer_lib.quiet_library_logs()
  from reid_jax.inference import images  # pylint: disable=import-outside-toplevel
  from reid_jax.inference import run as run_lib  # pylint: disable=import-outside-toplevel
  from reid_jax.inference import search as search_lib  # pylint: disable=import-outside-toplevel
  for name in ("gallery", "query", "output"):
    if not FLAGS[name].value:
      raise ValueError(f"--{name} is required")
  if FLAGS.top < 1:
    raise ValueError(f"--top={FLAGS.top}: must be at least 1")
  if FLAGS.rerank and FLAGS.index != "exact":
    raise ValueError("--rerank needs every gallery item's exact neighbours; use it with "
                     "--index=exact")
  if FLAGS.index == "faiss":
    search_lib.import_faiss()  # before any work
  out_dir = os.path.abspath(FLAGS.output)
  if os.path.isfile(out_dir):
    raise ValueError(f"--output={FLAGS.output} is a file; name a folder")
  gallery = images.read_features(FLAGS.gallery, "--gallery")
  exit_name, g_feats = gallery.exit(FLAGS.exit)
  g_root = FLAGS.gallery_images or gallery.root
  if FLAGS.pictures and not os.path.isdir(g_root):
    raise ValueError(f"the gallery images folder {g_root!r} (recorded in "
                     f"{FLAGS.gallery}) does not exist: pass --gallery_images=DIR, or "
                     "--nopictures for results.json alone")
  q_names, q_feats, q_root = _query(gallery, exit_name, images, search_lib, run_lib)
  t0 = time.perf_counter()
  if FLAGS.rerank:
    idx, dist = search_lib.rerank_topk(q_feats, g_feats, FLAGS.top)
  elif FLAGS.index == "faiss":
    index = search_lib.FaissIVF(g_feats, FLAGS.nlist or None)
    idx, dist = index.search(q_feats, FLAGS.top, FLAGS.nprobe or None)
  else:
    idx, dist = search_lib.exact_topk(q_feats, g_feats, FLAGS.top)
  seconds = time.perf_counter() - t0
  q_lab = search_lib.parse_names(q_names, FLAGS.name_pattern)
  g_lab = search_lib.parse_names(gallery.names, FLAGS.name_pattern)
  matches = None if q_lab is None or g_lab is None else search_lib.match_labels(q_lab, g_lab,
                                                                               idx)
  results = {}
  for qi, qn in enumerate(q_names):
    row = []
    for r, (gi, d) in enumerate(zip(idx[qi], dist[qi])):
      if gi < 0:
        continue
      item = {"name": gallery.names[gi], "distance": float(d)}
      if matches is not None:
        item["match"] = matches[qi, r]
      row.append(item)
    results[qn] = row
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, RESULTS_NAME)
  _write_json(path, results)
  how = "re-ranked" if FLAGS.rerank else FLAGS.index
  nq = f"{len(q_names)} quer{'y' if len(q_names) == 1 else 'ies'}"
  print(f"ranked {len(gallery.names)} gallery items for {nq} ({how}, exit {exit_name}, "
        f"top {idx.shape[1]}) in {seconds:.2f} s")
  if matches is None:
    print(f"note: the names do not all match --name_pattern={FLAGS.name_pattern!r}: frames "
          "are neutral (no correct/wrong colours)")
  if FLAGS.pictures:
    for qi, qn in enumerate(q_names):
      keep = idx[qi] >= 0
      search_lib.draw_ranked_list(
          os.path.join(q_root, qn), [os.path.join(g_root, gallery.names[g])
                                     for g in idx[qi][keep]],
          dist[qi][keep], None if matches is None else list(matches[qi][keep]),
          os.path.join(out_dir, search_lib.picture_name(qi, qn)), qn)
    print(f"wrote {len(q_names)} ranked lists in {out_dir}")
  print(f"wrote {path}")


def run() -> None:
  """Console-script entry point (`pip install .` puts it on PATH)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
