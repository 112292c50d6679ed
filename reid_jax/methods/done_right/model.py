"""The Re-ID done right network (Almazan et al. 2018, arXiv 1801.05339): any backbone of
`reid_jax.models`, global max pooling of its last map, a fully connected layer to the
embedding, l2 normalisation.

With `num_classes > 0` (the classification stage) the model adds a softmax classifier on
the pooled feature and has no FC: stage 2 starts from stage 1's backbone and trains a
fresh FC with the ranking loss. `feature_map` and `head` split the forward pass at the
last convolutional map (for the matching-regions heat maps).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.models.layers import Dtype, l2_normalize

_classifier_init = nn.initializers.normal(0.001)  # as the classification family's IDE


class DoneRightModel(nn.Module):
  """Backbone -> GMP -> FC -> l2 (or -> classifier for the classification stage).

  Attributes:
    backbone: a backbone module returning its stage maps (NHWC); the last one is pooled.
    embed_dim: FC output size (2048 in the paper).
    num_classes: > 0 builds the classification stage (classifier on the pooled feature).
    classifier_bn: a BatchNorm between the pooled feature and the classifier (stage 1
      only; the ranking stage keeps the backbone and drops the classifier).
    dtype: compute dtype of the head (params float32).
    bn_axis_name: pmap axis of the classifier BatchNorm's statistics in training.
  """

  backbone: nn.Module
  embed_dim: int = 2048
  num_classes: int = 0
  classifier_bn: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def setup(self):
    if self.num_classes:
      if self.classifier_bn:  # PyTorch BatchNorm1d defaults (momentum 0.1, eps 1e-5)
        self.bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                               param_dtype=jnp.float32, axis_name=self.bn_axis_name,
                               use_fast_variance=False)
      self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                 kernel_init=_classifier_init,
                                 bias_init=nn.initializers.zeros)
    else:
      self.fc = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=jnp.float32)

  def feature_map(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """The backbone's last map [B, h, w, C]."""
    return self.backbone(x, train=train)[-1]

  def head(self, fmap: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    """Pooled feature, and the l2-normalised embedding or the logits."""
    pool = jnp.max(fmap.astype(jnp.float32), axis=(1, 2))  # global max pooling
    out = {"pool": pool}
    if self.num_classes:
      h = self.bn(pool, use_running_average=not train) if self.classifier_bn else pool
      out["logits"] = self.classifier(h).astype(jnp.float32)
    else:
      out["embedding"] = l2_normalize(self.fc(pool).astype(jnp.float32))
    return out

  def embed_from_map(self, fmap: jnp.ndarray) -> jnp.ndarray:
    """[B, h, w, C] -> the l2-normalised embedding [B, D] (stage-2 model)."""
    return self.head(fmap)["embedding"]

  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    return self.head(self.feature_map(x, train), train)
