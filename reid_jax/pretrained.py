"""ImageNet weights for the backbones: where they come from, a cache, a converter, a loader.

`config.model.pretrained` says what initialises the backbone (`resolve`):

  "imagenet"  the backbone's ImageNet weights (`IMAGENET`): torchvision's published
              files for ResNet-18/34/50/101 and DenseNet-201, downloaded on first use,
              checked against the SHA-256 prefix in their names, converted, and cached
              under $REID_JAX_CACHE (default ~/.cache/reid_jax); the GluonCV MobileNetV2
              from the cache or ../shared/pretrained/ (it has no download link).
  ""          random init, with a warning at train start (`announce`)
  "none"      random init by design (synthetic configs, from-scratch methods)
  a path      a converted `.npz` or any file `convert` accepts

Ahead of time (e.g. on a cluster's login node, for compute nodes without internet):

  python -m reid_jax.pretrained fetch --arch=resnet50

Or convert a file yourself, then load it into initialised variables:

  python -m reid_jax.pretrained convert --arch=resnet50 \
      --input=resnet50-0676ba61.pth --output=resnet50.npz

  variables = model.init(rng, x)
  variables = load_pretrained(variables, "resnet50.npz", "resnet50")

Our `.npz` format holds one array per flax variable, keyed by its flattened path
(`params/layer1_0/conv1/kernel`, `batch_stats/layer1_0/bn1/mean`, ...; paths relative to
the backbone) plus `__arch__`. Inputs: `.pth`/`.pt`/`.bin` (read without torch by a
restricted unpickler, `reid_jax.torch_state`; torch is used only as a fallback),
`.safetensors` (needs the `safetensors` package) or `.npz` of torchvision names;
for mobilenetv2 the GluonCV npz (`mobilenetv2_1.0_imagenet_gluon.npz`). Name mappings
are documented in `reid_jax.models.resnet`, `.densenet` and `.mobilenetv2`. Classifier
weights (`fc.*`, `classifier.*`, `mobilenetv20_output_*`) and BN counters are dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from reid_jax import download, torch_state
from reid_jax.models.reid_model import BACKBONES

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet201", "mobilenetv2")
ARCH_KEY = "__arch__"
COLLECTIONS = ("params", "batch_stats")

# torchvision DenseNet `_load_state_dict`: 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_GLUON_KEY = re.compile(
    r"^mobilenetv20_features_(?:(linearbottleneck\d+)_)?((?:conv|batchnorm)\d+)_"
    r"(weight|gamma|beta|running_mean|running_var)$"
)
_GLUON_LEAVES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_TORCH_STATS = {"running_mean": "mean", "running_var": "var"}
_TORCH_CLASSIFIERS = ("fc.", "classifier.")


class PretrainedError(ValueError):
  """A one-line error naming the weights file and the offending key."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an arch's ImageNet weights come from."""
  filename: str       # the published file name (torchvision's embeds the hash prefix)
  url: str            # "" when there is no download (put the file in the cache)
  sha256_prefix: str  # checked on every download ("" = no published hash)
  licence: str


_TORCHVISION = "https://download.pytorch.org/models/"
# torchvision's IMAGENET1K_V1 weights (torchvision/models/resnet.py, densenet.py); the
# hash prefix in each name is the start of the file's SHA-256 (torch.hub.check_hash).
IMAGENET: dict[str, Source] = {
    **{arch: Source(f"{arch}-{h}.pth", f"{_TORCHVISION}{arch}-{h}.pth", h,
                    "BSD-3-Clause (torchvision)")
       for arch, h in (("resnet18", "f37072fd"), ("resnet34", "b627a593"),
                       ("resnet50", "0676ba61"), ("resnet101", "63fe2227"),
                       ("densenet201", "c1103571"))},
    # The ONNX model zoo's mobilenetv2-1.0, exported from GluonCV (../shared/README.md).
    "mobilenetv2": Source("mobilenetv2_1.0_imagenet_gluon.npz", "", "",
                          "Apache-2.0 (GluonCV)"),
}
# The Gluon MobileNetV2 shipped beside the checkout (../shared/pretrained/).
SHARED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "..", "shared", "pretrained")
RANDOM_INIT = ("", "none")


