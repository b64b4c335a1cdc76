"""`GroupLasso`: a regularizer that drives whole blocks of a weight to zero."""

import numbers

import tensorflow as tf
import tf_keras

from tf_blocksparse.pruning import block_masks


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class GroupLasso(tf_keras.regularizers.Regularizer):
  """strength × Σ over blocks of the block's L2 norm.

  The weight is seen as a matrix `[K, N]` (a Conv1D kernel as
  `[k * in, out]`) cut into `block_size` blocks, partial at the edges; with
  `gates > 1` (3 for a GRU kernel, 4 for an LSTM kernel) the last axis is
  split into that many gate slices first, so no block straddles two gates.
  The gradient of an all-zero block is taken as zero.

  Args:
    strength: the factor λ >= 0.
    block_size: `(bh, bw)` or an int.
    gates: number of equal gate slices of the last axis.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> reg = tfbs.regularizers.GroupLasso(0.5, block_size=(1, 2))
  >>> float(reg(np.array([[3., 4.], [0., 0.]], np.float32)))
  2.5
  >>> layer = tf_keras.layers.LSTM(
  ...     8, recurrent_regularizer=tfbs.regularizers.GroupLasso(
  ...         1e-4, (4, 4), gates=4))
  """

  def __init__(self, strength=0.01, block_size=(4, 4), gates=1):
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) \
        or not strength >= 0:
      raise ValueError(f"GroupLasso strength must be a number >= 0, got "
                       f"{strength!r}.")
    if isinstance(gates, bool) or not isinstance(gates, int) or gates < 1:
      raise ValueError(f"gates must be an int >= 1, got {gates!r}.")
    self.strength = float(strength)
    self.block_size = block_masks.check_block_size(block_size)
    self.gates = gates

  def __call__(self, x):
    x = tf.convert_to_tensor(x)
    matrix = tf.reshape(x, block_masks.matrix_shape(x.shape))
    norms = block_masks.block_l2_norms(matrix, self.block_size, self.gates)
    return tf.cast(self.strength, x.dtype) * tf.reduce_sum(norms)

  def get_config(self):
    return {"strength": self.strength, "block_size": self.block_size,
            "gates": self.gates}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["block_size"] = tuple(config["block_size"])
    return cls(**config)
