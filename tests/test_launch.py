"""The cluster launch scripts, run end to end on CPU through the fakes of tests/fake_cluster.

`launch/slurm_gpu.sbatch` runs with a fake `srun` (2 tasks x 4 CPU devices, JAX's own
SLURM detection starting jax.distributed) and `launch/tpu_vm.sh` with a fake `gcloud`
(2 worker folders, REID_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID standing in for the TPU
metadata); both must train exactly what one process with 8 devices trains. A task
killed mid-run ends the SLURM job, and resubmitting it resumes to the same end. Cheap
tests with a stub `python` check what the scripts pass on (environment, quoting, exit
status) without training.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest

from configs import dare
from reid_jax.core import parallel
from reid_jax.methods.dare import train
from tests.test_train import _train_cmd, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(REPO, "tests", "fake_cluster")
CONFIG = "configs/dare.py:synthetic"
STEPS = 3


def train_flags(checkpoint_every: int = STEPS) -> list[str]:
  """The tiny 3-step DaRe run's flags after --config/--workdir (those of tests/test_train.py,
  data from TFDS_DATA_DIR as the scripts expect), checkpointing every `checkpoint_every`."""
  flags = [f for f in _train_cmd("", "", steps=STEPS)[5:]
           if not f.startswith(("--config.dataset.data_dir=", "--config.train.checkpoint_every="))]
  return flags + [f"--config.train.checkpoint_every={checkpoint_every}", "--noeval_at_end"]


def config_from_flags(flags: list[str]) -> ml_collections.ConfigDict:
  """configs/dare.py:synthetic with the `--config.a.b=value` overrides of `flags` applied
  (each value converted to the type of the field it replaces)."""
  c = dare.get_config("synthetic")
  for flag in flags:
    if not flag.startswith("--config."):
      continue
    path, _, value = flag[len("--config."):].partition("=")
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  from reid_jax.data import sources
  sources.ensure_prepared(tiny_config(d).dataset)
  return d


def _result(workdir: str) -> dict:
  """The final variables and step of a run, and its train loss at each logged step (the
  last record of a step wins: a resumed run logs again the steps after its checkpoint)."""
  variables, step = train.load_variables(config_from_flags(train_flags()), workdir)
  losses = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    losses[record["step"]] = record["train/loss"]
  return {"variables": variables, "step": step, "losses": losses}


def assert_same_training(got: dict, want: dict) -> None:
  """As tests/test_train.py's former 2-process test: the same steps and losses (rtol 1e-5)
  and parameters up to float32 reduction order across processes (rtol 1e-4, atol 1e-6)."""
  assert got["step"] == want["step"] == STEPS
  assert sorted(got["losses"]) == sorted(want["losses"]) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got["losses"][s] for s in sorted(got["losses"])],
                             [want["losses"][s] for s in sorted(want["losses"])], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         got["variables"], want["variables"])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The same training in this process, on the 8 CPU devices of conftest: one process."""
  assert jax.device_count() == 8 and jax.process_count() == 1
  workdir = str(tmp_path_factory.mktemp("reference"))
  c = config_from_flags(train_flags())
  c.dataset.data_dir = data_dir
  train.train_and_evaluate(c, workdir, evaluate_at_end=False)
  return _result(workdir)


