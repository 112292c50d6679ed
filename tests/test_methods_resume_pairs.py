"""Kill-and-resume is bit-identical for verification+identification, whose pair sampler's
state must come back too (the other families: test_methods_resume.py, test_train)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from method_cases import data_dir, tiny_config  # noqa: F401 (fixture)
from reid_jax import methods
from reid_jax.core import checkpoint as ckpt_lib
from reid_jax.core import loop


class _Interrupt(Exception):
  pass


def _crash_at(n: int):
  """A step callback raising at the n-th step of the whole run (all stages counted)."""
  calls = {"n": 0}

  def callback(step):
    calls["n"] += 1
    if calls["n"] == n:
      raise _Interrupt()
  return callback


# DaRe's resume is tested in test_train (TriNet is DaRe with one exit). IDE, APR and PCB
# share one loop, sampler and checkpointed iterator: PCB's cases below resume that
# iterator inside a stage (kill 9) and between stages (kill 6), so IDE's own case (55 s)
# is not repeated. Verification+identification has its own (pair) sampler, whose state
# must come back too.
# The pair sampler's case (the PCB + RPP cases are in test_methods_resume.py; one file
# each so the parallel suite runs them side by side).
RESUME_CASES = [("verif_ident", {}, 5)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The uninterrupted reference run of a resume case, trained once per module."""
  runs = {}

  def get(method: str, c: ml_collections.ConfigDict) -> str:
    key = (method, c.to_json())
    if key not in runs:
      runs[key] = str(tmp_path_factory.mktemp(f"full_{method}"))
      methods.get(method).train_and_evaluate(c, runs[key], evaluate_at_end=False)
    return runs[key]
  return get


@pytest.mark.parametrize("method,model_overrides,crash", RESUME_CASES,
                         ids=[f"{m}{'_rpp' if o else ''}_kill{k}" for m, o, k in RESUME_CASES])
def test_kill_and_resume_is_bit_identical(method, model_overrides, crash, data_dir, tmp_path,
                                          uninterrupted):
  c = tiny_config(method, data_dir)
  c.model.update(model_overrides)
  if model_overrides.get("rpp"):
    c.train.rpp_steps = 4
  family = methods.get(method)
  full = uninterrupted(method, c)
  broken = str(tmp_path / "broken")
  with pytest.raises(_Interrupt):
    family.train_and_evaluate(c, broken, evaluate_at_end=False, step_callback=_crash_at(crash))
  family.train_and_evaluate(c, broken, evaluate_at_end=False)  # resumes
  va, sa = family.load_variables(c, full)
  vb, sb = family.load_variables(c, broken)
  assert sa == sb == (4 if model_overrides.get("rpp") else 6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)
  if model_overrides.get("rpp"):  # the finished PCB stage was restored, not retrained
    pcb_dir = loop.stage_dir(broken, "pcb")
    assert ckpt_lib.Checkpointer(pcb_dir).latest_step() == 6
