"""Re-ID done right (Almazan, Gajic, Murray, Larlus 2018): global max pooling, a
classification-then-ranking curriculum, offline hard-triplet mining, and triplets of
their own image sizes processed one at a time with gradient accumulation."""

from reid_jax.methods.done_right.train import (embed_query_gallery, evaluate_variables,
                                               load_image, load_variables, make_embedder,
                                               matching_functions, stages,
                                               train_and_evaluate)

__all__ = ["embed_query_gallery", "evaluate_variables", "load_image", "load_variables",
           "make_embedder", "matching_functions", "stages", "train_and_evaluate"]