def backbone_for_arch(arch: str, **kwargs: Any):
  """The standard backbone module for `arch` (the layout its ImageNet weights fit)."""
  if arch not in ARCHS:
    raise PretrainedError(f"unsupported arch {arch!r}; supported: {', '.join(ARCHS)}")
  return BACKBONES[arch](**kwargs)


@functools.lru_cache(maxsize=None)
def abstract_backbone_variables(arch: str) -> dict[str, Any]:
  """`jax.ShapeDtypeStruct` tree of the standard `arch` backbone's variables (no compute).

  Pass it to `load_pretrained` to get a fully loaded backbone without a random init.
  """
  module = backbone_for_arch(arch)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)


def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
  """Flat variable path -> shape of the standard `arch` backbone."""
  return {k: tuple(v.shape) for k, v in _flatten(abstract_backbone_variables(arch)).items()}


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x} for the collections we load."""
  flat = {}
  for col in COLLECTIONS:
    if col in variables:
      for path, value in traverse_util.flatten_dict(unfreeze(variables[col])).items():
        flat["/".join((col,) + tuple(path))] = value
  return flat


# ----------------------------------------------------------------------------- reading


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix DataParallel checkpoints put on every key."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def _unwrap(state: Any, path: str) -> Mapping[str, Any]:
  """The state dict inside a checkpoint ({'state_dict': ...} / {'model': ...})."""
  for wrapper in ("state_dict", "model"):
    if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise PretrainedError(f"{path}: expected a state dict, found {type(state).__name__}")
  return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict without torch; falls back to torch.load if needed."""
  try:
    state = _unwrap(torch_state.load(path), path)
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  except torch_state.UnsupportedPickle as e:
    restricted_error = str(e)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
          struct.error, pickle.UnpicklingError) as e:
    restricted_error = f"not a readable PyTorch file ({type(e).__name__}: {str(e)[:120]})"
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PretrainedError(
        f"{path}: {restricted_error}; reading it needs PyTorch (pip install torch), "
        "or supply the state dict as .safetensors or .npz"
    ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for unreadable files
    raise PretrainedError(f"{path}: cannot be read by torch.load: {str(e).splitlines()[0]}") from None
  state = _unwrap(state, path)
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, "numpy")}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file with the optional `safetensors` package."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PretrainedError(
        f"{path}: reading .safetensors needs the safetensors package (pip install safetensors), "
        "or supply the state dict as .npz"
    ) from None
  return dict(load_file(path))


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """Reads every array of a weights file (.npz, .safetensors, or a torch checkpoint)."""
  if not os.path.isfile(path):
    raise PretrainedError(f"{path}: no such file")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile/pickle errors of a broken file
      raise PretrainedError(f"{path}: not a readable .npz file ({e})") from None
  elif path.endswith(".safetensors"):
    arrays = _read_safetensors(path)
  else:
    arrays = _read_torch(path)
  return _strip_module_prefix(arrays)


# ----------------------------------------------------------------------------- mapping


def torch_key_to_flax(key: str, arch: str, ndim: int) -> str | None:
  """Maps a torchvision state-dict key to our flat flax path; None for dropped keys.

  E.g. resnet50 `layer1.0.downsample.1.running_mean` -> `batch_stats/layer1_0/downsample_1/mean`,
  densenet201 `features.denseblock1.denselayer1.norm.1.weight` -> `params/denseblock1/denselayer1/norm1/scale`.
  """
  if key.startswith(_TORCH_CLASSIFIERS) or key.endswith(".num_batches_tracked"):
    return None
  if arch.startswith("densenet"):
    key = _DENSENET_OLD_KEY.sub(r"\1\2", key)
    if not key.startswith("features."):
      raise ValueError("DenseNet keys start with 'features.'")
    key = key[len("features."):]
  *modules, leaf = key.split(".")
  merged: list[str] = []
  for token in modules:  # `layer1.0` -> `layer1_0`, `downsample.1` -> `downsample_1`
    if token.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{token}"
    else:
      merged.append(token)
  if leaf in _TORCH_STATS:
    collection, name = "batch_stats", _TORCH_STATS[leaf]
  elif leaf == "weight":
    if ndim not in (1, 4):
      raise ValueError(f"unexpected {ndim}-d weight")
    collection, name = "params", "kernel" if ndim == 4 else "scale"
  elif leaf == "bias":
    collection, name = "params", "bias"
  else:
    raise ValueError(f"unknown parameter name {leaf!r}")
  return "/".join([collection, *merged, name])


