"""Test setup: 8 fake CPU devices so multi-device code is tested on CPU."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent XLA cache, fresh for each pytest session: the training tests compile the
# same small train step several times (and in subprocesses, which inherit the variable),
# so later compiles are cache hits. Not shared across sessions: a CI run on a machine
# that kept an earlier session's cache aborted inside XLA while deserialising one of
# its entries (jax compilation_cache.get_executable_and_time, 2026-12-01).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="reid_jax_test_xla_cache_"))
