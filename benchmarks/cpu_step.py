"""reid_jax vs PyTorch: images/s of the DaRe train step on CPU, side by side, one table.

  python benchmarks/cpu_step.py [--cases=mnv2_64x32,mnv2_128x64,small_96x48,r50_128x64]
      [--steps=5] [--warmup=1] [--dtype=float32|bfloat16] [--torch_threads=N[,M...]]
      [--jax_env="default;XLA_FLAGS=--xla_cpu_use_onednn=true;CPUS=0"]
      [--torch_channels_last] [--no_torch] [--timeout=SECONDS]

Cases (P=18 K=4, 72 images; random weights, config.model.pretrained="none"; one
synthetic batch, so no data loading on either side):
  mnv2_64x32    configs/dare.py:mobilenetv2,market_cpu (MobileNetV2, last_stride 1)
  mnv2_128x64   the same network at 128x64
  small_96x48   configs/dare.py:synthetic (the README main job: resnet_small width 16,
                last_stride 1, head 256/64)
  r50_128x64    configs/dare.py (DaRe-ResNet-50, last_stride 2, head 1024/128) at 128x64

reid_jax: the pmapped step `python -m reid_jax.train` runs (core.loop's
`jax.pmap(loop.device_step(stage.step_fn, seed), donate_argnums=(0,))` over
`methods.dare.train.stages(config)[0]`: finite guard, global mining, grad norm).
PyTorch: benchmarks/torch_models.py, the same network, loss and optimiser (checked by
tests/test_torch_reference.py), eager, with PyTorch's CPU defaults (oneDNN on,
contiguous NCHW); `--torch_channels_last` adds a channels-last row. bfloat16: reid_jax
`config.model.dtype="bfloat16"` (bf16 compute, fp32 master weights) vs torch autocast.

Every measurement runs in its own subprocess, so each `--jax_env` setting (`;`-separated;
`default` = the environment as it is; otherwise shell-quoted `KEY=VALUE` or `KEY+=VALUE`
(appended with a space) words) gives one jax row per case, and rows do not share thread
pools or allocators. The batch is put on the device once on both sides. "compile s"
is the first step's time minus one timed step. `jax/torch` divides by the default torch
row of the case (`jax/best torch` by its fastest torch row, when there are several).
The header names machine, versions, date and command, for pasting into
benchmarks/RESULTS.md. Timings on a shared machine are only as good as its idleness: the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULT_TAG = "@@RESULT "


@dataclasses.dataclass(frozen=True)
class Case:
  """A DaRe benchmark case: a configs/dare.py variant at an input size."""
  variant: str
  height: int
  width: int
  label: str


CASES: dict[str, Case] = {
    "mnv2_64x32": Case("mobilenetv2,market_cpu", 64, 32, "DaRe-MobileNetV2 ls1 64x32"),
    "mnv2_128x64": Case("mobilenetv2,market_cpu", 128, 64, "DaRe-MobileNetV2 ls1 128x64"),
    "small_96x48": Case("synthetic", 96, 48, "DaRe-resnet_small w16 ls1 96x48"),
    "r50_128x64": Case("", 128, 64, "DaRe-ResNet-50 ls2 128x64"),
}


# ----------------------------------------------------------------------------- configs


def dare_config(variant: str, height: int, width: int, dtype: str = "float32",
                P: int = 18, K: int = 4) -> Any:
  """configs/dare.py:`variant` at `height`x`width`, random init, P x K images."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from configs import dare  # pylint: disable=import-outside-toplevel
  c = dare.get_config(variant or None)
  c.model.pretrained = "none"  # timing only: random weights, no download
  c.model.dtype = dtype
  c.input.height, c.input.width, c.input.P, c.input.K = height, width, P, K
  return c


