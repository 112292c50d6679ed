"""Checked, atomic downloads: the file appears under its final name only when complete
and its SHA-256 matches; a killed or corrupted download leaves nothing that loads."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request

import tqdm


class DownloadError(OSError):
  """The file could not be fetched (offline, blocked, HTTP error): one line."""


class ChecksumError(ValueError):
  """The fetched bytes do not have the expected SHA-256 prefix."""


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
  """Hex SHA-256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def fetch(url: str, dest: str, sha256_prefix: str, timeout_s: float = 30.0,
          progress: bool = True) -> str:
  """Downloads `url` to `dest` (atomically, verified against `sha256_prefix`).

  The bytes stream to `dest.partial.<pid>` while being hashed; only a complete file
  with the right hash is renamed to `dest`. On a hash mismatch the partial file is
  deleted and `ChecksumError` raised; network failures raise `DownloadError`.
  """
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  tmp = f"{dest}.partial.{os.getpid()}"
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0) or None
      print(f"downloading {url} -> {dest}"
            + (f" ({total / 2**20:.1f} MiB)" if total else ""), file=sys.stderr, flush=True)
      with tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(dest), disable=not progress or None,
                     file=sys.stderr, leave=False) as bar:
        for block in iter(lambda: response.read(1 << 20), b""):
          f.write(block)
          digest.update(block)
          bar.update(len(block))
      if total is not None and f.tell() != total:
        raise DownloadError(f"{url}: connection closed after {f.tell()} of {total} bytes")
  except (urllib.error.URLError, OSError) as e:
    _remove(tmp)
    if isinstance(e, DownloadError):
      raise
    reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
    raise DownloadError(f"cannot download {url} ({reason})") from None
  except BaseException:
    _remove(tmp)
    raise
  got = digest.hexdigest()
  if not got.startswith(sha256_prefix):
    _remove(tmp)
    raise ChecksumError(f"{url}: downloaded bytes have SHA-256 {got[:16]}..., expected a "
                        f"hash starting {sha256_prefix}; nothing was kept")
  os.replace(tmp, dest)
  return dest


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
