"""The shared training core every method family runs on.

  state       TrainState (params, BatchNorm statistics, optimiser state)
  parallel    pmap axis, sharding, replicas, multi-host start
  checkpoint  orbax checkpoints of state + data-iterator position
  optim       optimisers by name (TriNet/DaRe Adam, SGD with step decay), parameter
              groups, gradient accumulation; learning rates read from the state
  loop        `fit`: steps from a start to a stop, with logging, checkpointing,
              periodic evaluation and exact resume; `stage_dir` for multi-stage methods
  embedding   embedding a split with any embedder, test-time augmentation
  evaluators  evaluation protocols by name, results table and file
  experiment  workdir config checks, evaluate-and-log, restoring a checkpoint
  writer      progress line, metrics.jsonl, TensorBoard

It knows nothing of any method: no sampler, loss or label field appears here, and it
imports nothing from `reid_jax.methods` or the CLI modules.
"""
