"""`config.model.pretrained = "imagenet"`: download -> checksum -> conversion -> load, offline.

A local HTTP server on 127.0.0.1 (started here) stands in for download.pytorch.org. It
serves a randomly initialised ResNet-50 state dict in torchvision's exact naming (the
reference network of tests/test_pretrained.py), saved by torch as torchvision's files
are; the registry entry is pointed at it with that file's own SHA-256 prefix. Checked:
the fetched, converted weights give the torch reference's stage outputs, and
`configs/dare.py` as typed loads them; a wrong hash is refused and nothing is cached; a
download killed mid-way leaves nothing that loads; offline, the CLI stops with one line.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import download, pretrained, torch_state
from reid_jax.core import experiment
from reid_jax.models import BACKBONES
from test_pretrained import H, W, abstract_variables, randomise, rel_err, torch_models, torch_stages

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- server


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves the test's folder; `slow` files trickle out (to be killed mid-download)."""

  slow: set[str] = set()

  def log_message(self, *args):  # keep pytest output clean
    pass

  def do_GET(self):
    name = self.path.lstrip("/")
    if name not in self.slow:
      return super().do_GET()
    data = (Path(self.directory) / name).read_bytes()
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    try:
      for i in range(0, len(data), 1 << 16):
        self.wfile.write(data[i:i + (1 << 16)])
        self.wfile.flush()
        time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
      pass


class Server:
  def __init__(self, directory: Path):
    handler = functools.partial(_Handler, directory=str(directory))
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.port = self.httpd.server_address[1]
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, name: str) -> str:
    return f"http://127.0.0.1:{self.port}/{name}"

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A torchvision-named random ResNet-50 (torch reference included) behind a server."""
  torch, _, Bottleneck, ResNet, _ = torch_models()
  torch.manual_seed(0)
  ref = randomise(torch, ResNet(Bottleneck, (3, 4, 6, 3), last_stride=2))
  root = tmp_path_factory.mktemp("www")
  tmp = root / "tmp.pth"
  torch.save(ref.state_dict(), tmp)
  digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
  name = f"resnet50-{digest[:8]}.pth"  # torchvision's naming: the hash prefix in the name
  tmp.rename(root / name)
  server = Server(root)
  yield dict(torch=torch, ref=ref, root=root, name=name, prefix=digest[:8], server=server)
  server.stop()


@pytest.fixture
def registry(served, tmp_path, monkeypatch):
  """An empty cache and the resnet50 entry pointing at the local server."""
  monkeypatch.setenv("REID_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("REID_JAX_WEIGHTS_MIRROR", raising=False)
  source = pretrained.Source(served["name"], served["server"].url(served["name"]),
                             served["prefix"], "test")
  monkeypatch.setitem(pretrained.IMAGENET, "resnet50", source)
  return source


def _loadable_files(root: Path) -> list[str]:
  """Files under the cache that `fetch` would ever read (not `.partial.*` leftovers)."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and ".partial." not in p.name)


# ----------------------------------------------------------------------------- tests


def test_fetch_downloads_verifies_converts_and_matches_torch(served, registry, tmp_path, capsys):
  """download -> checksum -> conversion -> the forward pass equals torch's; the CLI
  `fetch` then finds the cache; `configs/dare.py` as typed loads the same weights."""
  assert pretrained.main(["fetch", "--arch=resnet50"]) == 0
  out = capsys.readouterr()
  raw, converted = pretrained.cached_paths("resnet50")
  assert out.out.startswith(f"resnet50: {converted}") and "downloading http://127.0.0.1" in out.err
  assert os.path.isfile(raw) and download.sha256_of(raw).startswith(served["prefix"])
  assert _loadable_files(tmp_path / "cache") == [
      f"imagenet/downloads/{served['name']}", f"imagenet/{served['name'][:-4]}.npz"]
  # Second use: the cached conversion, no network (the server logs nothing we rely on,
  # so point the entry at a dead URL to prove it).
  dead = pretrained.Source(registry.filename, "http://127.0.0.1:9/x", registry.sha256_prefix, "")
  pretrained.IMAGENET["resnet50"] = dead
  assert pretrained.resolve("imagenet", "resnet50") == converted

  model = BACKBONES["resnet50"]()
  variables = pretrained.load_pretrained(abstract_variables(model), converted, "resnet50")
  x = np.random.default_rng(0).normal(size=(1, H, W, 3)).astype(np.float32)
  ours = model.apply(variables, jnp.asarray(x))
  theirs = torch_stages(served["torch"], served["ref"], x)
  for s, (a, b) in enumerate(zip(ours, theirs), start=1):
    assert a.shape == b.shape and rel_err(a, b) < 1e-4, (s, rel_err(a, b))

  # `python -m reid_jax.train --config=configs/dare.py`: the typed config's state.
  from configs import dare
  from reid_jax.methods.dare import train as dare_train
  cfg = dare.get_config()
  assert (cfg.model.backbone, cfg.model.pretrained) == ("resnet50", "imagenet")
  assert pretrained.announce(cfg.model) is None
  cfg.input.height, cfg.input.width = H, W
  state = dare_train.create_train_state(jax.random.key(0), cfg)
  want = dict(np.load(converted))
  got = pretrained._flatten({"params": state.params["backbone"],
                             "batch_stats": state.batch_stats["backbone"]})
  assert set(got) == set(want) - {pretrained.ARCH_KEY}
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)


