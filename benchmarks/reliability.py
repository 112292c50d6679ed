"""Fault cases a new user meets, run as the user would (the CLIs, in subprocesses), on the
tiny synthetic set with a tiny IDE network; prints a Markdown table: case, command,
message (the last stderr line), verdict (GOOD when exit status, message and what is on
disk are as the README's troubleshooting section says).

  python benchmarks/reliability.py [--scratch=/tmp/reid_reliability]

About 3-5 minutes on 2 CPU cores (each case starts JAX; the training cases compile a
tiny step). Each case gets its own workdir under --scratch (removed first).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TINY = ["--config.dataset.builder_config=tiny", "--config.input.height=32",
        "--config.input.width=16", "--config.input.worker_count=0", "--config.eval.tta=",
        "--config.model.width=8", "--config.model.bottleneck=16",
        "--config.input.batch_size=8", "--config.train.log_every=1",
        "--config.input.eval_batch_size=32", "--config.optimizer.decay_steps=4"]


def run(args: list[str], env_extra: dict | None = None) -> tuple[int, str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env_extra or {}))
  env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  r = subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=900)
  return r.returncode, r.stdout, r.stderr


def train(wd: str, data: str, *extra: str) -> list[str]:
  return ["reid_jax.train", "--config=configs/ide.py:synthetic", f"--workdir={wd}",
          f"--config.dataset.data_dir={data}", "--config.train.steps=4",
          "--config.train.checkpoint_every=2", *TINY, *extra]


def evaluate(wd: str, data: str, *extra: str) -> list[str]:
  return ["reid_jax.evaluate", "--config=configs/ide.py:synthetic", f"--workdir={wd}",
          f"--config.dataset.data_dir={data}", *TINY, *extra]


def last_line(text: str) -> str:
  lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip()]
  return lines[-1] if lines else ""


def one_line_error(rc: int, err: str, starts: str) -> bool:
  return rc == 1 and last_line(err).startswith(starts) and "Traceback" not in err


def steps_in(wd: str) -> list[int]:
  d = os.path.join(wd, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def cases(scratch: str, data: str):
  """Yields (case, command, message, good)."""
  short = lambda args: "python -m " + " ".join(a for a in args if a not in TINY
                                               and "data_dir" not in a)
  # 1. NaN learning rate.
  wd = os.path.join(scratch, "nan")
  cmd = train(wd, data, "--config.optimizer.lr=nan")
  rc, _, err = run(cmd)
  yield ("lr=nan: run stops, nothing non-finite saved", short(cmd), last_line(err),
         one_line_error(rc, err, "error: training diverged at step 1") and not steps_in(wd))
  # 2. checkpoint_every=0 saves the end.
  wd = os.path.join(scratch, "every0")
  cmd = train(wd, data, "--config.train.checkpoint_every=0", "--noeval_at_end")
  rc, out, err = run(cmd)
  yield ("checkpoint_every=0: only the final checkpoint", short(cmd),
         f"checkpoints: {steps_in(wd)}", rc == 0 and steps_in(wd) == [4])
  # 3. A failed first start leaves the workdir reusable.
  wd = os.path.join(scratch, "first_start")
  bad = train(wd, data, "--config.input.sampler=pk", "--config.input.P=400",
              "--config.input.K=2", "--config.loss.triplet_weight=1.0", "--noeval_at_end")
  rc1, _, err1 = run(bad)
  rc2, _, _ = run(train(wd, data, "--noeval_at_end"))
  yield ("first start fails (P > identities), corrected re-run", short(bad),
         last_line(err1), one_line_error(rc1, err1, "error: config.input.P=400")
         and rc2 == 0 and steps_in(wd) == [2, 4])
  # 4. Damaged newest checkpoint: resume from the one before.
  wd = os.path.join(scratch, "damaged")
  run(train(wd, data, "--noeval_at_end"))
  root = os.path.join(wd, "checkpoints", "4", "state")
  for dirpath, _, files in os.walk(root):  # the array data files (as a cut copy would)
    for name in files if "/d" in dirpath[len(root):] else ():
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(3)
  cmd = evaluate(wd, data, "--checkpoint=4")
  rc, _, err = run(cmd)
  yield ("evaluate --checkpoint=N on a damaged checkpoint", short(cmd), last_line(err),
         one_line_error(rc, err, "error: checkpoint 4 in"))
  cmd = train(wd, data, "--config.train.steps=6", "--noeval_at_end")
  rc, _, err = run(cmd)
  moved = [l for l in err.splitlines() if "is unreadable" in l]
  yield ("damaged newest checkpoint: training falls back", short(cmd),
         moved[0] if moved else last_line(err),
         rc == 0 and bool(moved) and steps_in(wd) == [2, 4, 6]
         and os.path.isdir(os.path.join(wd, "checkpoints.unreadable")))
  # 5./6. Bad settings before any work.
  for flag, starts in (("--config.train.steps=-5", "error: config.train.steps=-5"),
                       ("--config.eval.tta=bogus", "error: config.eval.tta='bogus'"),
                       ("--config.input.sampler=bogus", "error: config.input.sampler="),
                       ("--config.train.nan_policy=bogus", "error: config.train.nan_policy")):
    wd = os.path.join(scratch, "bad_setting")
    cmd = train(wd, data, flag)
    rc, _, err = run(cmd)
    yield (f"bad setting {flag.split('=')[0][2:]}", short(cmd), last_line(err),
           one_line_error(rc, err, starts) and not os.path.exists(wd))
  # 8. Damaged prepared dataset.
  broken = os.path.join(scratch, "broken_data")
  shutil.copytree(data, broken)
  shard = sorted(glob.glob(os.path.join(broken, "synthetic_reid", "tiny", "*",
                                        "*train.array_record*")))[0]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  wd = os.path.join(scratch, "broken_data_run")
  cmd = train(wd, broken)
  cmd[3] = f"--config.dataset.data_dir={broken}"
  rc, _, err = run(cmd)
  yield ("damaged prepared dataset (array_record cut)", short(cmd), last_line(err),
         one_line_error(rc, err, "error: ") and "prepare" in last_line(err))
  # 10. Queries without a gallery match are counted.
  wd = os.path.join(scratch, "every0")
  cmd = evaluate(wd, data)
  rc, out, err = run(cmd)
  res = json.load(open(os.path.join(wd, "evaluate_results.json"))) if rc == 0 else {}
  yield ("evaluation reports scored / skipped queries", short(cmd),
         f"num_queries={res.get('num_queries')} num_valid_queries="
         f"{res.get('num_valid_queries')}",
         rc == 0 and "num_valid_queries" in res and "queries" in out)
  # 11. Read-only commands create nothing; evaluate keeps training's results.
  wd = os.path.join(scratch, "no_such_workdir", "typo")
  cmd = evaluate(wd, data)
  rc, _, err = run(cmd)
  yield ("evaluate on a mistyped workdir", short(cmd), last_line(err),
         one_line_error(rc, err, "error: no checkpoint in")
         and not os.path.exists(os.path.dirname(wd)))
  wd = os.path.join(scratch, "keep_results")
  run(train(wd, data))
  before = open(os.path.join(wd, "eval_results.json")).read()
  cmd = evaluate(wd, data)
  rc, out, _ = run(cmd)
  yield ("evaluate never overwrites training's eval_results.json", short(cmd),
         last_line(out), rc == 0 and before == open(os.path.join(wd, "eval_results.json")).read()
         and os.path.isfile(os.path.join(wd, "evaluate_results.json")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scratch", default="/tmp/reid_reliability")
  args = parser.parse_args()
  shutil.rmtree(args.scratch, ignore_errors=True)
  os.makedirs(args.scratch)
  data = os.path.join(args.scratch, "tfds")
  rc, _, err = run(["reid_jax.prepare", "synthetic_reid/tiny", f"--data_dir={data}"])
  assert rc == 0, err
  start = time.time()
  rows = list(cases(args.scratch, data))
  print("| case | command | message / what is on disk | verdict |")
  print("|---|---|---|---|")
  for case, cmd, message, good in rows:
    print(f"| {case} | `{cmd}` | `{message.replace('|', '/')}` | "
          f"{'GOOD' if good else 'BAD'} |")
  print(f"\n{sum(g for *_, g in rows)}/{len(rows)} GOOD in {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
