"""MSP-CNN (Chen et al., ACM MM 2017): a JSTL inception network trained from scratch on
Siamese pairs with softmax, a Euclidean loss on FC7 and normalized cross-correlation on
Pool1, in two stages."""

from reid_jax.methods.msp_cnn.train import (embed_query_gallery, evaluate_variables,
                                            load_variables, make_embedder, stages,
                                            train_and_evaluate)

__all__ = ["embed_query_gallery", "evaluate_variables", "load_variables", "make_embedder",
           "stages", "train_and_evaluate"]
