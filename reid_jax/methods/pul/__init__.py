"""Progressive unsupervised learning (Fan et al., TOMM 2018): IDE on a labelled source,
then rounds of k-means on the unlabelled target + fine-tuning on the reliable images
(`config.method` pul)."""

from reid_jax.methods.pul.train import (embed_query_gallery, evaluate_variables,
                                        load_variables, make_embedder, stages,
                                        train_and_evaluate)

from reid_jax.methods.pul.inference import checkpoint_dir, run_embedder

__all__ = ["checkpoint_dir", "embed_query_gallery", "evaluate_variables", "load_variables",
           "make_embedder", "run_embedder", "stages", "train_and_evaluate"]
