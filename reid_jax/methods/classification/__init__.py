"""The classification family of the Zheng tutorial: IDE, PCB (+ RPP), verification +
identification, APR (`config.method` ide, pcb, verif_ident, apr)."""

from reid_jax.methods.classification.train import (embed_query_gallery, evaluate_variables,
                                                   load_variables, make_embedder, stages,
                                                   train_and_evaluate)

__all__ = ["embed_query_gallery", "evaluate_variables", "load_variables", "make_embedder",
           "stages", "train_and_evaluate"]
