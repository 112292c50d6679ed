"""Losses shared by the re-ID methods."""

from reid_jax.losses.triplet import (batch_all_triplet_loss, batch_hard_triplet_loss,
                                     pairwise_distances, triplet_loss)

__all__ = ["batch_all_triplet_loss", "batch_hard_triplet_loss", "pairwise_distances",
           "triplet_loss"]
