"""Data-parallel helpers: the pmap axis, sharding a host batch, reading replicas back."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def shard(batch: dict[str, np.ndarray], n_devices: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [n_devices, B // n_devices, ...] for pmap."""
  def split(x):
    if x.shape[0] % n_devices:
      raise ValueError(f"per-process batch {x.shape[0]} is not divisible by {n_devices} "
                       "local devices; change the batch size in the config")
    return x.reshape((n_devices, x.shape[0] // n_devices) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def replicate(tree: Any, devices: list | None = None) -> Any:
  """Copies of every leaf on each local device, laid out as pmap's own outputs are.

  The arrays carry a NamedSharding over a mesh whose one axis is named AXIS, as the
  outputs of `jax.pmap(..., axis_name=AXIS)` do. (flax.jax_utils.replicate names its axis
  '_device_put_sharded', and pmap then compiles the step a second time at step 2, when
  it meets its own outputs: 9-12 s per step function on CPU.) Nothing is compiled here.
  """
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)
  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmapped pytree, as host numpy arrays.

  (flax.jax_utils.unreplicate keeps the device axis when pmap ran on one device.)
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return x
  return jax.tree_util.tree_map(first, tree)


def check_divisible(global_batch: int, what: str) -> None:
  """A global batch must split evenly over every device of every process."""
  if global_batch % jax.device_count():
    raise ValueError(f"global batch {what}={global_batch} is not divisible by "
                     f"{jax.device_count()} devices; change it")


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls jax.distributed.initialize() when launched as one of several processes.

  In order of precedence: explicit flags; `REID_JAX_COORDINATOR` (host:port),
  `REID_JAX_NUM_PROCESSES` and `REID_JAX_PROCESS_ID` (all three, from the environment:
  a cluster JAX cannot detect, e.g. the fake TPU VM of tests/fake_cluster/gcloud);
  otherwise SLURM (`SLURM_NTASKS > 1`) or `REID_JAX_DISTRIBUTED=1` (Cloud TPU VMs) let
  JAX auto-detect the cluster. Every multi-process path uses gloo for cross-process
  collectives on CPU (tests, debugging); that setting only concerns the CPU backend,
  so GPU and TPU runs are unaffected.
  """
  names = ("REID_JAX_COORDINATOR", "REID_JAX_NUM_PROCESSES", "REID_JAX_PROCESS_ID")
  given = {n: os.environ.get(n, "") for n in names}
  explicit = bool(coordinator_address) or (num_processes or 1) > 1
  if not explicit and any(given.values()):
    if not all(given.values()) or not all(given[n].isdigit() for n in names[1:]):
      raise ValueError(f"{', '.join(f'{n}={v!r}' for n, v in given.items())}: set all "
                       "three (host:port, a count, an index) or none")
    coordinator_address, num_processes, process_id = (
        given[names[0]], int(given[names[1]]), int(given[names[2]]))
    explicit = True
  auto = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get(
      "REID_JAX_DISTRIBUTED") == "1"
  if not (explicit or auto):
    return
  # Recent JAX defaults to gloo; older versions had no CPU cross-process collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()  # SLURM / Cloud TPU: auto-detected.
