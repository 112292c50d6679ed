"""The classification family of the Zheng tutorial: IDE, PCB (+ RPP), verification +
identification, APR (`config.method` ide, pcb, verif_ident, apr)."""

from reid_jax.methods.classification.train import (embed_query_gallery, evaluate_variables,
                                                   load_variables, make_embedder, stages,
                                                   train_and_evaluate)

from reid_jax.methods.classification.inference import checkpoint_dir, run_embedder

__all__ = ["checkpoint_dir", "embed_query_gallery", "evaluate_variables", "load_variables",
           "make_embedder", "run_embedder", "stages", "train_and_evaluate"]
