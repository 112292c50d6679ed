"""Accuracy-vs-MACs plots for DaRe under resource limits (paper Figures 5 and 6).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it
works headless and does not disturb other matplotlib users in the process.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _as_percent(values: Sequence[float]) -> np.ndarray:
  """Scales fractions to percent; values already above 1 are taken as percent."""
  v = np.asarray(values, np.float64)
  return v * 100.0 if v.size and np.nanmax(v) <= 1.0 else v


def _check(curves: Mapping[str, Sequence[Mapping]], keys: Sequence[str]) -> None:
  if not curves:
    raise ValueError("curves is empty; pass name -> list of curve entries")
  for name, c in curves.items():
    if not c:
      raise ValueError(f"curve '{name}' is empty; drop it or compute its entries")
    missing = [k for k in keys if k not in c[0]]
    if missing:
      raise ValueError(f"curve '{name}' entries lack {missing}; pass the output of "
                       "anytime_curve/stream_curves")


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def plot_anytime(curves: Mapping[str, Sequence[Mapping]], path: str,
                 metrics: Sequence[str] = ("rank1", "mAP"),
                 title: str = "Anytime re-ID") -> str:
  """Step plots of accuracy vs per-query budget, one line per method (cf. Figure 5).

  `curves`: name -> output of `anytime_curve`/`ensemble_anytime_curve`. Each line holds
  its value from one evaluated budget to the next and is extended to the largest
  budget of any method. Writes a PNG to `path` and returns it.
  """
  _check(curves, ("budget",) + tuple(metrics))
  x_max = max(e["budget"] for c in curves.values() for e in c)
  fig = Figure(figsize=(5.0 * len(metrics), 4.0))
  for j, metric in enumerate(metrics):
    ax = fig.add_subplot(1, len(metrics), j + 1)
    for name, c in curves.items():
      c = sorted(c, key=lambda e: e["budget"])
      x = [e["budget"] for e in c] + [x_max]
      y = _as_percent([e[metric] for e in c] + [c[-1][metric]])
      ax.plot(x, y, drawstyle="steps-post", linewidth=2, label=name)
      ax.scatter(x[:-1], y[:-1], s=12)
    ax.set_xlabel("Budget per query (MUL-ADDs)")
    ax.set_ylabel(("CMC rank-1" if metric == "rank1" else metric) + " (%)")
    ax.grid(linestyle="dotted")
    ax.legend(loc="lower right")
  fig.suptitle(title)
  return _save(fig, path)


def plot_stream(curves: Mapping[str, Sequence[Mapping]], path: str,
                points: Mapping[str, tuple[float, float]] | None = None,
                title: str = "Budgeted stream re-ID") -> str:
  """Rank-1 vs realised average MACs per query, one line per rule (cf. Figure 6).

  `curves`: name -> output of `stream_curves` for one rule. `points`: optional
  single-model references, name -> (MACs, rank-1). Writes a PNG and returns `path`.
  """
  _check(curves, ("avg_cost", "rank1"))
  fig = Figure(figsize=(6.0, 4.5))
  ax = fig.add_subplot(1, 1, 1)
  all_r1 = [e["rank1"] for c in curves.values() for e in c]
  all_r1 += [v for _, v in (points or {}).values()]
  scale = 100.0 if max(all_r1) <= 1.0 else 1.0
  for name, c in curves.items():
    c = sorted(c, key=lambda e: e["avg_cost"])
    ax.plot([e["avg_cost"] for e in c], [e["rank1"] * scale for e in c],
            linewidth=2, marker=".", label=name)
  for j, (name, (macs, r1)) in enumerate((points or {}).items()):
    ax.scatter([macs], [r1 * scale], marker="*", s=120, label=name, zorder=3,
               color=f"C{(len(curves) + j) % 10}")
  ax.set_xlabel("Average budget per query (MUL-ADDs)")
  ax.set_ylabel("CMC rank-1 (%)")
  ax.grid(linestyle="dotted")
  ax.legend(loc="lower right")
  ax.set_title(title)
  return _save(fig, path)
