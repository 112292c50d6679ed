"""DaRe (Deep Anytime Re-ID, Wang et al. CVPR 2018) and its single-exit TriNet baseline.

`config.method` "dare" or "trinet"; `train` holds the training and embedding,
`anytime` the §4 budget curves and the sequential-ensemble baseline, `budget` the
budgeted-stream algorithms on embeddings.
"""

from reid_jax.methods.dare.train import (embed_query_gallery, evaluate_variables,
                                         load_variables, make_embedder, stages,
    train_and_evaluate)

from reid_jax.methods.dare.inference import checkpoint_dir, run_embedder

__all__ = ["checkpoint_dir", "embed_query_gallery", "evaluate_variables", "load_variables",
           "make_embedder", "run_embedder", "stages", "train_and_evaluate"]