def gluon_key_to_flax(key: str) -> str | None:
  """Maps a GluonCV MobileNetV2 key to our flat flax path; None for the classifier."""
  if key.startswith("mobilenetv20_output"):
    return None
  match = _GLUON_KEY.match(key)
  if match is None:
    raise ValueError("not a GluonCV mobilenetv2_1.0 feature parameter")
  block, layer, leaf = match.groups()
  collection, name = ("params", "kernel") if leaf == "weight" else _GLUON_LEAVES[leaf]
  return "/".join([collection] + ([block] if block else []) + [layer, name])


def _to_flax_value(value: np.ndarray) -> np.ndarray:
  """OIHW conv kernels (incl. depthwise (C,1,kh,kw)) -> HWIO; everything as float32."""
  value = np.asarray(value, np.float32)
  return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value


def _is_ours(arrays: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(tuple(c + "/" for c in COLLECTIONS)) for k in arrays)


def _is_gluon(arrays: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith("mobilenetv20_") for k in arrays)


def to_flax_arrays(
    arrays: Mapping[str, np.ndarray], arch: str, path: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Converts a file's arrays to our flat format; also returns flax key -> source key."""
  if arch not in ARCHS:
    raise PretrainedError(f"{path}: unsupported arch {arch!r}; supported: {', '.join(ARCHS)}")
  if _is_ours(arrays):
    if ARCH_KEY in arrays and str(arrays[ARCH_KEY]) != arch:
      raise PretrainedError(f"{path}: holds {str(arrays[ARCH_KEY])} weights, not {arch}")
    flat = {k: np.asarray(v, np.float32) for k, v in arrays.items() if k != ARCH_KEY}
    return flat, {k: k for k in flat}
  gluon = _is_gluon(arrays)
  if gluon != (arch == "mobilenetv2"):
    kind = "GluonCV MobileNetV2" if gluon else "torchvision-style"
    raise PretrainedError(f"{path}: holds {kind} weights, which do not fit arch {arch}")
  flat, sources = {}, {}
  for key, value in arrays.items():
    try:
      new_key = gluon_key_to_flax(key) if gluon else torch_key_to_flax(key, arch, np.ndim(value))
    except ValueError as e:
      raise PretrainedError(f"{path}: key {key!r} does not map to {arch}: {e}") from None
    if new_key is None:
      continue
    if new_key in flat:
      raise PretrainedError(f"{path}: keys {sources[new_key]!r} and {key!r} both map to {new_key}")
    flat[new_key] = _to_flax_value(value)
    sources[new_key] = key
  return flat, sources


def _check(
    flat: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    target: Mapping[str, Sequence[int]],
    path: str,
    what: str,
) -> None:
  """Every file key must exist in `target` with the same shape, and vice versa."""
  for key, value in flat.items():
    src = "" if sources.get(key, key) == key else f" (from {sources[key]!r})"
    if key not in target:
      raise PretrainedError(f"{path}: {key}{src} is not a variable of {what}")
    if tuple(value.shape) != tuple(target[key]):
      raise PretrainedError(
          f"{path}: {key}{src} has shape {tuple(value.shape)}, {what} expects {tuple(target[key])}"
      )
  for key in target:
    if key not in flat:
      raise PretrainedError(f"{path}: missing {key} (a variable of {what})")


def load_backbone_arrays(path: str, arch: str) -> dict[str, np.ndarray]:
  """Reads any supported weights file as flat flax arrays, checked against `arch`."""
  flat, sources = to_flax_arrays(read_arrays(path), arch, path)
  _check(flat, sources, expected_shapes(arch), path, f"the standard {arch} backbone")
  return flat


def convert(arch: str, input_path: str, output_path: str) -> dict[str, np.ndarray]:
  """Converts a torchvision/Gluon weights file to our `.npz`; returns the flat arrays."""
  flat = load_backbone_arrays(input_path, arch)
  out_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(out_dir, exist_ok=True)
  # Written beside the target and renamed: a killed conversion leaves no loadable file.
  tmp = f"{output_path}.partial.{os.getpid()}.npz"
  try:
    np.savez(tmp, **{ARCH_KEY: np.array(arch)}, **flat)
    os.replace(tmp, output_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return flat


# ----------------------------------------------------------------------------- cache


def cache_dir() -> str:
  """$REID_JAX_CACHE, default ~/.cache/reid_jax."""
  return os.path.expanduser(os.environ.get("REID_JAX_CACHE") or "~/.cache/reid_jax")


def download_url(source: Source) -> str:
  """The source's URL, or the same file name under $REID_JAX_WEIGHTS_MIRROR if set."""
  mirror = os.environ.get("REID_JAX_WEIGHTS_MIRROR", "")
  return f"{mirror.rstrip('/')}/{source.filename}" if mirror and source.url else source.url


def cached_paths(arch: str) -> tuple[str, str]:
  """(where the published file is kept, where its conversion is kept) in the cache."""
  source = IMAGENET[arch]
  stem = os.path.splitext(source.filename)[0]
  root = os.path.join(cache_dir(), "imagenet")
  return os.path.join(root, "downloads", source.filename), os.path.join(root, f"{stem}.npz")


def _manual_steps(arch: str, raw: str, converted: str) -> str:
  """How to provide the weights by hand (offline nodes, blocked links)."""
  source = IMAGENET[arch]
  where = f"get {source.url} " if source.url else f"get {source.filename} "
  return (f"{where}and put it at {raw}, or run: python -m reid_jax.pretrained convert "
          f"--arch={arch} --input={source.filename} --output={converted}")


def fetch(arch: str, progress: bool = True) -> str:
  """Path of `arch`'s converted ImageNet weights, downloading and converting on first use.

  Order: the cached conversion; a published file already in the cache (verified, then
  converted); a download (verified, then converted). Every file appears atomically.
  Raises `PretrainedError` (one line: URL, file name, where to put it, the convert
  command) when the weights cannot be had.
  """
  if arch not in IMAGENET:
    raise PretrainedError(
        f"config.model.pretrained='imagenet': no ImageNet weights exist for backbone "
        f"{arch!r} (known: {', '.join(IMAGENET)}); set --config.model.pretrained=none "
        "to train it from random initialisation")
  source = IMAGENET[arch]
  raw, converted = cached_paths(arch)
  if os.path.isfile(converted):
    return converted
  if not source.url:  # Gluon MobileNetV2: no link; the cache or ../shared/pretrained.
    for candidate in (raw, os.path.join(SHARED_DIR, source.filename)):
      if os.path.isfile(candidate):
        return candidate
    raise PretrainedError(f"no {arch} ImageNet weights found: {_manual_steps(arch, raw, converted)}")
  if os.path.isfile(raw):
    digest = download.sha256_of(raw)
    if not digest.startswith(source.sha256_prefix):
      raise PretrainedError(
          f"{raw}: SHA-256 {digest[:16]}... does not start {source.sha256_prefix} (not the "
          f"published {source.filename}); delete it and run again")
  else:
    url = download_url(source)
    try:
      download.fetch(url, raw, source.sha256_prefix, progress=progress)
    except download.DownloadError as e:
      raise PretrainedError(f"{e}; {_manual_steps(arch, raw, converted)}") from None
    except download.ChecksumError as e:
      raise PretrainedError(str(e)) from None
  convert(arch, raw, converted)
  print(f"converted {raw} -> {converted}", file=sys.stderr, flush=True)
  return converted


def resolve(setting: str, arch: str) -> str | None:
  """`config.model.pretrained` -> a weights file to load, or None for random init."""
  if setting in RANDOM_INIT:
    return None
  if setting == "imagenet":
    return fetch(arch)
  path = os.path.expanduser(setting)
  if not os.path.isfile(path):
    raise PretrainedError(
        f"config.model.pretrained={setting!r}: no such file; use 'imagenet' (fetched and "
        "cached), 'none' (random init) or the path of a converted .npz")
  return path


def announce(model_cfg: Any) -> str | None:
  """Checks (and fetches) `config.model.pretrained` before any work; returns a warning
  line or None.

  "" (random init without saying so) warns: every paper config starts from ImageNet
  weights, so a user who trains from scratch should say "none".
  """
  setting = model_cfg.pretrained
  if setting == "":
    return (f"config.model.pretrained is empty: the {model_cfg.backbone} backbone trains "
            "from random initialisation, not ImageNet weights; set "
            "--config.model.pretrained=imagenet, or =none to silence this")
  resolve(setting, model_cfg.backbone)  # fetches now: a failure stops the run before any work
  return None


def load_configured(variables: Mapping[str, Any], model_cfg: Any, truncated: bool = False
                    ) -> Any:
  """Loads the backbone weights `config.model.pretrained` names (no-op for random init)."""
  path = resolve(model_cfg.pretrained, model_cfg.backbone)
  if path is None:
    return variables
  return load_pretrained(variables, path, model_cfg.backbone, truncated=truncated)


# ----------------------------------------------------------------------------- loading


def load_pretrained(variables: Mapping[str, Any], path: str, arch: str,
                    truncated: bool = False) -> Any:
  """Returns `variables` with the backbone's params/batch_stats replaced from `path`.

  `variables` are those of a `ReIDModel` (the backbone lives under 'backbone') or of a
  bare backbone; leaves may be arrays or `jax.ShapeDtypeStruct`s (e.g. from
  `jax.eval_shape` of `init`, skipping the slow random init of a fully loaded backbone).
  `path` is our converted `.npz`, the GluonCV MobileNetV2 npz, or any input `convert`
  accepts. Head/classifier variables are left untouched. Raises `PretrainedError` (one
  line, naming the file and key) on any missing, unexpected or mis-shaped variable.
  `truncated=True` (a backbone cut after an early stage, `model.num_stages < 4`): the
  file must still be a whole `arch` backbone, and its deeper layers are left unused.
  """
  flat, sources = to_flax_arrays(read_arrays(path), arch, path)
  if truncated:
    _check(flat, sources, expected_shapes(arch), path, f"the standard {arch} backbone")
  frozen = isinstance(variables, FrozenDict)
  tree = unfreeze(variables)
  in_reid_model = "backbone" in tree.get("params", {})
  backbone = {col: tree[col].get("backbone", {}) if in_reid_model else tree[col]
              for col in COLLECTIONS if col in tree}
  target = _flatten(backbone)
  what = f"the model's backbone (arch {arch})"
  if truncated:
    flat = {k: v for k, v in flat.items() if k in target}
  _check(flat, sources, {k: tuple(v.shape) for k, v in target.items()}, path, what)
  for col, subtree in backbone.items():
    loaded = traverse_util.unflatten_dict({
        p: jnp.asarray(flat["/".join((col,) + p)], dtype=old.dtype)
        for p, old in traverse_util.flatten_dict(subtree).items()
    })
    if in_reid_model:
      if subtree:
        tree[col]["backbone"] = loaded
    else:
      tree[col] = loaded
  return freeze(tree) if frozen else tree


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m reid_jax.pretrained {fetch,convert} ...`."""
  parser = argparse.ArgumentParser(prog="python -m reid_jax.pretrained", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  get = sub.add_parser("fetch", help="download, verify, convert and cache ImageNet weights "
                       "(as pretrained='imagenet' does on first use)")
  get.add_argument("--arch", required=True, choices=tuple(IMAGENET) + ("all",))
  conv = sub.add_parser("convert", help="convert torchvision/Gluon weights to our flax .npz")
  conv.add_argument("--arch", required=True, choices=ARCHS)
  conv.add_argument("--input", required=True, help=".pth/.pt/.bin, .safetensors or .npz")
  conv.add_argument("--output", required=True, help="output .npz")
  args = parser.parse_args(argv)
  try:
    if args.command == "fetch":
      for arch in IMAGENET if args.arch == "all" else (args.arch,):
        print(f"{arch}: {fetch(arch)} ({IMAGENET[arch].licence})")
      return 0
    flat = convert(args.arch, args.input, args.output)
  except PretrainedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_params = sum(v.size for k, v in flat.items() if k.startswith("params/"))
  print(f"wrote {args.output}: {args.arch}, {len(flat)} arrays, {n_params:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
