"""Block-term LSTM/GRU (Ye et al. 2018): compact input-to-hidden kernels.

As in BT-RNN, the input-to-hidden matrix of all gates together (`[I, 4H]`
for the LSTM, `[I, 3H]` for the GRU) is one block-term tensor; it is the
matrix that is huge when frames are high dimensional. The recurrent matrix
`[H, gates * H]` is dense, or block-sparse when `recurrent_block_size` is
given: then a fixed block layout (`recurrent_mask`, or `recurrent_density`
of the blocks drawn at random with `recurrent_mask_seed`) is stored as BSR
variables and applied with `tf_blocksparse.ops.bsr_matmul`.

Gate order, bias layout and equations are those of tf_keras `LSTM`/`GRU`
(i, f, c, o and z, r, h; the GRU bias is `[2, 3H]` with `reset_after=True`),
so a tf_keras layer whose kernel is set to `dense_kernel()` and whose
recurrent kernel is set to `recurrent_dense_kernel()` computes the same
outputs. Dropout and recurrent dropout are not supported.

The layers project the whole sequence through the block-term kernel once
(one batched contraction over all time steps), then run the recurrence on
the projected gates. The cells also work alone, e.g. in
`tf_keras.layers.RNN(BlockTermLSTMCell(...))`, projecting each step.
"""

import inspect
import math

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.block_term import decomposition
from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.layers import _block_term_weights
from tf_blocksparse import ops

_LAYER_ONLY_KEYS = ("name", "trainable", "dtype")


def _block_size_pair(block_size):
  if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
    block_size = (block_size, block_size)
  try:
    bh, bw = block_size
  except (TypeError, ValueError):
    raise TypeError("recurrent_block_size must be an int or a pair of ints, "
                    f"got {block_size!r}")
  return (decomposition.positive_int(bh, "recurrent_block_size[0]"),
          decomposition.positive_int(bw, "recurrent_block_size[1]"))


def random_block_mask(grid, density, seed):
  """Exactly `max(1, round(density * blocks))` blocks, chosen at random.

  A fixed count (not a Bernoulli draw) keeps the number of stored blocks a
  function of the configuration, so variables rebuilt from a config have
  the shapes of the saved ones.
  """
  nbr, nbc = grid
  total = nbr * nbc
  count = max(1, int(round(density * total)))
  chosen = np.random.RandomState(seed).choice(total, size=count, replace=False)
  mask = np.zeros(total, bool)
  mask[chosen] = True
  return mask.reshape(grid)


