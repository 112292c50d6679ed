"""MSP-CNN (Chen et al., ACM MM 2017): a JSTL inception network trained from scratch on
Siamese pairs with softmax, a Euclidean loss on FC7 and normalized cross-correlation on
Pool1, in two stages."""

from reid_jax.methods.msp_cnn.train import (embed_query_gallery, evaluate_variables,
                                            load_variables, make_embedder, stages,
                                            train_and_evaluate)

from reid_jax.methods.msp_cnn.inference import checkpoint_dir, run_embedder

__all__ = ["checkpoint_dir", "embed_query_gallery", "evaluate_variables", "load_variables",
           "make_embedder", "run_embedder", "stages", "train_and_evaluate"]
