"""The GPU benchmark suite: one call on a lent GPU machine, one markdown table.

  bash benchmarks/gpu_suite.sh             # checks/installs deps, then runs this file
  python3 benchmarks/gpu_suite.py [--budget_s=450] [--dry_run]

Rows (train steps on synthetic batches already on the device; random weights):
  * DaRe-ResNet-50, 256x128, P=18 K=4 (configs/dare.py), float32 and bfloat16:
    reid_jax (the pmapped step `python -m reid_jax.train` runs) vs PyTorch with
    benchmarks/torch_models.py's twin (same network, loss, optimiser; checked by
    tests/test_torch_reference.py): eager with PyTorch's defaults, eager tuned
    (channels_last + cudnn.benchmark), torch.compile of forward + loss; and the DaRe head
    on torchvision's resnet50 (eager) when torchvision imports.
  * IDE, ResNet-50 256x128, batch 32, 751 classes (configs/ide.py; Market-1501's
    training identities), reid_jax only.
  * Re-ID done right, ResNet-101 (configs/done_right.py), reid_jax only: the
    classification stage (batch 32 at 416x208), the padded ranking step (64 triplets
    on the 416x208 canvas) and the sequential ranking update (triplets one at a time,
    gradients accumulated; fewer triplets than the paper's 64, to fit the budget).
    A PyTorch twin of these is out of scope (see torch_models.py).

Rows run in groups, one fresh subprocess each (so jax's and torch's GPU allocators
never share the device), in priority order (GROUP_ORDER: the DaRe comparison first,
torch.compile and the remaining jax-only rows last); a row that would start after
`--budget_s` is reported as skipped and a group still running then is killed, so the
suite ends in time (gpu_suite.sh passes what is left of 470 s). Compile time is
reported separately (first step minus one timed step). The table goes to stdout and to
$OUT/gpu_suite.md ($OUT set) or ./gpu_suite.md.

`--dry_run` runs the same rows on a CPU with tiny models and inputs (resnet_small,
32x16, 1 step, XLA optimisations off) to check the suite end to end: 1.5 min on the
2-core VM (3 min when it is busy); its numbers mean nothing. It skips the torch.compile
rows (inductor's C++ build takes minutes per row on a small CPU; --dry_run_compile runs
them) and the IDE bf16 row.

Modules reid_jax imports but no timed step uses (tensorflow_datasets, grain,
array_record, ... for the input pipeline) are replaced by inert stubs in the worker
processes when they are missing, and the report says so; jax, flax, optax, numpy,
ml_collections and orbax must be real (`--hide_modules` tests this path).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]

import cpu_step  # noqa: E402  (shared timing and subprocess helpers)

# Modules the timed steps need for real; anything else missing may be stubbed.
CORE_MODULES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections", "orbax",
                "absl", "torch", "reid_jax", "configs")
REID_MODULES = ("reid_jax.methods.dare.train", "reid_jax.methods.classification.train",
                "reid_jax.methods.done_right.train")
# Input-pipeline libraries, stubbed whole when installed but not importable.
DATA_LIBRARIES = ("tensorflow_datasets", "grain", "array_record")
MARKET_CLASSES = 751  # Market-1501 training identities (the IDE / done-right softmax)


# ----------------------------------------------------------------------------- stubs


class _StubMeta(type):
  def __getattr__(cls, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return _Stub

  def __call__(cls, *args: Any, **kwargs: Any) -> Any:
    # A subclass (e.g. a dataclass over a stubbed tfds.core.BuilderConfig) may not know
    # the base's fields: keep the keywords as attributes instead of failing.
    try:
      return super().__call__(*args, **kwargs)
    except TypeError:
      obj = cls.__new__(cls)
      obj.__dict__.update(kwargs)
      return obj


class _Stub(metaclass=_StubMeta):
  """Stands for any attribute of a missing module: subclassable, callable, inert."""

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    del args, kwargs

  def __init_subclass__(cls, **kwargs: Any) -> None:
    del kwargs

  def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
    return _Stub()

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return _Stub()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `names` (and their submodules) as stub packages."""

  def __init__(self, names: set[str]):
    self.names = names

  def find_spec(self, fullname: str, path: Any = None, target: Any = None):
    if fullname.split(".")[0] in self.names:
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec: Any) -> types.ModuleType:
    m = types.ModuleType(spec.name)
    m.__path__ = []

    def getattr_(name: str) -> Any:
      if name.startswith("__"):
        raise AttributeError(name)
      return _Stub
    m.__getattr__ = getattr_
    return m

  def exec_module(self, module: types.ModuleType) -> None:
    del module


