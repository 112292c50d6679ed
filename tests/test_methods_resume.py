"""Kill-and-resume is bit-identical for every method family's stages (inside a stage
and between stages); DaRe's own case is in test_train."""

from __future__ import annotations

import pytest

from method_cases import check_kill_and_resume, data_dir, uninterrupted  # noqa: F401

# Verification+identification's case is in test_methods_resume_pairs.py (its own file,
# so the parallel suite runs it beside these). PCB + RPP: 6 PCB steps then 4 RPP steps;
# killed inside the RPP stage, and right after the PCB stage's last (saved) step, i.e.
# between the stages.
RESUME_CASES = [("pcb", {"rpp": True}, 9), ("pcb", {"rpp": True}, 6)]


@pytest.mark.parametrize("method,model_overrides,crash", RESUME_CASES,
                         ids=[f"{m}{'_rpp' if o else ''}_kill{k}" for m, o, k in RESUME_CASES])
def test_kill_and_resume_is_bit_identical(method, model_overrides, crash, data_dir, tmp_path,
                                          uninterrupted):
  check_kill_and_resume(method, model_overrides, crash, data_dir, tmp_path, uninterrupted)
