"""Re-ID done right (Almazan, Gajic, Murray, Larlus 2018): global max pooling, a
classification-then-ranking curriculum, offline hard-triplet mining, and triplets of
their own image sizes processed one at a time with gradient accumulation."""

from reid_jax.methods.done_right.train import (embed_query_gallery, evaluate_variables,
                                               load_image, load_variables, make_embedder,
                                               matching_functions, stages,
                                               train_and_evaluate)

from reid_jax.methods.done_right.inference import checkpoint_dir, input_size, run_embedder

__all__ = ["checkpoint_dir", "embed_query_gallery", "evaluate_variables", "input_size",
           "load_image", "load_variables", "make_embedder", "matching_functions", "run_embedder",
           "stages", "train_and_evaluate"]
