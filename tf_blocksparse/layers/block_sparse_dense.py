"""`BlockSparseDense`: a tf_keras `Dense` whose kernel is stored in BSR form."""

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.layers import _bsr_weights


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseDense(tf_keras.layers.Layer):
  """`activation(inputs @ kernel + bias)` with a block-sparse kernel.

  The kernel `[input_dim, units]` is a `BlockSparseMatrix` of `block_size`
  blocks with a fixed layout; the block values (and the bias) are trainable,
  so a pruned model can be fine-tuned in sparse form. Build one from a
  pruned `Dense` with `from_dense_layer`, or from scratch with
  `kernel_blocks` (a count) or `density` (the layout is then a fixed
  deterministic spread of blocks). Without either the kernel is dense.

  Args:
    units: output width.
    activation: tf_keras activation.
    use_bias: whether to add a bias.
    block_size: int or `(bh, bw)`.
    kernel_blocks: number of stored blocks of the kernel, or None.
    density: fraction of blocks stored, used when `kernel_blocks` is None.
    kernel_initializer, bias_initializer: tf_keras initializers.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> dense = tf_keras.layers.Dense(8); dense.build((None, 16))
  >>> w = np.kron(np.eye(2), np.ones([8, 4])).astype(np.float32)
  >>> dense.set_weights([w, np.zeros(8, np.float32)])
  >>> sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, 4)
  >>> x = np.random.rand(3, 16).astype(np.float32)
  >>> np.allclose(sparse(x), dense(x), rtol=1e-5, atol=1e-6)
  True
  """

  # Marks it as a per-timestep layer for TimeDistributed, which then reshapes
  # [batch, time, ...] to [batch * time, ...] as it does for Dense (same
  # outputs at masked steps as a wrapped Dense, and one matmul) instead of
  # looping over time with backend.rnn.
  _keras_api_names = ("tf_blocksparse.layers.BlockSparseDense",)
  _keras_api_names_v1 = _keras_api_names

  def __init__(self, units, activation=None, use_bias=True, block_size=16,
               kernel_blocks=None, density=None,
               kernel_initializer="glorot_uniform", bias_initializer="zeros",
               **kwargs):
    super().__init__(**kwargs)
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units <= 0:
      raise ValueError(f"units must be a positive int, got {units!r}")
    self.units = int(units)
    self.activation = tf_keras.activations.get(activation)
    self.use_bias = bool(use_bias)
    self.block_size = _bsr_weights.block_size_pair(block_size)
    self.kernel_blocks = kernel_blocks
    self.density = density
    self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)
    self.bias_initializer = tf_keras.initializers.get(bias_initializer)
    self.input_spec = tf_keras.layers.InputSpec(min_ndim=2)
    self.supports_masking = True

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    input_dim = input_shape[-1]
    if input_dim is None:
      raise ValueError("the last dimension of the inputs to BlockSparseDense "
                       f"must be known, got shape {input_shape}")
    shape = (int(input_dim), self.units)
    self.kernel_blocks = _bsr_weights.resolve_blocks(
        self.kernel_blocks, self.density, shape, self.block_size,
        "kernel_blocks")
    self.kernel = _bsr_weights.add_weight(
        self, "kernel", shape, self.block_size, self.kernel_blocks,
        self.kernel_initializer, self.dtype)
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight("bias", shape=(self.units,),
                                  initializer=self.bias_initializer,
                                  dtype=self.dtype, trainable=True)
    self.input_spec = tf_keras.layers.InputSpec(min_ndim=2,
                                                axes={-1: int(input_dim)})
    self.built = True

  def call(self, inputs):
    if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
      raise TypeError(f"{type(self).__name__} takes dense inputs, got a "
                      f"{type(inputs).__name__}; convert it with .to_tensor()")
    dtype = self.compute_dtype
    if not (isinstance(inputs, tf.Tensor) and inputs.dtype == dtype):
      inputs = tf.convert_to_tensor(inputs, dtype)  # (a dispatch per call)
    outputs = _bsr_weights.matmul(inputs, self.kernel)
    if self.use_bias:
      outputs = tf.nn.bias_add(outputs, self.bias)
    return self.activation(outputs)

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

  def dense_kernel(self):
    """The kernel as a dense `[input_dim, units]` tensor."""
    return _bsr_weights.dense_value(self.kernel)

  def get_config(self):
    config = super().get_config()
    config.update({
        "units": self.units,
        "activation": tf_keras.activations.serialize(self.activation),
        "use_bias": self.use_bias,
        "block_size": list(self.block_size),
        "kernel_blocks": self.kernel_blocks,
        "density": self.density,
        "kernel_initializer": tf_keras.initializers.serialize(
            self.kernel_initializer),
        "bias_initializer": tf_keras.initializers.serialize(
            self.bias_initializer),
    })
    return config

  @classmethod
  def from_dense_layer(cls, layer, block_size, sparse=True, kernel=None):
    """A `BlockSparseDense` computing what the built `Dense` `layer` computes.

    Args:
      layer: a built tf_keras `Dense`.
      block_size: int or `(bh, bw)`; the kernel keeps every block holding a
        non-zero.
      sparse: False keeps the kernel dense.
      kernel: optional kernel value to use instead of the layer's (e.g. the
        masked kernel of a pruning wrapper).
    """
    if not layer.built:
      raise ValueError(f"layer {layer.name} must be built (called once) first")
    block_size = _bsr_weights.block_size_pair(block_size)
    kernel = np.asarray(layer.kernel if kernel is None else kernel)
    matrix = BlockSparseMatrix.from_dense(kernel, block_size) if sparse else None
    new = cls(units=layer.units, activation=layer.activation,
              use_bias=layer.use_bias, block_size=block_size,
              kernel_blocks=None if matrix is None else int(matrix.num_blocks),
              name=layer.name, dtype=layer.dtype_policy)
    new.build((None, kernel.shape[0]))
    if matrix is None:
      new.kernel.assign(kernel)
    else:
      new.kernel.assign(matrix)
    if layer.use_bias:
      new.bias.assign(np.asarray(layer.bias))
    return new


# tf_keras' Wrapper.from_config (TimeDistributed) deserializes the wrapped
# layer in the legacy format, which looks the class up by its bare name, not
# the registered "tf_blocksparse>..." one; the alias lets
# TimeDistributed(BlockSparseDense) load from .keras files without
# custom_objects.
tf_keras.utils.get_custom_objects().setdefault("BlockSparseDense",
                                               BlockSparseDense)