class _Hider(importlib.abc.MetaPathFinder):
  """Makes `names` unimportable (to test the stub path where they are installed)."""

  def __init__(self, names: set[str]):
    self.names = names

  def find_spec(self, fullname: str, path: Any = None, target: Any = None):
    if fullname.split(".")[0] in self.names:
      raise ModuleNotFoundError(f"No module named {fullname!r} (hidden)", name=fullname)
    return None


def prepare_imports(hide: tuple[str, ...] = (), modules: tuple[str, ...] = REID_MODULES
                    ) -> dict[str, Any]:
  """Worker set-up job: imports `modules` (reid_jax's method modules), stubbing missing
  non-core modules one by one; returns {'stubbed': [...]} (raises if a core module is
  missing)."""
  if hide:
    sys.meta_path.insert(0, _Hider(set(hide)))
  finder = _StubFinder(set())
  sys.meta_path.insert(0, finder)
  for _ in range(100):
    try:
      for name in modules:
        importlib.import_module(name)
      return {"stubbed": sorted(finder.names)}
    except ModuleNotFoundError as e:
      top = (e.name or "").split(".")[0]
      if not top or top in CORE_MODULES or top in finder.names:
        raise
      finder.names.add(top)
    except Exception as e:  # pylint: disable=broad-except
      # A data library that is installed but broken (e.g. one of its own dependencies
      # stubbed): stub the library itself.
      frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
      top = next((d for d in DATA_LIBRARIES if d not in finder.names
                  and any(f"{os.sep}{d}{os.sep}" in f for f in frames)), None)
      if top is None:
        raise
      finder.names.add(top)
      for k in [k for k in sys.modules if k.split(".")[0] in ("reid_jax", "configs", top)]:
        del sys.modules[k]
  raise RuntimeError("too many missing modules")


# ----------------------------------------------------------------------------- jax rows


def _apply(c: Any, overrides: dict[str, Any]) -> Any:
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def _load_config(name: str, variant: str, overrides: dict[str, Any]) -> Any:
  mod = importlib.import_module(f"configs.{name}")
  c = mod.get_config(variant or None)
  c.model.pretrained = "none"
  return _apply(c, overrides)


def _device_step(step_fn: Any, seed: int) -> Any:
  import jax  # pylint: disable=import-outside-toplevel
  from reid_jax.core import loop, parallel  # pylint: disable=import-outside-toplevel
  return jax.pmap(loop.device_step(step_fn, seed), axis_name=parallel.AXIS,
                  donate_argnums=(0,))


def time_jax_ide(steps: int, warmup: int, dtype: str = "float32",
                 overrides: dict[str, Any] | None = None,
                 classes: int = MARKET_CLASSES) -> dict[str, Any]:
  """The IDE step as methods.classification.train.stages builds it (softmax over
  `classes`, dropout, SGD Nesterov with the backbone at 0.1x), on a random batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.classification import losses  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.classification import train as cls  # pylint: disable=import-outside-toplevel
  c = _load_config("ide", "", dict(overrides or {}, **{"model.dtype": dtype}))
  variables = cls.init_variables(jax.random.PRNGKey(c.seed), c, classes, pretrained=False)
  state = cls.create_train_state(variables, c, classes, int(c.train.steps))
  step_fn = functools.partial(cls.train_step, model=cls.build_model(c, classes, train=True),
                              config=c, loss_fn=losses.LOSSES[c.method])
  b = int(c.input.batch_size)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(b, c.input.height, c.input.width, 3)).astype(np.float32),
           "label": rng.integers(0, classes, b).astype(np.int32)}
  return cpu_step.time_pmapped(_device_step(step_fn, c.seed), state, batch, b, steps, warmup)


def time_jax_done_right_cls(steps: int, warmup: int, dtype: str = "float32",
                            overrides: dict[str, Any] | None = None,
                            classes: int = MARKET_CLASSES) -> dict[str, Any]:
  """Re-ID done right's stage 1 (classification) step, as its plan_stages builds it."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.done_right import train as dr  # pylint: disable=import-outside-toplevel
  c = _load_config("done_right", "", dict(overrides or {}, **{"model.dtype": dtype}))
  state = dr._stage1_state(c, classes, int(c.train.steps))  # pylint: disable=protected-access
  step_fn = functools.partial(dr.classification_step,
                              model=dr.build_model(c, classes, train=True),
                              smoothing=c.loss.label_smoothing)
  b = int(c.input.batch_size)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(b, c.input.height, c.input.width, 3)).astype(np.float32),
           "label": rng.integers(0, classes, b).astype(np.int32)}
  return cpu_step.time_pmapped(_device_step(step_fn, c.seed), state, batch, b, steps, warmup)


