"""`python -m reid_jax.train --config=configs/<m>.py:synthetic` for every classification
method ends with eval_results.json in the shared format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from method_cases import CLASSIFICATION, REPO, TINY_FLAGS, _env, data_dir  # noqa: F401

def _cli(method: str, data_dir: str, workdir: str, steps: int, extra=()) -> list[str]:
  cmd = [sys.executable, "-m", "reid_jax.train", f"--config=configs/{method}.py:synthetic",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
         f"--config.train.steps={steps}", "--config.train.checkpoint_every=0"] + TINY_FLAGS
  cmd += ["--config.input.batch_size=8", "--config.model.bottleneck=16",
          "--config.model.reduce_dim=8", "--config.model.num_parts=2",
          f"--config.optimizer.decay_steps={steps}"]
  return cmd + list(extra)


EXITS = {"ide": {"ide"}, "pcb": {"pcb", "pcb_g"}, "verif_ident": {"verif_ident"},
         "apr": {"apr"}}


@pytest.mark.parametrize("method", CLASSIFICATION)
def test_cli_trains_and_writes_results(method, data_dir, tmp_path):
  """`python -m reid_jax.train --config=configs/<m>.py:synthetic` ends with
  eval_results.json in the shared format, exits named by the method; only the final
  checkpoint is saved with checkpoint_every=0."""
  wd = str(tmp_path / method)
  r = subprocess.run(_cli(method, data_dir, wd, 2), cwd=REPO, env=_env(1),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(wd, "eval_results.json")))
  assert res["step"] == 2 and res["dataset"] == "synthetic_reid/tiny"
  assert set(res["exits"]) == EXITS[method]
  for m in res["exits"].values():
    assert set(m) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
  assert res["num_valid_queries"] <= res["num_queries"] == 16
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["method"] == method and saved["model"]["num_classes"] > 0
  if method == "apr":
    assert set(res["attributes"]["per_attribute"]) == set(
        __import__("reid_jax.data.attributes", fromlist=["x"]).ATTRIBUTES)
    assert 0.0 <= res["attributes"]["mean"] <= 1.0
  if method == "ide":
    # Evaluating this IDE checkpoint with another method's config: one line naming both.
    r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                        "--config=configs/dare.py:synthetic", f"--workdir={wd}"],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "holds a config.method='ide' run but --config is config.method='dare'" in (
        r.stderr.strip().splitlines()[-1])
    # ... and with its own config, the same numbers as at the end of training.
    r = subprocess.run([sys.executable, "-m", "reid_jax.evaluate",
                        "--config=configs/ide.py:synthetic", f"--workdir={wd}",
                        f"--config.dataset.data_dir={data_dir}"] + TINY_FLAGS
                       + ["--config.model.bottleneck=16"],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # evaluate writes its own file; training's is left as it was.
    again = json.load(open(os.path.join(wd, "evaluate_results.json")))
    np.testing.assert_allclose(again["exits"]["ide"]["mAP"], res["exits"]["ide"]["mAP"],
                               atol=1e-9)
    assert json.load(open(os.path.join(wd, "eval_results.json"))) == res
