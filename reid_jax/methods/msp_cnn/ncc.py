"""The normalized cross-correlation (NCC) similarity loss of MSP-CNN (Chen et al.,
"Multi-level Similarity Perception Network for Person Re-identification", ACM MM 2017),
built on the NCC layer of Subramaniam et al. (NIPS 2016, "Deep neural networks with
inexact matching for person re-identification").

For each `patch`x`patch` window of one channel of the first image's Pool1 map, the most
similar window of the same channel of the second image's map is searched within rows
i-row_radius..i+row_radius (offsets that leave the map are excluded, not zero-padded)
and the whole width:

  NCC(P, Q) = sum((P - mean_P) (Q - mean_Q)) / ((N - 1) (std_P + eps) (std_Q + eps))
  r[b, i, j, c] = max over the search area of NCC        (std: sample std, N = patch^2)
  s[b] = mean of r over (i, j, c)
  loss = mean_b  same * (1 - s) + (1 - same) * max(0, s - margin)

How it is computed:
  * Each window is normalised once, z = (P - mean_P) / (sqrt(N - 1) (std_P + eps)), so
    NCC(P, Q) = z_P . z_Q, a dot product over the N values. Windows are taken from the
    map by one gather (index arithmetic, no Python loop over positions).
  * Search (no gradient): for each row offset d, one batched matmul per (row i,
    channel c) compares every column j of row i of `fa` with every column j' of row
    i + d of `fb`, [W', N] x [N, W']; max and argmax over j', then the best offset
    among those with row i + d inside the map. Only the argmax (d, j') is kept.
  * Response (differentiable): r = NCC(P, Q*) from the definition, for the matched
    window Q* gathered from `fb`'s map. Its gradient is the gradient of the max (at a
    tie, that of one maximiser: the nearest row, then the leftmost column), without
    keeping the [H', C, W', W'] similarities of any offset for the backward pass.
  * Pairs are processed `pair_chunk` at a time (`jax.lax.map`, vectorised within a
    chunk), which bounds the memory to one chunk's similarities and patches; the
    backward pass recomputes a chunk's patches rather than storing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Variances below this are clamped before the sqrt: a constant window (std 0, e.g. an
# all-zero region of a ReLU'd Pool1 map) then has a finite std gradient (zero) instead
# of 0 * inf = NaN. Its std becomes 1e-6 instead of ~0, negligible against eps = 0.01.
_MIN_VAR = 1e-12


def check_map_size(height: int, width: int, patch: int, what: str, *,
                   patch_setting: str = "config.loss.ncc_patch") -> None:
  """Raises a one-line ValueError naming `what` (the setting that fixes the map size) if
  a `height`x`width` map has no `patch`x`patch` window."""
  if patch < 2:
    raise ValueError(f"the NCC patch is {patch}x{patch}, but the sample std needs at "
                     f"least 2 values; set {patch_setting} >= 2")
  if height < patch or width < patch:
    raise ValueError(f"{what} give a Pool1 map of {height}x{width}, smaller than the "
                     f"{patch}x{patch} NCC patch ({patch_setting})")


def _window_index(corner: jnp.ndarray, width: int, channels: int, patch: int
                  ) -> jnp.ndarray:
  """Flat indices [..., N] into a [H, W, C] map of the N values of the windows whose
  (0, 0) value has flat index `corner` [...]; value u * patch + v is window row u,
  column v."""
  u, v = jnp.divmod(jnp.arange(patch * patch), patch)
  return corner[..., None] + (u * width + v) * channels


def extract_patches(f: jnp.ndarray, patch: int) -> jnp.ndarray:
  """[..., H, W, C] -> [..., H', C, W', N]: every valid `patch`x`patch` window of each
  channel (H' = H - patch + 1, W' = W - patch + 1, N = patch^2; value index
  u * patch + v for the window's row u and column v), by one gather."""
  h, w, c = f.shape[-3:]
  i = jnp.arange(h - patch + 1)[:, None, None]
  j = jnp.arange(w - patch + 1)[None, None, :]
  corner = (i * w + j) * c + jnp.arange(c)[None, :, None]  # [H', C, W']
  flat = f.reshape(f.shape[:-3] + (h * w * c,))
  return flat.at[..., _window_index(corner, w, c, patch)].get(mode="promise_in_bounds")


def patch_stats(patches: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(mean, sample std) over the last axis (the N values of each window), the variance
  in two passes. Variances under 1e-12 are clamped (std 1e-6), so that constant
  windows have finite gradients."""
  n = patches.shape[-1]
  mean = jnp.mean(patches, axis=-1)
  var = jnp.sum(jnp.square(patches - mean[..., None]), axis=-1) / (n - 1)
  return mean, jnp.sqrt(jnp.where(var > _MIN_VAR, var, _MIN_VAR))


def normalized_patches(f: jnp.ndarray, *, patch: int = 5, eps: float = 0.01
                       ) -> jnp.ndarray:
  """[..., H, W, C] -> z [..., H', C, W', N], z = (P - mean_P) / (sqrt(N - 1) (std_P +
  eps)), so that NCC(P, Q) = z_P . z_Q."""
  p = extract_patches(f.astype(jnp.float32), patch)
  mean, std = patch_stats(p)
  scale = jnp.sqrt(p.shape[-1] - 1.0) * (std + eps)
  return (p - mean[..., None]) / scale[..., None]


def _check_maps(fa: jnp.ndarray, fb: jnp.ndarray, patch: int, row_radius: int) -> None:
  if fa.ndim != 4 or fa.shape != fb.shape:
    raise ValueError(f"the NCC loss needs two [B, H, W, C] maps of one shape; got "
                     f"{fa.shape} and {fb.shape}")
  if row_radius < 0:
    raise ValueError(f"the NCC row radius is {row_radius}; set config.loss.ncc_row_radius "
                     ">= 0")
  check_map_size(fa.shape[1], fa.shape[2], patch, "the feature maps passed to the NCC loss")


def _pair_search(fa: jnp.ndarray, fb: jnp.ndarray, patch: int, row_radius: int,
                 eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(row offset d, column k) [H', C, W'] of the best match in fb [H, W, C] of each
  window of fa [H, W, C] (one pair). Ties go to the nearest row (d = 0, -1, 1, -2, ...),
  then to the smallest k.

  fb's windows get row_radius zero rows on either side, so that each offset compares
  all H' rows of fa with one slice; an offset whose row i + d is outside the map never
  wins. The first offset, d = 0, is always inside, so the indices always are too.
  """
  za = normalized_patches(fa, patch=patch, eps=eps)  # [H', C, W', N]
  zb = jnp.swapaxes(normalized_patches(fb, patch=patch, eps=eps), -1, -2)  # [H', C, N, W']
  hp = za.shape[0]
  zbp = jnp.pad(zb, ((row_radius, row_radius), (0, 0), (0, 0), (0, 0)))
  best = best_d = best_k = None
  for d in sorted(range(-row_radius, row_radius + 1), key=lambda d: (abs(d), d)):
    rows = zb if d == 0 else zbp[row_radius + d:row_radius + d + hp]
    sim = jnp.einsum("icjn,icnk->icjk", za, rows)  # [H', C, W', W']
    k = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    m = jnp.max(sim, axis=-1)
    if best is None:
      best, best_d, best_k = m, jnp.zeros(m.shape, jnp.int32), k
      continue
    inside = (jnp.arange(hp) + d >= 0) & (jnp.arange(hp) + d < hp)
    better = inside[:, None, None] & (m > best)  # offsets outside the map never win
    best = jnp.where(better, m, best)
    best_d = jnp.where(better, d, best_d)
    best_k = jnp.where(better, k, best_k)
  return best_d, best_k


def _pair_response(fa: jnp.ndarray, fb: jnp.ndarray, d: jnp.ndarray, k: jnp.ndarray,
                   patch: int, eps: float) -> jnp.ndarray:
  """r [H', W', C] of one pair: the NCC, from its definition, of each window of
  fa [H, W, C] with its matched window (row i + d, column k) of fb, gathered from fb."""
  p = extract_patches(fa, patch)  # [H', C, W', N]
  hp, c = p.shape[0], p.shape[1]
  w = fb.shape[1]
  corner = ((jnp.arange(hp)[:, None, None] + d) * w + k) * c + jnp.arange(c)[None, :, None]
  q = fb.reshape(-1).at[_window_index(corner, w, c, patch)].get(mode="promise_in_bounds")
  mean_p, std_p = patch_stats(p)
  mean_q, std_q = patch_stats(q)
  num = jnp.sum((p - mean_p[..., None]) * (q - mean_q[..., None]), axis=-1)
  r = num / ((p.shape[-1] - 1.0) * (std_p + eps) * (std_q + eps))
  return jnp.swapaxes(r, -1, -2)


def best_match_ncc(fa: jnp.ndarray, fb: jnp.ndarray, *, patch: int = 5,
                   row_radius: int = 2, eps: float = 0.01, pair_chunk: int = 1
                   ) -> jnp.ndarray:
  """r [B, H', W', C]: the largest NCC of each window of `fa` with the windows of `fb`
  (same channel) at rows i-row_radius..i+row_radius inside the map and any column.

  `pair_chunk` pairs are processed at once: memory grows with it (about 8 MiB a pair
  at 72x28x32), parallelism too (worth raising on accelerators).
  """
  _check_maps(fa, fb, patch, row_radius)
  fa, fb = fa.astype(jnp.float32), fb.astype(jnp.float32)
  chunk = max(1, min(int(pair_chunk), fa.shape[0]))
  d, k = jax.lax.map(lambda x: _pair_search(*x, patch, row_radius, eps),
                     (jax.lax.stop_gradient(fa), jax.lax.stop_gradient(fb)),
                     batch_size=chunk)
  response = jax.checkpoint(lambda x: _pair_response(*x, patch, eps))
  return jax.lax.map(response, (fa, fb, d, k), batch_size=chunk)


def pair_scores(fa: jnp.ndarray, fb: jnp.ndarray, *, patch: int = 5, row_radius: int = 2,
                eps: float = 0.01, pair_chunk: int = 1) -> jnp.ndarray:
  """s [B]: the mean best-match NCC of each pair over its windows and channels."""
  r = best_match_ncc(fa, fb, patch=patch, row_radius=row_radius, eps=eps,
                     pair_chunk=pair_chunk)
  return jnp.mean(r, axis=(1, 2, 3))


def ncc_loss(fa: jnp.ndarray, fb: jnp.ndarray, same: jnp.ndarray, *, patch: int = 5,
             row_radius: int = 2, eps: float = 0.01, margin: float = 0.0,
             pair_chunk: int = 1) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Mean over the B pairs of same * (1 - s) + (1 - same) * max(0, s - margin).

  Args:
    fa, fb: [B, H, W, C] Pool1 maps of the two images of each pair.
    same: [B] 1 for a positive pair, 0 for a negative one.
    pair_chunk: pairs processed at once (memory vs parallelism; see best_match_ncc).

  Returns:
    (loss, metrics): score_pos / score_neg, the mean s of the positive / negative pairs
    (0 when there are none), num_pos / num_neg their counts, and active_neg, the
    fraction of negative pairs above the margin (0 without negatives).
  """
  s = pair_scores(fa, fb, patch=patch, row_radius=row_radius, eps=eps, pair_chunk=pair_chunk)
  pos = jnp.asarray(same).astype(jnp.float32)
  neg = 1.0 - pos
  loss = jnp.mean(pos * (1.0 - s) + neg * jnp.maximum(s - margin, 0.0))
  num_pos, num_neg = jnp.sum(pos), jnp.sum(neg)
  metrics = {
      "score_pos": jnp.sum(pos * s) / jnp.maximum(num_pos, 1.0),
      "score_neg": jnp.sum(neg * s) / jnp.maximum(num_neg, 1.0),
      "num_pos": num_pos,
      "num_neg": num_neg,
      "active_neg": jnp.sum(neg * (s > margin)) / jnp.maximum(num_neg, 1.0),
  }
  return loss, metrics