def _cluster_env(data_dir: str) -> dict[str, str]:
  """The submitting shell's environment: the fakes first on PATH, 4 CPU devices per
  process, data in TFDS_DATA_DIR, and none of the caller's SLURM_* / REID_JAX_* values."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "REID_JAX_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE"))}
  env.update({"PATH": FAKES + os.pathsep + env["PATH"], "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
              "TFDS_DATA_DIR": data_dir})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _fake_venv(tmp: str) -> str:
  """A virtualenv folder whose bin/activate puts this interpreter first on PATH as python."""
  venv = os.path.join(tmp, "venv")
  if os.path.isdir(venv):
    return venv
  os.makedirs(os.path.join(venv, "bin"))
  os.symlink(sys.executable, os.path.join(venv, "bin", "python"))
  with open(os.path.join(venv, "bin", "activate"), "w") as f:
    f.write(f'export PATH="{venv}/bin:$PATH"\n')
  return venv


def _free_job_id() -> str:
  """A SLURM job id whose JAX coordinator port (61440 + id % 4096) is free here."""
  for job_id in random.sample(range(100_000, 100_000 + 4096), 200):
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + job_id % 4096))
        return str(job_id)
      except OSError:
        continue
  raise RuntimeError("no free port in 61440-65535 for the fake SLURM job")


def _sbatch(workdir: str, data_dir: str, tmp: str, flags: list[str], **env) -> subprocess.Popen:
  """Starts `bash launch/slurm_gpu.sbatch` as sbatch would on a 2-task allocation; each
  task's output goes to tmp/task-N.out (srun's SLURM_STDOUTMODE)."""
  full = _cluster_env(data_dir)
  full.update({"SLURM_JOB_ID": _free_job_id(), "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": REPO,
               "SLURM_STDOUTMODE": os.path.join(tmp, "task-%t.out"),
               "REID_JAX_VENV": _fake_venv(tmp)}, **env)
  return _start(["bash", "launch/slurm_gpu.sbatch", CONFIG, workdir] + flags, full)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
  """A launch script in its own process group (so a timeout can end all of it)."""
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
  """The script's output once it ends; past `timeout`, SIGTERM to its whole process group
  (as scancel: the fakes then end their tasks) and the output so far."""
  try:
    return proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.communicate()[0] + f"\n(timed out after {timeout} s)"


def _read(path: str) -> str:
  return open(path).read() if os.path.exists(path) else f"(no {path})"


def _logs(tmp: str) -> list[str]:
  return [_read(os.path.join(tmp, f"task-{t}.out")) for t in range(2)]


def _describe(out: str, logs: list[str]) -> str:
  return f"sbatch:\n{out[-2000:]}\n" + "\n".join(
      f"--- task {t}:\n{log[-3000:]}" for t, log in enumerate(logs))


def _assert_only_process_0_wrote(workdir: str, logs: list[str], flags: list[str],
                                 submissions: int = 1) -> None:
  """One writer: progress only in task 0's output, one TensorBoard file per submission,
  and config.json holding exactly the config the flags give (they went through the
  script intact)."""
  assert f"] step {STEPS}/{STEPS} loss" in logs[0], logs[0][-2000:]
  assert "] step " not in logs[1], logs[1][-2000:]
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == submissions
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved == json.loads(config_from_flags(flags).to_json())
  assert not os.path.exists(os.path.join(workdir, "eval_results.json"))  # --noeval_at_end


def _step_folders(workdir: str) -> list[int]:
  """The finished checkpoints of a run (orbax renames a step's folder to its number last)."""
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _assert_complete_checkpoints(workdir: str, steps: list[int], killed: bool = False) -> None:
  """Exactly these step folders (_result reads the last); nothing else, except, after a
  kill, the temporary folder of a save the kill interrupted (orbax ignores those)."""
  assert _step_folders(workdir) == steps
  others = [s for s in os.listdir(os.path.join(workdir, "checkpoints")) if not s.isdigit()]
  assert all(".orbax-checkpoint-tmp" in s for s in others) if killed else not others, others


def _logged_steps(workdir: str) -> set[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return set()
  return {json.loads(l)["step"] for l in open(path).read().splitlines() if l.endswith("}")}


def test_slurm_two_tasks_equal_one_process_and_a_killed_task_resumes(data_dir, reference,
                                                                    tmp_path):
  """sbatch script + fake srun: jax.distributed from SLURM's environment alone (no flags)
  makes 2 processes x 4 devices. SIGKILL to task 1 once step 2 is logged (so checkpoint
  1 is saved and read back): --kill-on-bad-exit ends task 0 and the job fails within
  seconds; the same sbatch again resumes both tasks from the newest complete checkpoint
  and ends with what 1 process x 8 devices trains (one run covers the equality and the
  resume: an uninterrupted 2-task run would cost another launch, ~40 s)."""
  workdir = str(tmp_path / "run")
  pids = str(tmp_path / "pids")
  flags = train_flags(checkpoint_every=1) + ["--verbosity=0"]
  proc = _sbatch(workdir, data_dir, str(tmp_path), flags, FAKE_SRUN_PID_FILE=pids)
  deadline = time.time() + 600
  while 2 not in _logged_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None and 2 in _logged_steps(workdir), _describe(
      _finish(proc, timeout=1), _logs(str(tmp_path)))
  task_pids = dict(line.split() for line in open(pids))
  os.kill(int(task_pids["1"]), signal.SIGKILL)
  killed = time.time()
  out = _finish(proc, timeout=60)
  assert proc.returncode != 0 and time.time() - killed < 30, out
  assert "task 1 exited with status 137" in out, out
  with pytest.raises(ProcessLookupError):
    os.kill(int(task_pids["0"]), 0)  # task 0 was ended too
  done = _step_folders(workdir)
  assert done and 1 <= done[-1] < STEPS, f"checkpoints after the kill: {done}"

  for t in range(2):
    os.remove(tmp_path / f"task-{t}.out")
  proc = _sbatch(workdir, data_dir, str(tmp_path), flags)
  out = _finish(proc)
  logs = _logs(str(tmp_path))
  assert proc.returncode == 0, _describe(out, logs)
  assert f"Resuming from checkpoint step {done[-1]}" in logs[0], logs[0][-3000:]
  assert "] step " not in logs[1], logs[1][-3000:]
  for log in logs:
    assert "JAX processes 2, devices 8 (local 4)" in log, log[-3000:]
  assert_same_training(_result(workdir), reference)
  _assert_only_process_0_wrote(workdir, logs, flags, submissions=2)
  _assert_complete_checkpoints(workdir, [1, 2, 3], killed=True)


def test_tpu_script_two_workers_equal_one_process(data_dir, reference, tmp_path):
  """tpu_vm.sh + fake gcloud: the project (its own files only) copied to each worker's
  ~/reid_jax, the install step run there (no network), then the same command on both
  workers trains what 1 process x 8 devices trains."""
  env = _cluster_env(data_dir)
  env.update({"FAKE_TPU_ROOT": str(tmp_path / "tpu"), "FAKE_CLUSTER_PYTHON": sys.executable})
  workdir = str(tmp_path / "run")
  flags = train_flags() + ["--verbosity=0"]
  proc = _start(["bash", "launch/tpu_vm.sh", "my-tpu", "us-central2-b", CONFIG, workdir]
                + flags, env)
  out = _finish(proc)
  assert proc.returncode == 0, out[-5000:]
  calls = [json.loads(l) for l in open(tmp_path / "tpu" / "gcloud_calls.jsonl")]
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", c] for c in
                                    ("scp", "ssh", "ssh")]
  for c in calls:
    assert "--zone=us-central2-b" in c and "--worker=all" in c, c
  assert calls[0][4] == "--recurse" and calls[0][5].endswith("/reid_jax")
  assert calls[0][6] == "my-tpu:~" and calls[1][4] == calls[2][4] == "my-tpu"
  assert "REID_JAX_DISTRIBUTED=1" in calls[2][-1] and f"TFDS_DATA_DIR={data_dir}" in calls[2][-1]
  homes = [tmp_path / "tpu" / "my-tpu" / f"worker{w}" for w in range(2)]
  logs = []
  for home in homes:
    copy = home / "reid_jax"
    assert (copy / "reid_jax" / "train.py").is_file() and (copy / "configs" / "dare.py").is_file()
    assert not (copy / ".git").exists() and not (copy / "runs").exists()
    assert (copy / ".venv" / "bin" / "python").is_file()  # the worker's own, from the fake
    assert open(home / "pip_calls.log").read() == "install -q -r requirements.txt jax[tpu]\n"
    logs.append(_read(str(home / "reid_jax_train.log")))
  for log in logs:
    assert "JAX processes 2, devices 8 (local 4)" in log, log[-3000:]
  assert_same_training(_result(workdir), reference)
  _assert_only_process_0_wrote(workdir, logs, flags)
  _assert_complete_checkpoints(workdir, [STEPS])


def test_distributed_environment_overrides():
  """REID_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID replace auto-detection, explicit flags
  win over them, a partial or non-numeric set is a one-line error, and every
  multi-process path selects gloo for CPU collectives."""
  def initialize(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REID_JAX_"))}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True), \
         mock.patch.object(jax.distributed, "initialize") as init, \
         mock.patch.object(jax.config, "update") as update:
      parallel.maybe_initialize_distributed(*args)
    if init.called:
      update.assert_called_once_with("jax_cpu_collectives_implementation", "gloo")
    return init.call_args.args if init.called else None
  trio = {"REID_JAX_COORDINATOR": "h:1", "REID_JAX_NUM_PROCESSES": "2",
          "REID_JAX_PROCESS_ID": "1"}
  assert initialize({}) is None and initialize({"SLURM_NTASKS": "1"}) is None
  assert initialize({"SLURM_NTASKS": "2"}) == () == initialize({"REID_JAX_DISTRIBUTED": "1"})
  assert initialize({**trio, "REID_JAX_DISTRIBUTED": "1"}) == ("h:1", 2, 1)
  assert initialize(trio, "x:2", 2, 0) == ("x:2", 2, 0)
  for bad in ({"REID_JAX_COORDINATOR": "h:1"}, {**trio, "REID_JAX_PROCESS_ID": "one"}):
    with pytest.raises(ValueError, match="set all three .* or none"):
      initialize(bad)


def _stub(path: str, body: str) -> str:
  """An executable bash script at `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("#!/bin/bash\n" + body + "\n")
  os.chmod(path, 0o755)
  return path


def test_slurm_script_environment(tmp_path):
  """Without training (python is a stub that prints what it got): a missing virtualenv is
  a one-line error; one task per node sees all SLURM_GPUS_ON_NODE GPUs through
  JAX_LOCAL_DEVICE_IDS, one task per GPU is left to JAX; the flags arrive intact."""
  env = _cluster_env("/data")
  env.update({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": REPO,
              "REID_JAX_VENV": str(tmp_path / "none")})
  cmd = ["bash", "launch/slurm_gpu.sbatch", CONFIG, "/runs/x", "--config.eval.tta=a b"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.startswith(f"error: no virtualenv at {tmp_path / 'none'}")
  venv = tmp_path / "venv"
  _stub(str(venv / "bin" / "python"),
        'echo "$SLURM_PROCID ${JAX_LOCAL_DEVICE_IDS-unset} $TFDS_DATA_DIR $#:$*"')
  (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
  env["REID_JAX_VENV"] = str(venv)
  args = f"5:-m reid_jax.train --config={CONFIG} --workdir=/runs/x --config.eval.tta=a b"
  for per_node, ids in (("1", "0,1,2,3,4,5,6,7"), ("8", "unset")):
    r = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_GPUS_ON_NODE": "8",
                                           "SLURM_NTASKS_PER_NODE": per_node},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"{t} {ids} /data {args}" for t in range(2)]


def test_tpu_script_passes_flags_intact(tmp_path):
  """Without training (the workers' python is a stub): TFDS_DATA_DIR and each train flag
  reach every worker whole, spaces included, and a failing worker fails the script (not
  hidden by the `| tee` of its log)."""
  stub = _stub(str(tmp_path / "stub_python"),
               'printf "%s\\n" "$TFDS_DATA_DIR" "$@" > "$HOME/args"; exit "${FAIL:-0}"')
  env = _cluster_env("/data dir")
  env.update({"FAKE_TPU_ROOT": str(tmp_path / "tpu"), "FAKE_CLUSTER_PYTHON": stub})
  cmd = ["bash", "launch/tpu_vm.sh", "t", "z", CONFIG, "/runs/x", "--config.eval.tta=a b", ""]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  want = ["/data dir", "-m", "reid_jax.train", f"--config={CONFIG}", "--workdir=/runs/x",
          "--config.eval.tta=a b", ""]
  for w in range(2):
    assert (tmp_path / "tpu" / "t" / f"worker{w}" / "args").read_text() == "\n".join(want) + "\n"
  r = subprocess.run(cmd, cwd=REPO, env={**env, "FAIL": "3"}, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 3, r.stdout + r.stderr