def _triplets(n: int, h: int, w: int) -> list[tuple[Any, Any, Any]]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  return [tuple(rng.normal(size=(h, w, 3)).astype(np.float32) for _ in range(3))
          for _ in range(n)]


def time_jax_done_right_padded(steps: int, warmup: int, dtype: str = "float32",
                               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ranking stage's padded step: the update's triplets as fixed-size batches on
  the padded canvas (config.ranking.mode='padded'); images/s counts 3 per triplet."""
  from reid_jax.methods.done_right import train as dr  # pylint: disable=import-outside-toplevel
  c = _load_config("done_right", "", dict(overrides or {}, **{"model.dtype": dtype}))
  c.ranking.mode = "padded"
  state = dr._stage2_state(c, None, int(c.ranking.steps))  # pylint: disable=protected-access
  step_fn = functools.partial(dr.padded_step, embed_fn=dr.embed_fn(c), margin=c.loss.margin)
  t = int(c.ranking.triplets_per_update)
  h, w = dr.padded_canvas(c)
  batch = dr.stack_window({"triplets": _triplets(t, h, w)}, 0)
  out = cpu_step.time_pmapped(_device_step(step_fn, c.seed), state, batch, 3 * t, steps, warmup)
  return dict(out, canvas=f"{h}x{w}", triplets=t)


def time_jax_done_right_sequential(steps: int, warmup: int, dtype: str = "float32",
                                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ranking stage's sequential update (the paper's mode: triplets one at a time
  at their own size, gradients accumulated; all images here at the pool size)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from reid_jax.core import parallel  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.done_right import train as dr  # pylint: disable=import-outside-toplevel
  from reid_jax.methods.done_right import step as dr_step  # pylint: disable=import-outside-toplevel
  c = _load_config("done_right", "", dict(overrides or {}, **{"model.dtype": dtype}))
  t = int(c.ranking.triplets_per_update)
  step = dr_step.SequentialTripletStep(dr.embed_fn(c), margin=c.loss.margin,
                                       triplets_per_update=t, seed=c.seed)
  state = dr._stage2_state(c, None, int(c.ranking.steps))  # pylint: disable=protected-access
  state = parallel.replicate(state)
  n = jax.local_device_count()
  window = {"triplets": _triplets(t, c.input.height, c.input.width), "mining_s": 0.0}
  t0 = time.perf_counter()
  state, m = step(state, window, np.full(n, 1, np.int32))
  jax.block_until_ready(m["loss"])
  first = time.perf_counter() - t0
  for k in range(warmup):
    state, m = step(state, window, np.full(n, 2 + k, np.int32))
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for k in range(steps):
    state, m = step(state, window, np.full(n, 2 + warmup + k, np.int32))
  jax.block_until_ready(m["loss"])
  dt = (time.perf_counter() - t0) / steps
  return {"images_per_s": 3 * t / dt, "step_ms": 1e3 * dt, "compile_s": first - dt,
          "triplets": t, "loss": float(np.asarray(parallel.unreplicate(m)["loss"]))}


def jax_info() -> dict[str, Any]:
  """Backend, device name and precision defaults of this jax."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"platform": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "devices": jax.local_device_count(),
          "matmul_precision": str(jax.config.jax_default_matmul_precision)}


def torch_info() -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  out = {"cuda": torch.cuda.is_available(),
         "cudnn_tf32": torch.backends.cudnn.allow_tf32,
         "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
         "cudnn_benchmark": torch.backends.cudnn.benchmark,
         "threads": torch.get_num_threads()}
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    out["torchvision"] = torchvision.__version__
  except ImportError:
    out["torchvision"] = None
  return out


def time_torch_row(tuned: bool = False, **kw: Any) -> dict[str, Any]:
  """cpu_step.time_torch_dare on CUDA when present; `tuned` = channels_last +
  cudnn.benchmark (what a tuned PyTorch script sets; not the defaults)."""
  import torch  # pylint: disable=import-outside-toplevel
  if kw.get("backbone") == "torchvision":
    try:
      import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return {"error": "skipped: torchvision not importable"}
  torch.backends.cudnn.benchmark = bool(tuned)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  try:
    return cpu_step.time_torch_dare(device=device, channels_last=tuned, **kw)
  finally:
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the plan