class _BlockTermRNNCell(tf_keras.layers.Layer):
  """Shared parts of the block-term LSTM and GRU cells."""

  _GATES = None

  def __init__(self, units, input_modes, rank, num_blocks=1, output_modes=None,
               activation="tanh", recurrent_activation="sigmoid",
               use_bias=True, factor_initializer=None, core_initializer=None,
               recurrent_initializer="orthogonal", bias_initializer="zeros",
               factor_regularizer=None, core_regularizer=None,
               recurrent_regularizer=None, bias_regularizer=None,
               recurrent_block_size=None, recurrent_density=1.0,
               recurrent_mask=None, recurrent_mask_seed=0, **kwargs):
    super().__init__(**kwargs)
    self.units = decomposition.positive_int(units, "units")
    gate_width = self._GATES * self.units
    if output_modes is None:
      d = len(decomposition.check_shapes(input_modes, input_modes, 1)[0])
      output_modes = decomposition.factorize_shape(gate_width, d)
    (self.input_modes, self.output_modes, self.ranks,
     self.num_blocks) = decomposition.check_shapes(
         input_modes, output_modes, rank, num_blocks)
    if math.prod(self.output_modes) != gate_width:
      raise ValueError(
          f"output_modes {self.output_modes} multiply to "
          f"{math.prod(self.output_modes)} but the {self._GATES} gates need "
          f"{self._GATES} * units = {gate_width} outputs; use e.g. "
          f"block_term.factorize_shape({gate_width}, {len(self.input_modes)})")
    self.input_dim = math.prod(self.input_modes)
    self.activation = tf_keras.activations.get(activation)
    self.recurrent_activation = tf_keras.activations.get(recurrent_activation)
    self.use_bias = bool(use_bias)
    _block_term_weights.set_factor_core_args(
        self, factor_initializer, core_initializer, factor_regularizer,
        core_regularizer)
    self.recurrent_initializer = tf_keras.initializers.get(recurrent_initializer)
    self.bias_initializer = tf_keras.initializers.get(bias_initializer)
    self.recurrent_regularizer = tf_keras.regularizers.get(recurrent_regularizer)
    self.bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    self._init_recurrent_layout(recurrent_block_size, recurrent_density,
                                recurrent_mask, recurrent_mask_seed)
    self.state_size = self._state_size()
    self.output_size = self.units
    # Set by the layer while it runs the recurrence on pre-projected gates.
    self._inputs_projected = False

  def _init_recurrent_layout(self, block_size, density, mask, seed):
    self.recurrent_density_arg = float(density)
    self.recurrent_mask_seed = int(seed)
    if block_size is None:
      if mask is not None or density != 1.0:
        raise ValueError(
            "recurrent_mask and recurrent_density select recurrent blocks; "
            "they need recurrent_block_size (got None, a dense recurrent kernel)")
      self.recurrent_block_size = None
      self.recurrent_mask = None
      return
    self.recurrent_block_size = _block_size_pair(block_size)
    bh, bw = self.recurrent_block_size
    shape = (self.units, self._GATES * self.units)
    grid = (-(-shape[0] // bh), -(-shape[1] // bw))
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != grid:
        raise ValueError(
            f"recurrent_mask has shape {mask.shape} but a {list(shape)} "
            f"recurrent kernel in {bh}x{bw} blocks has a {list(grid)} block grid")
      mask = mask.astype(bool)
      if not mask.any():
        raise ValueError("recurrent_mask keeps no block; keep at least one")
    else:
      if not 0.0 < density <= 1.0:
        raise ValueError(f"recurrent_density must be in (0, 1], got {density}")
      mask = random_block_mask(grid, density, seed)
    self.recurrent_mask = mask

  def _state_size(self):
    raise NotImplementedError("defined by BlockTermLSTMCell / BlockTermGRUCell")

  def _bias_shape(self):
    raise NotImplementedError("defined by BlockTermLSTMCell / BlockTermGRUCell")

  def _bias_init(self):
    return _block_term_weights.fresh_initializer(self.bias_initializer)

  @property
  def recurrent_shape(self):
    return (self.units, self._GATES * self.units)

  def build(self, input_shape):
    last = tf.TensorShape(input_shape)[-1]
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
    if self.recurrent_block_size is None:
      self.recurrent_kernel = self.add_weight(
          name="recurrent_kernel", shape=list(self.recurrent_shape),
          initializer=_block_term_weights.fresh_initializer(
              self.recurrent_initializer),
          regularizer=self.recurrent_regularizer, trainable=True)
    else:
      self._build_sparse_recurrent()
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight(
          name="bias", shape=self._bias_shape(), initializer=self._bias_init(),
          regularizer=self.bias_regularizer, trainable=True)
    self.built = True

  def _build_sparse_recurrent(self):
    # The kept blocks start as the blocks of a dense recurrent_initializer
    # draw (orthogonal by default), as a pruned dense kernel would.
    with tf.init_scope():
      dense = _block_term_weights.fresh_initializer(self.recurrent_initializer)(
          self.recurrent_shape, dtype=self.dtype)
      matrix = BlockSparseMatrix.from_mask(dense, self.recurrent_mask,
                                           self.recurrent_block_size)
      values, cols, row_ptr = matrix.numpy_components()

    def constant(array):
      return lambda shape, dtype=None, **kwargs: tf.constant(array, dtype=dtype)

    self.recurrent_values = self.add_weight(
        name="recurrent_values", shape=list(values.shape),
        initializer=constant(values), regularizer=self.recurrent_regularizer,
        trainable=True)
    self.recurrent_col_indices = self.add_weight(
        name="recurrent_col_indices", shape=list(cols.shape), dtype=tf.int32,
        initializer=constant(cols), trainable=False)
    self.recurrent_row_ptr = self.add_weight(
        name="recurrent_row_ptr", shape=list(row_ptr.shape), dtype=tf.int32,
        initializer=constant(row_ptr), trainable=False)

  def recurrent_matrix(self):
    """The block-sparse recurrent kernel (only with `recurrent_block_size`)."""
    if self.recurrent_block_size is None:
      raise ValueError(f"{self.name} has a dense recurrent kernel")
    return BlockSparseMatrix(tf.convert_to_tensor(self.recurrent_values),
                             tf.convert_to_tensor(self.recurrent_col_indices),
                             tf.convert_to_tensor(self.recurrent_row_ptr),
                             self.recurrent_shape)

  def _recurrent_matmul(self, h):
    if self.recurrent_block_size is None:
      return tf.matmul(h, tf.cast(self.recurrent_kernel, h.dtype))
    return ops.bsr_matmul(h, self.recurrent_matrix())

  def project(self, inputs):
    """Input-to-gates product `inputs @ W` (`[..., I]` -> `[..., gates*H]`)."""
    inputs = tf.convert_to_tensor(inputs, dtype=self.compute_dtype)
    return decomposition.block_term_matmul(inputs, self.factors, self.core)

  def call(self, inputs, states, training=None):
    gates = inputs if self._inputs_projected else self.project(inputs)
    return self._step(gates, states)

  def _step(self, gates, states):
    raise NotImplementedError("defined by BlockTermLSTMCell / BlockTermGRUCell")

  def dense_kernel(self):
    """The dense `[I, gates * H]` input kernel (tf_keras gate order)."""
    if not self.built:
      raise ValueError(f"{self.name} is not built yet; call it on an input first")
    return decomposition.block_term_to_dense(
        [tf.convert_to_tensor(f) for f in self.factors],
        tf.convert_to_tensor(self.core))

  def recurrent_dense_kernel(self):
    """The dense `[H, gates * H]` recurrent kernel (zeros outside blocks)."""
    if not self.built:
      raise ValueError(f"{self.name} is not built yet; call it on an input first")
    if self.recurrent_block_size is None:
      return tf.convert_to_tensor(self.recurrent_kernel)
    return self.recurrent_matrix().to_dense()

  @property
  def compression_ratio(self):
    """Dense input kernel weights over block-term weights."""
    return decomposition.compression_ratio(
        self.input_modes, self.output_modes, self.ranks, self.num_blocks)

  def get_config(self):
    opt = _block_term_weights.serialize_optional
    config = super().get_config()
    config.update({
        "units": self.units,
        "input_modes": list(self.input_modes),
        "rank": list(self.ranks),
        "num_blocks": self.num_blocks,
        "output_modes": list(self.output_modes),
        "activation": tf_keras.activations.serialize(self.activation),
        "recurrent_activation": tf_keras.activations.serialize(
            self.recurrent_activation),
        "use_bias": self.use_bias,
        "recurrent_initializer": tf_keras.initializers.serialize(
            self.recurrent_initializer),
        "bias_initializer": tf_keras.initializers.serialize(self.bias_initializer),
        "recurrent_regularizer": opt(tf_keras.regularizers.serialize,
                                     self.recurrent_regularizer),
        "bias_regularizer": opt(tf_keras.regularizers.serialize,
                                self.bias_regularizer),
        "recurrent_block_size": (None if self.recurrent_block_size is None
                                 else list(self.recurrent_block_size)),
        "recurrent_density": self.recurrent_density_arg,
        # The resolved layout, so a layer rebuilt from its config has the
        # saved block structure even before weights are loaded.
        "recurrent_mask": (None if self.recurrent_mask is None
                           else self.recurrent_mask.tolist()),
        "recurrent_mask_seed": self.recurrent_mask_seed,
    })
    config.update(_block_term_weights.factor_core_config(self))
    return config


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockTermLSTMCell(_BlockTermRNNCell):
  """LSTM cell with a block-term `[I, 4H]` input kernel (see module doc).

  Arguments are those of `BlockTermLSTM` that are not RNN-layer options,
  plus `unit_forget_bias` (default True, as in tf_keras: the forget-gate
  bias starts at 1).

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> cell = tfbs.layers.BlockTermLSTMCell(8, input_modes=[4, 4], rank=2)
  >>> tf_keras.layers.RNN(cell)(np.ones([2, 5, 16], np.float32)).shape
  TensorShape([2, 8])
  """

  _GATES = 4

  def __init__(self, units, input_modes, rank, num_blocks=1,
               unit_forget_bias=True, **kwargs):
    self.unit_forget_bias = bool(unit_forget_bias)
    super().__init__(units, input_modes, rank, num_blocks, **kwargs)

  def _state_size(self):
    return [self.units, self.units]

  def _bias_shape(self):
    return [4 * self.units]

  def _bias_init(self):
    if not self.unit_forget_bias:
      return super()._bias_init()
    fresh = _block_term_weights.fresh_initializer

    def init(shape, dtype=None, **kwargs):
      h = self.units
      return tf.concat([fresh(self.bias_initializer)((h,), dtype=dtype),
                        tf.ones((h,), dtype=dtype),
                        fresh(self.bias_initializer)((2 * h,), dtype=dtype)],
                       axis=0)
    return init

  def _step(self, gates, states):
    h_tm1, c_tm1 = states[0], states[1]
    z = gates + self._recurrent_matmul(h_tm1)
    if self.use_bias:
      z = tf.nn.bias_add(z, tf.cast(self.bias, z.dtype))
    zi, zf, zc, zo = tf.split(z, 4, axis=-1)
    i = self.recurrent_activation(zi)
    f = self.recurrent_activation(zf)
    c = f * c_tm1 + i * self.activation(zc)
    o = self.recurrent_activation(zo)
    h = o * self.activation(c)
    return h, [h, c]

  def get_config(self):
    config = super().get_config()
    config["unit_forget_bias"] = self.unit_forget_bias
    return config


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockTermGRUCell(_BlockTermRNNCell):
  """GRU cell with a block-term `[I, 3H]` input kernel (see module doc).

  `reset_after=True` (the tf_keras default) applies the reset gate after
  the recurrent product and keeps separate input and recurrent biases
  (`bias` is `[2, 3H]`); `reset_after=False` needs a dense recurrent
  kernel, since it multiplies `(r * h)` by one slice of it.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> cell = tfbs.layers.BlockTermGRUCell(8, input_modes=[4, 4], rank=2)
  >>> tf_keras.layers.RNN(cell)(np.ones([2, 5, 16], np.float32)).shape
  TensorShape([2, 8])
  """

  _GATES = 3

  def __init__(self, units, input_modes, rank, num_blocks=1, reset_after=True,
               **kwargs):
    self.reset_after = bool(reset_after)
    super().__init__(units, input_modes, rank, num_blocks, **kwargs)
    if not self.reset_after and self.recurrent_block_size is not None:
      raise ValueError(
          "reset_after=False multiplies (r * h) by a slice of the recurrent "
          "kernel and is only supported with a dense one; use "
          "reset_after=True with recurrent_block_size")

  def _state_size(self):
    return self.units

  def _bias_shape(self):
    return [2, 3 * self.units] if self.reset_after else [3 * self.units]

  def _step(self, gates, states):
    h_tm1 = states[0] if tf.nest.is_nested(states) else states
    h = self.units
    if self.use_bias:
      bias = tf.cast(self.bias, gates.dtype)
      gates = gates + (bias[0] if self.reset_after else bias)
    x_z, x_r, x_h = tf.split(gates, 3, axis=-1)
    if self.reset_after:
      rec = self._recurrent_matmul(h_tm1)
      if self.use_bias:
        rec = rec + bias[1]
      r_z, r_r, r_h = tf.split(rec, 3, axis=-1)
      z = self.recurrent_activation(x_z + r_z)
      r = self.recurrent_activation(x_r + r_r)
      candidate = self.activation(x_h + r * r_h)
    else:
      kernel = tf.cast(self.recurrent_kernel, h_tm1.dtype)
      r_z, r_r = tf.split(tf.matmul(h_tm1, kernel[:, :2 * h]), 2, axis=-1)
      z = self.recurrent_activation(x_z + r_z)
      r = self.recurrent_activation(x_r + r_r)
      candidate = self.activation(x_h + tf.matmul(r * h_tm1, kernel[:, 2 * h:]))
    new_h = z * h_tm1 + (1.0 - z) * candidate
    return new_h, [new_h]

  def get_config(self):
    config = super().get_config()
    config["reset_after"] = self.reset_after
    return config


def _cell_arg_names(cell_cls):
  names = set()
  for klass in (cell_cls, _BlockTermRNNCell):
    names.update(p for p in inspect.signature(klass.__init__).parameters
                 if p not in ("self", "kwargs"))
  return names


class _BlockTermRNN(tf_keras.layers.RNN):
  """An RNN layer around a block-term cell that projects whole sequences."""

  _CELL = None

  def __init__(self, units, input_modes, rank, num_blocks=1,
               return_sequences=False, return_state=False, go_backwards=False,
               stateful=False, unroll=False, time_major=False, **kwargs):
    cell_names = _cell_arg_names(self._CELL)
    cell_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in cell_names}
    cell = self._CELL(units, input_modes, rank, num_blocks,
                      dtype=kwargs.get("dtype"),
                      trainable=kwargs.get("trainable", True),
                      name=f"{self._CELL.__name__.lower()}", **cell_kwargs)
    super().__init__(cell, return_sequences=return_sequences,
                     return_state=return_state, go_backwards=go_backwards,
                     stateful=stateful, unroll=unroll, time_major=time_major,
                     **kwargs)

  def call(self, inputs, mask=None, training=None, initial_state=None):
    # Initial states may arrive appended to the inputs (functional API).
    if isinstance(inputs, (list, tuple)):
      sequence, extra = inputs[0], list(inputs[1:])
    else:
      sequence, extra = inputs, []
    if isinstance(sequence, tf.RaggedTensor):
      projected = tf.ragged.map_flat_values(self.cell.project, sequence)
    else:
      projected = self.cell.project(sequence)
    self.cell._inputs_projected = True
    try:
      return super().call([projected] + extra if extra else projected,
                          mask=mask, training=training,
                          initial_state=initial_state)
    finally:
      self.cell._inputs_projected = False

  @property
  def units(self):
    return self.cell.units

  @property
  def compression_ratio(self):
    """Dense input kernel weights over block-term weights."""
    return self.cell.compression_ratio

  def dense_kernel(self):
    """The dense `[I, gates * H]` input kernel, tf_keras gate order."""
    return self.cell.dense_kernel()

  def recurrent_dense_kernel(self):
    """The dense `[H, gates * H]` recurrent kernel."""
    return self.cell.recurrent_dense_kernel()

  def get_config(self):
    cell_config = {k: v for k, v in self.cell.get_config().items()
                   if k not in _LAYER_ONLY_KEYS}
    config = super().get_config()
    del config["cell"]
    config.update(cell_config)
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockTermLSTM(_BlockTermRNN):
  """LSTM layer whose `[I, 4H]` input kernel is a block-term tensor.

  Args:
    units: hidden size `H`.
    input_modes: `d` ints whose product is the frame size `I`.
    rank: Tucker rank (int or `d` ints).
    num_blocks: number of Tucker blocks `N`.
    output_modes: `d` ints whose product is `4 * units` (default
      `factorize_shape(4 * units, d)`).
    activation, recurrent_activation, use_bias, unit_forget_bias,
    recurrent_initializer, bias_initializer, recurrent_regularizer,
    bias_regularizer: as in tf_keras `LSTM`.
    factor_initializer, core_initializer, factor_regularizer,
    core_regularizer: as in `BlockTermDense` (None initialisers give the
      reconstructed kernel Glorot variance for `[I, 4H]`).
    recurrent_block_size: None (dense recurrent kernel) or a block shape:
      the recurrent kernel is then block-sparse (BSR variables and
      `bsr_matmul`).
    recurrent_density: fraction of recurrent blocks kept, chosen at random
      with `recurrent_mask_seed` (exact count `round(density * blocks)`).
    recurrent_mask: explicit `[ceil(H/bh), ceil(4H/bw)]` bool block mask
      (overrides the density).
    return_sequences, return_state, go_backwards, stateful, unroll,
    time_major: as in tf_keras `RNN`. Masking (e.g. after `Masking` or
    `Embedding(mask_zero=True)`) and `Bidirectional` work as for `LSTM`.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> layer = tfbs.layers.BlockTermLSTM(16, input_modes=[8, 8, 16], rank=2,
  ...                                   recurrent_block_size=8,
  ...                                   recurrent_density=0.5)
  >>> layer(np.ones([2, 5, 1024], np.float32)).shape
  TensorShape([2, 16])
  >>> layer.cell.output_modes, round(layer.compression_ratio)
  ((4, 4, 4), 248)
  """

  _CELL = BlockTermLSTMCell


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockTermGRU(_BlockTermRNN):
  """GRU layer whose `[I, 3H]` input kernel is a block-term tensor.

  Arguments as `BlockTermLSTM`, with `reset_after` (default True, as in
  tf_keras `GRU`) instead of `unit_forget_bias`, and `output_modes`
  multiplying to `3 * units`.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> layer = tfbs.layers.BlockTermGRU(8, input_modes=[4, 8], rank=3,
  ...                                  return_sequences=True)
  >>> layer(np.ones([2, 5, 32], np.float32)).shape
  TensorShape([2, 5, 8])
  """

  _CELL = BlockTermGRUCell