def synthetic_pk(P: int, K: int, h: int, w: int, seed: int = 0) -> dict[str, Any]:
  """One random NHWC float32 batch of P identities x K images."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(P * K, h, w, 3)).astype(np.float32),
          "person_id": np.repeat(np.arange(P), K).astype(np.int32)}


# ----------------------------------------------------------------------------- jax timing


def time_pmapped(p_step: Any, state: Any, batch: dict[str, Any], images: int, steps: int,
                 warmup: int) -> dict[str, float]:
  """Times `p_step(state, batch, step_numbers)` as core.loop.fit calls it.

  State is replicated as the loop replicates it; the batch is sharded and put on the
  devices once (the input pipeline is not measured). Returns images/s, ms/step and
  compile s (first call minus one timed step). REID_BENCH_FAST_COMPILE=1 (the GPU
  suite's dry run) compiles ahead of time without XLA backend optimisation.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from reid_jax.core import parallel  # pylint: disable=import-outside-toplevel
  n = jax.local_device_count()
  state = parallel.replicate(state)
  batch = jax.pmap(lambda x: x)(parallel.shard(batch, n))  # on the devices, once
  step_no = lambda k: np.full(n, k, np.int32)
  t0 = time.perf_counter()
  if os.environ.get("REID_BENCH_FAST_COMPILE") == "1":  # gpu_suite --dry_run only
    from reid_jax.core import state as state_lib  # pylint: disable=import-outside-toplevel
    p_step = p_step.lower(state, batch, step_no(1)).compile(
        state_lib.RUN_ONCE_COMPILER_OPTIONS)
  state, m = p_step(state, batch, step_no(1))
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  for k in range(warmup):
    state, m = p_step(state, batch, step_no(2 + k))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for k in range(steps):
    state, m = p_step(state, batch, step_no(2 + warmup + k))
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps
  loss = float(np.asarray(parallel.unreplicate(m)["loss"]))
  return {"images_per_s": images / dt, "step_ms": 1e3 * dt, "compile_s": first - dt,
          "loss": loss}


def time_jax_dare(variant: str, height: int, width: int, dtype: str, steps: int,
                  warmup: int, P: int = 18, K: int = 4) -> dict[str, Any]:
  """The DaRe step of `python -m reid_jax.train` (stage 0 of methods.dare.train.stages)."""
  import jax  # pylint: disable=import-outside-toplevel
  from reid_jax.core import loop, parallel  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.dare import train  # pylint: disable=import-outside-toplevel
  c = dare_config(variant, height, width, dtype, P, K)
  train.validate(c)
  stage = train.stages(c)[0]
  t0 = time.perf_counter()
  state = stage.init_state(None)
  init_s = time.perf_counter() - t0
  p_step = jax.pmap(loop.device_step(stage.step_fn, c.seed), axis_name=parallel.AXIS,
                    donate_argnums=(0,))
  out = time_pmapped(p_step, state, synthetic_pk(P, K, height, width), P * K, steps, warmup)
  return dict(out, init_s=init_s, devices=jax.local_device_count(),
              platform=jax.default_backend())


# ----------------------------------------------------------------------------- torch timing


def time_torch_dare(variant: str, height: int, width: int, dtype: str, steps: int,
                    warmup: int, P: int = 18, K: int = 4, device: str = "cpu",
                    threads: int = 0, channels_last: bool = False, compile: bool = False,
                    backbone: str = "ours") -> dict[str, Any]:
  """The torch twin's DaRe step (torch_models.DaReStep); `backbone='torchvision'` puts
  the DaRe head on torchvision's ResNet-50 instead of ours (same function)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_models as tm  # pylint: disable=import-outside-toplevel
  default_threads = torch.get_num_threads()
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  c = dare_config(variant, height, width, dtype, P, K)
  if backbone == "torchvision":
    net = tm.DaReNet(tm.torchvision_backbone(c.model.backbone, c.model.last_stride),
                     c.model.hidden_dim, c.model.embed_dim)
  else:
    net = tm.build_dare(c.model)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(device, memory_format=fmt)
  opt = tm.make_optimizer(net.parameters(), c.optimizer, c.train.steps)
  step = tm.DaReStep(net, opt, c.loss, compile=compile,
                     amp_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
  b = synthetic_pk(P, K, height, width)
  x = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()).to(device).contiguous(
      memory_format=fmt)
  pids = torch.from_numpy(b["person_id"]).long().to(device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  t0 = time.perf_counter()
  loss = step(x, pids)
  sync()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    loss = step(x, pids)
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step(x, pids)
  sync()
  dt = (time.perf_counter() - t0) / steps
  return {"images_per_s": P * K / dt, "step_ms": 1e3 * dt,
          "compile_s": (first - dt) if compile else None, "first_s": first,
          "loss": float(loss), "threads": torch.get_num_threads(),
          "default_threads": default_threads,
          "mkldnn": bool(torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())}


# ----------------------------------------------------------------------------- subprocesses


def parse_cpus(spec: str) -> set[int]:
  """'0' / '0,1' / '0-3' -> a CPU set for os.sched_setaffinity."""
  out: set[int] = set()
  for part in spec.split(","):
    lo, _, hi = part.partition("-")
    out.update(range(int(lo), int(hi or lo) + 1))
  return out


def parse_env(setting: str) -> dict[str, str]:
  """'default' -> {}; "XLA_FLAGS='--a --b' FOO=1" -> {...}; KEY+=V appends to KEY.

  The pseudo-variable CPUS (e.g. CPUS=0) pins the subprocess to those CPUs instead
  (XLA sizes its thread pool from the affinity mask), for equal-core comparisons.
  """
  out: dict[str, str] = {}
  if setting.strip() in ("", "default"):
    return out
  for word in shlex.split(setting):
    key, sep, value = word.partition("=")
    if not sep or not key:
      raise ValueError(f"--jax_env word {word!r} is not KEY=VALUE or KEY+=VALUE")
    if key.endswith("+"):
      key = key[:-1]
      base = out.get(key, os.environ.get(key, ""))
      value = f"{base} {value}".strip()
    out[key] = value
  return out


def run_jobs(jobs: list[dict[str, Any]], env: dict[str, str] | None = None,
             timeout: float | None = None) -> list[dict[str, Any]]:
  """Runs `jobs` ({'fn': 'module:function', 'kwargs': {...}}) in order in ONE fresh
  Python process with `env` added to the environment; one result dict per job, or
  {'error': ...} for a job that raised, a crashed process or a timeout.

  A job may carry 'deadline' (time.time() seconds): past it, the worker skips it.
  """
  env = dict(env or {})
  cpus = parse_cpus(env.pop("CPUS")) if "CPUS" in env else None
  env_full = dict(os.environ, **env)
  env_full["PYTHONPATH"] = os.pathsep.join(
      [HERE, ROOT] + [p for p in env_full.get("PYTHONPATH", "").split(os.pathsep) if p])
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(jobs)]
  try:
    proc = subprocess.run(cmd, env=env_full, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    stderr, rc = f"timed out after {timeout:.0f} s", -9
  results = [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines()
             if line.startswith(RESULT_TAG)]
  if len(results) < len(jobs):
    tail = [l for l in (stderr or "").strip().splitlines() if l.strip()]
    why = tail[-1][:300] if tail else f"worker exited with status {rc}"
    results += [{"error": why}] * (len(jobs) - len(results))
  return results


def _worker(spec: str) -> None:
  """Subprocess side of `run_jobs`: prints one RESULT line per job, as it finishes."""
  for job in json.loads(spec):
    if job.get("deadline") and time.time() > job["deadline"]:
      result = {"error": "skipped: time budget spent"}
    else:
      module, _, fn = job["fn"].partition(":")
      t0 = time.perf_counter()
      try:
        result = getattr(importlib.import_module(module), fn)(**job.get("kwargs", {}))
      except Exception as e:  # pylint: disable=broad-except
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
      result["wall_s"] = time.perf_counter() - t0
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- report


def versions(*names: str) -> str:
  out = []
  for n in names:
    try:
      out.append(f"{n} {importlib.metadata.version(n)}")
    except importlib.metadata.PackageNotFoundError:
      out.append(f"{n} (not installed)")
  return ", ".join(out)


def cpu_model() -> str:
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in text.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return platform.processor() or "unknown CPU"


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def fmt(x: Any, spec: str = ".1f") -> str:
  return "-" if x is None else format(x, spec)


def header_lines(title: str, extra: list[str] = ()) -> list[str]:
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
  lines = [f"## {title}", "", f"    python {cmd}", "",
           f"* date: {now}; machine: {cpu_model()}, {cores()} cores, "
           f"{platform.system()} {platform.machine()}; Python {platform.python_version()}",
           f"* {versions('jax', 'jaxlib', 'flax', 'optax', 'torch', 'numpy')}"]
  lines += [f"* {e}" for e in extra]
  return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
  """Markdown table: case | implementation | setting | images/s | ms/step | compile s |
  jax/torch (| jax/best torch, when a case has several torch rows)."""
  best = any(r.get("best_ratio") is not None for r in rows)
  out = ["| case | implementation | setting | images/s | ms/step | compile s | jax/torch |"
         + (" jax/best torch |" if best else ""),
         "|---|---|---|---|---|---|---|" + ("---|" if best else "")]
  for r in rows:
    res = r["result"]
    if "error" in res:
      out.append(f"| {r['case']} | {r['impl']} | {r['setting']} | failed: "
                 f"{res['error'].replace('|', '/')} | | | |" + (" |" if best else ""))
      continue
    ratio, best_ratio = r.get("ratio"), r.get("best_ratio")
    out.append(f"| {r['case']} | {r['impl']} | {r['setting']} | {fmt(res['images_per_s'])} | "
               f"{fmt(res['step_ms'], '.0f')} | {fmt(res.get('compile_s'))} | "
               f"{fmt(ratio, '.2f')}{'x' if ratio is not None else ''} |" +
               (f" {fmt(best_ratio, '.2f')}{'x' if best_ratio is not None else ''} |"
                if best else ""))
  return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """jax rows get images/s over the case's first torch row (the PyTorch-default one)."""
  for r in rows:
    if r["kind"] != "jax" or "error" in r["result"]:
      continue
    ref = next((t for t in rows if t["kind"] == "torch" and t["case"] == r["case"]
                and t.get("reference") and "error" not in t["result"]), None)
    if ref is not None:
      r["ratio"] = r["result"]["images_per_s"] / ref["result"]["images_per_s"]
    others = [t["result"]["images_per_s"] for t in rows if t["kind"] == "torch"
              and t["case"] == r["case"] and "error" not in t["result"]]
    if len(others) > 1:
      r["best_ratio"] = r["result"]["images_per_s"] / max(others)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
  p.add_argument("--steps", type=int, default=5, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--torch_threads", default="",
                 help="comma list of torch.set_num_threads values, one torch row each "
                      "(default: all cores of this process); the first is the ratio's "
                      "reference")
  p.add_argument("--jax_env", default="default",
                 help="';'-separated environment settings, one jax row each per case")
  p.add_argument("--torch_channels_last", action="store_true",
                 help="add a torch row with the model and input in channels_last")
  p.add_argument("--no_torch", action="store_true", help="jax rows only")
  p.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
  a = p.parse_args(argv)
  names = [n.strip() for n in a.cases.split(",") if n.strip()]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    p.error(f"unknown --cases {unknown}; choose from {', '.join(CASES)}")
  settings = [s.strip() for s in a.jax_env.split(";") if s.strip()] or ["default"]
  envs = [(s, parse_env(s)) for s in settings]
  thread_counts = [int(t) for t in a.torch_threads.split(",") if t.strip()] or [cores()]
  load_before = os.getloadavg()

  rows: list[dict[str, Any]] = []
  for name in names:
    case = CASES[name]
    kw = dict(variant=case.variant, height=case.height, width=case.width, dtype=a.dtype,
              steps=a.steps, warmup=a.warmup)
    for setting, env in envs:
      res = run_jobs([{"fn": "cpu_step:time_jax_dare", "kwargs": kw}], env, a.timeout)[0]
      rows.append({"case": name, "kind": "jax", "impl": f"reid_jax {a.dtype}",
                   "setting": setting, "result": res})
      print(f"# {name} jax [{setting}]: {res}", file=sys.stderr, flush=True)
    if a.no_torch:
      continue
    variants = [(False, t, i == 0) for i, t in enumerate(thread_counts)]
    if a.torch_channels_last:
      variants.append((True, thread_counts[0], False))
    for channels_last, threads, reference in variants:
      res = run_jobs([{"fn": "cpu_step:time_torch_dare",
                       "kwargs": dict(kw, threads=threads, channels_last=channels_last)}],
                     None, a.timeout)[0]
      impl = f"PyTorch eager {'fp32' if a.dtype == 'float32' else 'bf16 autocast'}"
      n_threads = res.get("threads", threads)
      setting = f"{n_threads} thread{'s' if n_threads != 1 else ''}" + (
          ", channels_last" if channels_last else ", NCHW, oneDNN "
          f"{'on' if res.get('mkldnn', True) else 'off'}")
      rows.append({"case": name, "kind": "torch", "impl": impl, "setting": setting,
                   "result": res, "reference": reference})
      print(f"# {name} torch [{setting}]: {res}", file=sys.stderr, flush=True)
  add_ratios(rows)

  jax_devices = next((r["result"]["devices"] for r in rows
                      if r["kind"] == "jax" and "devices" in r["result"]), "?")
  torch_default = next((r["result"].get("default_threads") for r in rows
                        if r["kind"] == "torch" and "default_threads" in r["result"]), None)
  extra = [f"P=18 K=4 (72 images), {a.dtype}, random weights, one synthetic batch on the "
           f"device; {a.steps} timed steps after 1 + {a.warmup} untimed",
           f"torch threads: {', '.join(map(str, thread_counts))} (torch.get_num_threads() "
           f"default here: {torch_default}); jax: XLA's default CPU thread pool, {jax_devices} "
           "device(s), pmapped as in training",
           "load average before: " + " ".join(f"{x:.2f}" for x in load_before) +
           "; after: " + " ".join(f"{x:.2f}" for x in os.getloadavg())]
  if load_before[0] > 0.25 * cores():
    extra.append(f"**WARNING: load average {load_before[0]:.2f} on {cores()} cores before "
                 "the run: other processes were running. PyTorch's OpenMP threads stall "
                 "when one of them is descheduled (on this 2-core VM under load, "
                 "2026-12-01: 3.2 s vs 0.14 s per small_96x48 step at 2 threads vs 1); "
                 "compare with --torch_threads=N,1 and --jax_env='default;CPUS=0', or "
                 "rerun idle.**")
  cases_line = "; ".join(f"{n} = {CASES[n].label}" for n in names)
  lines = header_lines("DaRe train step on CPU: reid_jax vs PyTorch", extra + [cases_line])
  lines += [""] + table(rows)
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
    sys.path[:0] = [HERE, ROOT]
    _worker(sys.argv[2])
  else:
    main()