def plan(dry: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(rows, settings): each row names its group (one subprocess per group), its label
  and its job. Full sizes on the GPU; tiny CPU ones in the dry run."""
  if dry:
    s = {"steps": 1, "warmup": 0, "seq_steps": 1}
    tiny = {"model.backbone": "resnet_small", "model.width": 8, "model.last_stride": 1,
            "input.height": 32, "input.width": 16}
    dare = dict(variant="synthetic", height=32, width=16, P=4, K=2)
    dare_label = "DaRe-resnet_small w16 32x16 P4K2 (dry run)"
    ide_o = dict(tiny, **{"input.batch_size": 8})
    dr_o = dict(tiny, **{"model.embed_dim": 64, "input.batch_size": 8,
                         "input.longer_side": 32, "ranking.triplets_per_update": 4})
    ide_label = "IDE resnet_small 32x16 b8 (dry run)"
    dr_label = "done-right resnet_small 32x16 (dry run)"
    seq_triplets = 2
    classes = 16
  else:
    s = {"steps": 30, "warmup": 5, "seq_steps": 2}
    dare = dict(variant="", height=256, width=128, P=18, K=4)
    dare_label = "DaRe-ResNet-50 256x128 P18K4"
    ide_o, dr_o = {}, {}
    ide_label = "IDE ResNet-50 256x128 b32"
    dr_label = "done-right ResNet-101"
    seq_triplets = 16
    classes = MARKET_CLASSES
  st = dict(steps=s["steps"], warmup=s["warmup"])
  rows: list[dict[str, Any]] = []

  def row(group_: str, model_: str, impl_: str, dtype_: str, fn_: str, **kwargs: Any) -> None:
    rows.append({"group": group_, "model": model_, "impl": impl_, "dtype": dtype_,
                 "job": {"fn": fn_, "kwargs": kwargs}})

  for dt in ("float32", "bfloat16"):
    row("jax", dare_label, "reid_jax", dt, "cpu_step:time_jax_dare", dtype=dt, **dare, **st)
  for dt in ("float32", "bfloat16"):
    row("torch", dare_label, "PyTorch eager (defaults)", dt, "gpu_suite:time_torch_row",
        dtype=dt, **dare, **st)
    row("torch", dare_label, "PyTorch eager tuned (channels_last, cudnn.benchmark)", dt,
        "gpu_suite:time_torch_row", tuned=True, dtype=dt, **dare, **st)
    row("torch", dare_label, "PyTorch eager, torchvision resnet50", dt,
        "gpu_suite:time_torch_row", backbone="torchvision", dtype=dt, **dare, **st)
  for dt in ("float32", "bfloat16"):
    row("torch_compile", dare_label, "PyTorch torch.compile (forward + loss)", dt,
        "gpu_suite:time_torch_row", compile=True, dtype=dt, **dare, **st)
  for dt in ("float32", "bfloat16"):
    row("jax2" if dt == "float32" else "jax3", ide_label, "reid_jax", dt,
        "gpu_suite:time_jax_ide", dtype=dt, overrides=ide_o, classes=classes, **st)
  row("jax2", dr_label + (" cls b32 416x208" if not dry else " cls"), "reid_jax", "float32",
      "gpu_suite:time_jax_done_right_cls", overrides=dr_o, classes=classes, **st)
  row("jax2", dr_label + (" ranking padded 64 triplets" if not dry else " padded"),
      "reid_jax", "float32", "gpu_suite:time_jax_done_right_padded", overrides=dr_o,
      steps=max(1, s["steps"] // 6), warmup=1)
  row("jax3", dr_label + f" ranking sequential {seq_triplets} triplets", "reid_jax",
      "float32", "gpu_suite:time_jax_done_right_sequential",
      overrides=dict(dr_o, **{"ranking.triplets_per_update": seq_triplets}),
      steps=s["seq_steps"], warmup=0)
  if dry:  # one jax process: start-up is a large part of a tiny run
    for r in rows:
      r["group"] = "jax" if r["group"].startswith("jax") else r["group"]
      if r["job"]["fn"] == "gpu_suite:time_jax_ide" and r["dtype"] == "bfloat16":
        # ~30 s of CPU compile for a path the DaRe bf16 row already exercises
        # (model.dtype=bfloat16); the GPU run has it.
        r["result"] = {"error": "skipped in the dry run (the DaRe bfloat16 row checks "
                                "the same model.dtype path)"}
  return rows, s


# Groups run in this order (one subprocess each): the DaRe comparison first, then the
# jax-only rows and torch.compile (whose compile is the longest), so an overrun of the
# budget costs the least important rows.
GROUP_ORDER = ("jax", "torch", "jax2", "torch_compile", "jax3")
DRY_COMPILE_NOTE = ("skipped in the dry run: inductor's C++ build took 133 s (fp32) and "
                    "152 s (bf16) per row on this 2-core CPU (2026-12-01, both trained); "
                    "--dry_run_compile runs it")


def gpu_name() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    if out.returncode == 0 and out.stdout.strip():
      return "; ".join(l.strip() for l in out.stdout.strip().splitlines())
  except (OSError, subprocess.SubprocessError):
    pass
  return ""


def render(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
           wall_s: float) -> str:
  """The whole report: header lines and one table."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  gpu = gpu_name()
  ji, ti = info.get("jax", {}), info.get("torch", {})
  dry = " (DRY RUN on CPU: numbers mean nothing)" if args.dry_run else ""
  lines = [f"## GPU suite: reid_jax vs PyTorch train steps{dry}",
           "", "    " + (os.environ.get("GPU_SUITE_COMMAND") or " ".join(
               ["python3 benchmarks/gpu_suite.py"] + sys.argv[1:])).strip(), "",
           f"* date: {now}; GPU: {gpu or 'none (nvidia-smi absent)'}; host: "
           f"{cpu_step.cpu_model()}, {cpu_step.cores()} cores; Python {platform.python_version()}",
           "* " + cpu_step.versions("jax", "jaxlib", "flax", "optax", "torch", "torchvision",
                                    "numpy"),
           f"* jax backend {ji.get('platform', '?')} ({ji.get('device', '?')}, "
           f"{ji.get('devices', '?')} device(s)); jax_default_matmul_precision="
           f"{ji.get('matmul_precision', '?')} (XLA's default: TF32 for float32 on recent GPUs)",
           f"* torch defaults: cudnn.allow_tf32={ti.get('cudnn_tf32', '?')}, "
           f"cuda.matmul.allow_tf32={ti.get('matmul_tf32', '?')}, cudnn.benchmark="
           f"{ti.get('cudnn_benchmark', '?')}; bfloat16 = reid_jax model.dtype (fp32 master "
           "weights) vs torch.autocast",
           f"* steps per row: {info['settings']['steps']} timed after 1 + "
           f"{info['settings']['warmup']} untimed (fewer for the done-right ranking rows); "
           f"rows ran {wall_s:.0f} s of a {args.budget_s:.0f} s budget; host load average "
           f"before: {' '.join(f'{x:.2f}' for x in info['load'])}"]
  if info.get("stubbed"):
    lines.append(f"* not installed, stubbed (used by the input pipeline, by no timed step): "
                 f"{', '.join(info['stubbed'])}")
  if args.dry_run:
    lines.append("* dry run: tiny models and inputs, XLA backend optimisations off "
                 "(JAX_DISABLE_MOST_OPTIMIZATIONS=1), 1 torch thread")
  lines += ["", "| model / step | implementation | dtype | images/s | ms/step | compile s | "
                "jax/torch | jax/best torch |", "|---|---|---|---|---|---|---|---|"]
  ref: dict[tuple[str, str], float] = {}
  best: dict[tuple[str, str], float] = {}
  for r in rows:
    if r["impl"].startswith("PyTorch") and "error" not in r["result"]:
      key, ips = (r["model"], r["dtype"]), r["result"]["images_per_s"]
      best[key] = max(best.get(key, 0.0), ips)
      if r["impl"] == "PyTorch eager (defaults)":
        ref[key] = ips
  for r in rows:
    res = r["result"]
    if "error" in res:
      lines.append(f"| {r['model']} | {r['impl']} | {r['dtype']} | "
                   f"{res['error'].replace('|', '/')} | | | | |")
      continue
    key = (r["model"], r["dtype"])
    ratio = best_ratio = ""
    if r["impl"] == "reid_jax" and key in ref:
      ratio = f"{res['images_per_s'] / ref[key]:.2f}x"
    if r["impl"] == "reid_jax" and key in best:
      best_ratio = f"{res['images_per_s'] / best[key]:.2f}x"
    lines.append(f"| {r['model']} | {r['impl']} | {r['dtype']} | "
                 f"{cpu_step.fmt(res['images_per_s'])} | {cpu_step.fmt(res['step_ms'], '.1f')} | "
                 f"{cpu_step.fmt(res.get('compile_s'))} | {ratio} | {best_ratio} |")
  lines.append("")
  lines.append("jax/torch: reid_jax images/s over PyTorch eager with its defaults; jax/best "
               "torch: over the fastest PyTorch row; same model and dtype. compile s: first "
               "step minus one timed step (jax: trace + XLA compile + autotuning; "
               "torch.compile: dynamo + inductor).")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry_run", action="store_true", help="tiny CPU run of every row")
  p.add_argument("--budget_s", type=float, default=None,
                 help="seconds for all rows (default 450; 240 in the dry run)")
  p.add_argument("--only", default="", help=f"comma list of groups: {','.join(GROUP_ORDER)}")
  p.add_argument("--dry_run_compile", action="store_true",
                 help="dry run: attempt the torch.compile rows too (minutes on a small CPU)")
  p.add_argument("--hide_modules", default="",
                 help="testing: make these modules unimportable in the workers (checks "
                      "the stub path where they are installed)")
  a = p.parse_args(argv)
  if a.budget_s is None:
    a.budget_s = 240.0 if a.dry_run else 450.0
  rows, settings = plan(a.dry_run)
  # The dry run puts the (fast) torch rows first: on a busy CPU the budget then cuts
  # jax rows, whose compile is the cost, and says so.
  order = ("torch",) + GROUP_ORDER if a.dry_run else GROUP_ORDER
  groups = [g for g in dict.fromkeys(order) if any(r["group"] == g for r in rows)
            and (not a.only or g in a.only.split(","))]
  rows = [r for r in rows if r["group"] in groups]
  if a.dry_run and not a.dry_run_compile:
    for r in rows:
      if r["group"] == "torch_compile":
        r["result"] = {"error": DRY_COMPILE_NOTE}
    groups = [g for g in groups if g != "torch_compile"]
  env: dict[str, str] = {}
  if a.dry_run:
    env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_PLATFORMS": "cpu",
           "REID_BENCH_FAST_COMPILE": "1"}
  hide = tuple(m for m in a.hide_modules.split(",") if m)
  start = time.time()
  deadline = start + a.budget_s
  info: dict[str, Any] = {"settings": settings, "stubbed": set()}
  info["load"] = os.getloadavg()
  for g in groups:
    mine = [r for r in rows if r["group"] == g and "result" not in r]
    remaining = deadline - time.time()
    if remaining < 10:
      for r in mine:
        r["result"] = {"error": "skipped: time budget spent"}
      continue
    is_jax = g.startswith("jax")
    extra = {"threads": 1} if (a.dry_run and not is_jax) else {}
    modules = list(REID_MODULES) if is_jax else ["configs.dare"]  # torch: configs only
    jobs: list[dict[str, Any]] = [{"fn": "gpu_suite:prepare_imports",
             "kwargs": {"hide": list(hide), "modules": modules}},
            {"fn": "gpu_suite:jax_info" if is_jax else "gpu_suite:torch_info"}]
    jobs += [{"fn": r["job"]["fn"], "kwargs": dict(r["job"]["kwargs"], **extra),
              "deadline": deadline - 5} for r in mine]
    print(f"# group {g}: {len(mine)} rows, {remaining:.0f} s left", file=sys.stderr, flush=True)
    results = cpu_step.run_jobs(jobs, env, timeout=remaining)
    setup, about = results[0], results[1]
    if "error" in setup:
      for r in mine:
        r["result"] = {"error": f"imports failed: {setup['error']}"}
      continue
    info["stubbed"] |= set(setup.get("stubbed", []))
    if "error" not in about:
      info["jax" if is_jax else "torch"] = about
    for r, res in zip(mine, results[2:]):
      r["result"] = res
      print(f"#   {r['model']} | {r['impl']} | {r['dtype']}: {res}", file=sys.stderr, flush=True)
  info["stubbed"] = sorted(info["stubbed"])
  report = render(rows, info, a, time.time() - start)
  print(report, flush=True)
  out_dir = os.environ.get("OUT") or os.getcwd()
  path = os.path.join(out_dir, "gpu_suite.md")
  with open(path, "w") as f:
    f.write(report + "\n")
  print(f"(written to {path})", file=sys.stderr)


if __name__ == "__main__":
  main()
