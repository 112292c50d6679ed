"""Test setup: 8 fake CPU devices so multi-device code is tested on CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent XLA compilation cache: with one (shared across sessions, or fresh per
# session) the suite aborted inside XLA while deserialising a cached pmapped train
# step (jax compilation_cache.get_executable_and_time, "Fatal Python error: Aborted",
# in tests/test_methods.py's resume tests, 2026-12-01). A user's JAX_COMPILATION_CACHE_DIR
# is dropped for the same reason.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
# XLA's backend optimisations off: the suite is compile-bound (tiny models, a few steps),
# and an optimised compile of a small ResNet's train step takes ~10 s on 2 CPU cores.
# Subprocesses started by tests inherit it. Numerics stay IEEE float32.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per core, at most 4. Each worker fakes 8 host
  devices and compiles on one core; past 4 the suite is bound by its longest file."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))


# The slowest files first (minutes each on 2 cores: trainings, several processes), so
# that under `-n auto --dist loadfile` no long file starts last while the other workers
# idle. The rest keep their order.
SLOW_FILES_FIRST = ("test_methods_resume.py", "test_launch.py",
                    "test_methods_resume_pairs.py", "test_methods.py", "test_models.py",
                    "test_train.py", "test_methods_cli.py",
                    "test_inference.py", "test_video.py", "test_report.py",
                    "test_msp_cnn.py", "test_pul.py", "test_export.py", "test_losses.py",
                    "test_pretrained.py", "test_done_right.py")


def pytest_collection_modifyitems(session, config, items):
  """Orders the collected tests by SLOW_FILES_FIRST (a stable sort by file)."""
  del session, config
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
