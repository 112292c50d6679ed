"""Shared pieces of every re-ID tfds builder: record features, image encoding, errors."""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


class ReidDataError(ValueError):
  """A one-line, user-facing data error that names the file or setting and the fix."""


def reid_features(video: bool = False) -> tfds.features.FeaturesDict:
  """Record schema shared by all re-ID datasets.

  `person_id` keeps the dataset's own id (Market/Duke: 0 = distractor, -1 = junk);
  `camera_id` is 0-based. Video datasets add `tracklet_id` and `frame_index`.
  Images are stored as the encoded bytes we are given (no TensorFlow needed).
  """
  feats = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "person_id": np.int32,
      "camera_id": np.int32,
      "file_name": tfds.features.Text(),
  }
  if video:
    feats["tracklet_id"] = np.int32
    feats["frame_index"] = np.int32
  return tfds.features.FeaturesDict(feats)


def encode_png(image: np.ndarray) -> io.BytesIO:
  """PNG-encodes a uint8 HxWx3 array (lossless) as a file object tfds accepts without TF."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  buf.seek(0)
  return buf
