"""`BlockTermDense`: a Dense layer whose kernel is a block-term tensor."""

import math

import tensorflow as tf
import tf_keras

from tf_blocksparse.block_term import decomposition
from tf_blocksparse.layers import _block_term_weights


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockTermDense(tf_keras.layers.Layer):
  """`activation(x @ W + b)` with `W` `[I, J]` in block-term form.

  `W = sum_{n=1..N} G_n x_1 A_n^(1) ... x_d A_n^(d)` (Ye et al. 2018), with
  `I = prod input_modes`, `J = prod output_modes`, cores `G_n` of shape
  `[R_1, ..., R_d]` and factors `A_n^(k)` of shape `[I_k, J_k, R_k]`. The
  forward pass reshapes `x` to `[..., I_1, ..., I_d]` and contracts it mode
  by mode (`block_term.block_term_matmul`); `W` is never formed except by
  `dense_kernel()`. Weights: `N * (sum_k I_k J_k R_k + prod_k R_k)`, plus
  `J` for the bias.

  Initialisation (when `factor_initializer`/`core_initializer` are None):
  factors are normal with variance `1 / R_k` and cores normal with variance
  `2 / ((I + J) N)`, so every entry of the reconstructed `W` has variance
  `2 / (I + J)`, the Glorot variance a dense `[I, J]` kernel starts with
  (see `block_term.glorot_stddevs` for the derivation).

  Args:
    input_modes: `d` positive ints whose product is the input size `I`.
    output_modes: `d` positive ints whose product is the output size `J`.
    rank: Tucker rank, an int or `d` ints.
    num_blocks: number of Tucker blocks `N` summed.
    activation: Keras activation applied to the output.
    use_bias: add a `[J]` bias.
    factor_initializer, core_initializer: Keras initialisers (None: the
      Glorot-matched scheme above).
    bias_initializer: Keras initialiser for the bias.
    factor_regularizer, core_regularizer, bias_regularizer: optional.
    **kwargs: base `Layer` arguments (name, dtype, ...).

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> layer = tfbs.layers.BlockTermDense([4, 8], [4, 4], rank=2, num_blocks=2)
  >>> y = layer(np.ones([3, 32], np.float32))
  >>> y.shape, layer.count_params()  # 2 * (4*4*2 + 8*4*2 + 2*2) + 16
  (TensorShape([3, 16]), 216)
  >>> np.allclose(y, np.ones([3, 32]) @ layer.dense_kernel() + layer.bias,
  ...             atol=1e-5)
  True
  """

  def __init__(self, input_modes, output_modes, rank, num_blocks=1,
               activation=None, use_bias=True, factor_initializer=None,
               core_initializer=None, bias_initializer="zeros",
               factor_regularizer=None, core_regularizer=None,
               bias_regularizer=None, activity_regularizer=None, **kwargs):
    super().__init__(activity_regularizer=activity_regularizer, **kwargs)
    (self.input_modes, self.output_modes, self.ranks,
     self.num_blocks) = decomposition.check_shapes(
         input_modes, output_modes, rank, num_blocks)
    self.input_dim = math.prod(self.input_modes)
    self.units = math.prod(self.output_modes)
    self.activation = tf_keras.activations.get(activation)
    self.use_bias = bool(use_bias)
    _block_term_weights.set_factor_core_args(
        self, factor_initializer, core_initializer, factor_regularizer,
        core_regularizer)
    self.bias_initializer = tf_keras.initializers.get(bias_initializer)
    self.bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    # The feature size is checked in build, with an error naming the modes.
    self.input_spec = tf_keras.layers.InputSpec(min_ndim=2)
    self.supports_masking = True

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    last = input_shape[-1]
    if last is not None and last != self.input_dim:
      raise ValueError(
          f"{self.name}: the input has {last} features but input_modes "
          f"{self.input_modes} multiply to {self.input_dim}; choose modes whose "
          f"product is {last} (e.g. block_term.factorize_shape({last}, "
          f"{len(self.input_modes)}))")
    self.factors, self.core = _block_term_weights.add_block_term_weights(
        self, self.input_modes, self.output_modes, self.ranks, self.num_blocks,
        self.factor_initializer, self.core_initializer,
        self.factor_regularizer, self.core_regularizer)
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight(
          name="bias", shape=[self.units], initializer=self.bias_initializer,
          regularizer=self.bias_regularizer, trainable=True)
    super().build(input_shape)

  def call(self, inputs):
    if isinstance(inputs, tf.RaggedTensor):
      return tf.ragged.map_flat_values(self.call, inputs)
    inputs = tf.convert_to_tensor(inputs, dtype=self.compute_dtype)
    outputs = decomposition.block_term_matmul(inputs, self.factors, self.core)
    if self.use_bias:
      outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
    if self.activation is not None:
      outputs = self.activation(outputs)
    return outputs

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

  def dense_kernel(self):
    """The dense `[I, J]` kernel this layer applies (for checks/conversion)."""
    if not self.built:
      raise ValueError(f"{self.name} is not built yet; call it on an input first")
    return decomposition.block_term_to_dense(
        [tf.convert_to_tensor(f) for f in self.factors],
        tf.convert_to_tensor(self.core))

  @property
  def compression_ratio(self):
    """Dense kernel weights over block-term weights (bias not counted)."""
    return decomposition.compression_ratio(
        self.input_modes, self.output_modes, self.ranks, self.num_blocks)

  def get_config(self):
    config = super().get_config()
    opt = _block_term_weights.serialize_optional
    config.update({
        "input_modes": list(self.input_modes),
        "output_modes": list(self.output_modes),
        "rank": list(self.ranks),
        "num_blocks": self.num_blocks,
        "activation": tf_keras.activations.serialize(self.activation),
        "use_bias": self.use_bias,
        "bias_initializer": tf_keras.initializers.serialize(self.bias_initializer),
        "bias_regularizer": opt(tf_keras.regularizers.serialize,
                                self.bias_regularizer),
        "activity_regularizer": opt(tf_keras.regularizers.serialize,
                                    self.activity_regularizer),
    })
    config.update(_block_term_weights.factor_core_config(self))
    return config
