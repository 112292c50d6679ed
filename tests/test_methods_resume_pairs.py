"""Kill-and-resume is bit-identical for verification+identification, whose pair sampler's
state must come back too (the other families: test_methods_resume.py, test_train)."""

from __future__ import annotations

import pytest

from method_cases import check_kill_and_resume, data_dir, uninterrupted  # noqa: F401

# The pair sampler's case (the PCB + RPP cases are in test_methods_resume.py; one file
# each so the parallel suite runs them side by side).
RESUME_CASES = [("verif_ident", {}, 5)]


@pytest.mark.parametrize("method,model_overrides,crash", RESUME_CASES,
                         ids=[f"{m}{'_rpp' if o else ''}_kill{k}" for m, o, k in RESUME_CASES])
def test_kill_and_resume_is_bit_identical(method, model_overrides, crash, data_dir, tmp_path,
                                          uninterrupted):
  check_kill_and_resume(method, model_overrides, crash, data_dir, tmp_path, uninterrupted)
