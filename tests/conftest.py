"""Test setup: 8 fake CPU devices so multi-device code is tested on CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent XLA cache: the training tests compile the same small train step several
# times (and in subprocesses); later compiles become cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "reid_jax_test_xla_cache"))