def test_wrong_hash_is_refused_and_not_cached(served, registry, tmp_path, monkeypatch):
  corrupt = served["root"] / f"bad-{served['name']}"
  data = bytearray((served["root"] / served["name"]).read_bytes())
  data[len(data) // 2] ^= 0xFF
  corrupt.write_bytes(bytes(data))
  monkeypatch.setitem(pretrained.IMAGENET, "resnet50", pretrained.Source(
      registry.filename, served["server"].url(corrupt.name), registry.sha256_prefix, ""))
  with pytest.raises(pretrained.PretrainedError,
                     match=rf"SHA-256 [0-9a-f]{{16}}\.\.\., expected a hash starting {registry.sha256_prefix}; nothing was kept"):
    pretrained.fetch("resnet50")
  cache = tmp_path / "cache"
  assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
  # A wrong file put into the cache by hand is refused too, and kept for the user to see.
  raw, _ = pretrained.cached_paths("resnet50")
  os.makedirs(os.path.dirname(raw), exist_ok=True)
  Path(raw).write_bytes(bytes(data))
  with pytest.raises(pretrained.PretrainedError, match="not the published .*delete it"):
    pretrained.fetch("resnet50")
  assert _loadable_files(cache) == [f"imagenet/downloads/{served['name']}"]


def test_killed_download_leaves_nothing_that_loads(served, registry, tmp_path):
  """SIGKILL mid-download (a server trickling 64 KiB per 50 ms): only a `.partial`
  file remains; the next fetch downloads again and succeeds."""
  _Handler.slow.add(served["name"])
  try:
    code = ("import sys; sys.path.insert(0, 'tests'); from reid_jax import pretrained; "
            f"pretrained.IMAGENET['resnet50'] = pretrained.Source(*{tuple(vars(registry).values())!r}); "
            "pretrained.fetch('resnet50')")
    env = {**os.environ, "REID_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and not any(p.stat().st_size > 1 << 20 for p in partial):
      time.sleep(0.1)
      partial = list((tmp_path / "cache").rglob("*.partial.*"))
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert partial, "the download never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    _Handler.slow.discard(served["name"])
  assert _loadable_files(tmp_path / "cache") == []
  path = pretrained.fetch("resnet50", progress=False)
  assert pretrained.load_backbone_arrays(path, "resnet50")


def test_truncated_transfer_is_not_kept(tmp_path):
  """A server that closes early (Content-Length not reached) leaves no file."""
  class Short(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):
      self.send_response(200)
      self.send_header("Content-Length", "1000")
      self.end_headers()
      self.wfile.write(b"x" * 10)

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    dest = tmp_path / "f.pth"
    with pytest.raises(download.DownloadError, match="after 10 of 1000 bytes"):
      download.fetch(f"http://127.0.0.1:{httpd.server_address[1]}/f", str(dest), "", progress=False)
    assert list(tmp_path.iterdir()) == []
  finally:
    httpd.shutdown()
    httpd.server_close()


def test_offline_cli_is_one_line_and_trains_nothing(tmp_path, monkeypatch):
  """`python -m reid_jax.train --config=configs/dare.py` with the mirror unreachable:
  one line naming the URL, the file, where to put it and the convert command."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  port = httpd.server_address[1]
  httpd.server_close()  # a port nothing listens on
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  env = {**os.environ, "REID_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
         "REID_JAX_WEIGHTS_MIRROR": f"http://127.0.0.1:{port}/models", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-m", "reid_jax.train", "--config=configs/dare.py",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  monkeypatch.setenv("REID_JAX_CACHE", str(cache))
  raw, converted = pretrained.cached_paths("resnet50")
  assert last.startswith(f"error: cannot download http://127.0.0.1:{port}/models/resnet50-0676ba61.pth (")
  assert f"get https://download.pytorch.org/models/resnet50-0676ba61.pth and put it at {raw}" in last
  assert (f"python -m reid_jax.pretrained convert --arch=resnet50 --input=resnet50-0676ba61.pth "
          f"--output={converted}") in last
  assert "Traceback" not in proc.stderr
  assert not workdir.exists() or not any(workdir.iterdir())
  assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_pretrained_settings_warn_and_fail_in_one_line(tmp_path, monkeypatch):
  """"" warns (random init unannounced), "none" is silent, a bad path or an arch
  without ImageNet weights fails before any work."""
  import ml_collections
  m = ml_collections.ConfigDict({"backbone": "resnet50", "pretrained": ""})
  warning = pretrained.announce(m)
  assert "random initialisation" in warning and "=none to silence" in warning
  m.pretrained = "none"
  assert pretrained.announce(m) is None and pretrained.resolve("none", "resnet50") is None
  m.pretrained = str(tmp_path / "absent.npz")
  with pytest.raises(pretrained.PretrainedError, match="absent.npz'?: no such file"):
    pretrained.announce(m)
  m.backbone, m.pretrained = "resnet_small", "imagenet"
  with pytest.raises(pretrained.PretrainedError, match="no ImageNet weights exist for backbone 'resnet_small'.*pretrained=none"):
    pretrained.announce(m)
  # MobileNetV2 (no download link): the cache, else ../shared/pretrained, else one line.
  monkeypatch.setenv("REID_JAX_CACHE", str(tmp_path / "cache"))
  shared = tmp_path / "shared"
  monkeypatch.setattr(pretrained, "SHARED_DIR", str(shared))
  with pytest.raises(pretrained.PretrainedError, match="no mobilenetv2 ImageNet weights found: get "
                     "mobilenetv2_1.0_imagenet_gluon.npz and put it at .*cache/imagenet/downloads/"):
    pretrained.fetch("mobilenetv2")
  shared.mkdir()
  (shared / "mobilenetv2_1.0_imagenet_gluon.npz").write_bytes(b"")
  assert pretrained.fetch("mobilenetv2") == str(shared / "mobilenetv2_1.0_imagenet_gluon.npz")


def test_every_imagenet_config_defaults_to_imagenet():
  """Paper configs start from ImageNet weights; the synthetic ones say "none"."""
  from configs import apr, dare, done_right, ide, pcb, trinet, verif_ident
  variants = {dare: ("", "mobilenetv2", "densenet201", "mobilenetv2,market_cpu"),
              trinet: ("", "mobilenetv2", "resnet18", "resnet34", "resnet101", "stages2"),
              ide: ("", "mobilenetv2", "market_cpu"), verif_ident: ("", "mobilenetv2"),
              pcb: ("", "mobilenetv2", "rpp"), apr: ("", "mobilenetv2"),
              done_right: ("", "mobilenetv2", "resnet50", "mobilenetv2,market_cpu")}
  for module, names in variants.items():
    for v in names:
      m = module.get_config(v or None).model
      assert m.pretrained == "imagenet" and m.backbone in pretrained.IMAGENET, (module, v)
    for v in ("synthetic", "mobilenetv2,synthetic"):
      assert module.get_config(v).model.pretrained == "none", (module, v)


def test_resume_ignores_the_initial_weights_setting(tmp_path):
  """A checkpoint replaces the initial weights: a resumed run may name them differently
  (an old workdir saved with a weights path, resumed with "imagenet"), but not change
  the model."""
  from configs import dare
  cfg = dare.get_config("synthetic")
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  saved = json.loads(cfg.to_json())
  saved["model"]["pretrained"] = "/old/place/resnet50.npz"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  experiment.check_workdir_config(cfg, str(tmp_path))
  cfg.model.embed_dim += 1
  with pytest.raises(ValueError, match="different config.model"):
    experiment.check_workdir_config(cfg, str(tmp_path))


def test_restricted_reader_equals_torch_load_and_runs_no_code(tmp_path):
  """Zip and legacy torch files (strided views, fp16, bf16, int64) read as torch reads
  them; a pickle that would call a function is refused before anything runs."""
  torch = pytest.importorskip("torch")
  state = collections.OrderedDict(
      w=torch.randn(4, 3, 3, 3), t=torch.arange(12.0).reshape(3, 4).t(),
      h=torch.randn(5).half(), b=torch.randn(2, 2).bfloat16(), n=torch.tensor(7),
      v=torch.arange(10.0)[2:8])
  for legacy in (False, True):
    path = tmp_path / f"s{legacy}.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = torch_state.load(str(path))
    ref = torch.load(path, weights_only=True)
    assert list(got) == list(ref)
    for k, v in ref.items():
      want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
      assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
      np.testing.assert_array_equal(got[k], want, err_msg=f"{k} legacy={legacy}")
  marker = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  evil = tmp_path / "evil.pth"
  with open(evil, "wb") as f:
    for obj in (torch_state.LEGACY_MAGIC, 1001, {}):
      pickle.dump(obj, f)
    pickle.dump({"x": Evil()}, f)
    pickle.dump([], f)
  with pytest.raises(torch_state.UnsupportedPickle, match="refuses to unpickle posix.mkdir"):
    torch_state.load(str(evil))
  assert not marker.exists()
