"""PUL's per-round report, `WORKDIR/pul_rounds.json` and a printed table.

The only code of the family that reads the TRUE identities of the target training
split, after a round, to measure how pure its clusters were (purity = sum over clusters
of the largest true-identity count in the cluster / number of images; over the reliable
images and over all). Nothing here feeds back into training.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from reid_jax.data import samplers as smp
from reid_jax.data import sources
from reid_jax.methods.pul import clustering

ROUNDS_NAME = "pul_rounds.json"
EXIT = "pul"


def true_target_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  """person_id of every target training image (reporting only)."""
  return smp.read_labels(sources.open_split(config.dataset,
                                            config.dataset.train_split))["person_id"]


def round_row(r: int, labels: clustering.PseudoLabels | None, truth: np.ndarray | None,
              results: dict | None) -> dict:
  """One row: round, images, reliable images, purity (reliable / all), rank-1, mAP
  (None where not measured; round 0 is the source model, not clustered)."""
  row = {"round": r, "num_images": None, "num_reliable": None, "purity_reliable": None,
         "purity_all": None, "rank1": None, "mAP": None, "results": results}
  if labels is not None:
    row.update(num_images=int(len(labels.assignment)), num_reliable=int(labels.reliable.sum()),
               purity_reliable=clustering.purity(labels.assignment, truth, labels.reliable),
               purity_all=clustering.purity(labels.assignment, truth))
  if results is not None:
    m = results["exits"][EXIT]
    row.update(rank1=m["rank1"], mAP=m["mAP"])
  return row


def load_rows(workdir: str) -> dict[int, dict]:
  path = os.path.join(workdir, ROUNDS_NAME)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {int(row["round"]): row for row in json.load(f)["rounds"]}


def write_rows(workdir: str, rows: dict[int, dict]) -> None:
  """Atomically (temporary file + os.replace), process 0 only."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, ROUNDS_NAME)
  with open(path + ".tmp", "w") as f:
    json.dump({"rounds": [rows[r] for r in sorted(rows)]}, f, indent=2)
  os.replace(path + ".tmp", path)


def format_table(rows: dict[int, dict]) -> str:
  """round, reliable/images, purity of the reliable and of all images, rank-1, mAP (%)."""
  def pct(v):
    return f"{100 * v:8.2f}" if v is not None else f"{'-':>8}"

  lines = [f"{'round':<7}{'reliable':>10}{'images':>8}{'pur.rel':>8}{'pur.all':>8}"
           f"{'rank1':>8}{'mAP':>8}"]
  for r in sorted(rows):
    row = rows[r]
    rel = row["num_reliable"]
    lines.append(f"{r:<7}{rel if rel is not None else '-':>10}"
                 f"{row['num_images'] if row['num_images'] is not None else '-':>8}"
                 + "".join(pct(row[k]) for k in ("purity_reliable", "purity_all", "rank1",
                                                 "mAP")))
  return "\n".join(lines)
