"""Block-sparse `SimpleRNN`, `GRU` and `LSTM` layers on the fused sequence ops.

Each layer keeps the tf_keras weight layout (kernel `[input_dim, gates *
units]`, recurrent kernel `[units, gates * units]`, gates i, f, c, o for the
LSTM and z, r, h for the GRU, the same bias shapes), each weight either
dense or block sparse (`BlockSparseMatrix` variables with a fixed layout
and trainable values), so converting a pruned tf_keras layer is a copy.

A call follows the cuDNN paper's recipe: the input projection of all
timesteps is one matmul (M = batch * time), then the recurrence runs in one
fused op (`tf_blocksparse.ops.lstm_sequence` etc.) that loops over time in
C++, one block-sparse product for all gates and one fused gate pass per
step. Gradients come from the equivalent differentiable TF loop (see
`tf_blocksparse.ops.bsr_rnn`). Activations other than tanh, sigmoid, relu,
linear and hard_sigmoid run the TF loop only.

Supported tf_keras options: units, activation(s), use_bias, return_sequences,
return_state, go_backwards, stateful, masking (mask argument or a `Masking`
layer), GRU `reset_after`, initial states, `Bidirectional` and
`TimeDistributed` wrapping. Not supported: dropout, recurrent_dropout,
unroll, time_major, ragged inputs (pad them and pass a mask).
"""

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.layers import _bsr_weights
from tf_blocksparse.ops import bsr_rnn


def _fused_activation(fn):
  """The tf_keras name of `fn` when the fused kernel has it, else `fn`."""
  name = tf_keras.activations.serialize(fn)
  if (isinstance(name, str) and name in bsr_rnn.FUSED_ACTIVATIONS
      and tf_keras.activations.get(name) is fn):
    return name
  return fn


def _positive_int(value, what):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{what} must be a positive int, got {value!r}")
  return int(value)


class _BlockSparseCell(tf_keras.layers.Layer):
  """Weights and one step of a block-sparse recurrent cell.

  The layers below never call the cell step by step (they run the fused
  sequence op); `call` is there so that a cell also works alone inside
  `tf_keras.layers.RNN`.
  """

  GATES = 1

  def __init__(self, units, activation="tanh", use_bias=True, block_size=16,
               kernel_blocks=None, recurrent_blocks=None, density=None,
               kernel_initializer="glorot_uniform",
               recurrent_initializer="orthogonal", bias_initializer="zeros",
               **kwargs):
    super().__init__(**kwargs)
    self.units = _positive_int(units, "units")
    self.activation = tf_keras.activations.get(activation)
    self.use_bias = bool(use_bias)
    self.block_size = _bsr_weights.block_size_pair(block_size)
    self.kernel_blocks = kernel_blocks
    self.recurrent_blocks = recurrent_blocks
    self.density = density
    self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)
    self.recurrent_initializer = tf_keras.initializers.get(recurrent_initializer)
    self.bias_initializer = tf_keras.initializers.get(bias_initializer)

  @property
  def state_size(self):
    return self.units

  @property
  def output_size(self):
    return self.units

  def _bias_shape(self):
    return (self.GATES * self.units,)

  def _bias_init(self):
    return self.bias_initializer

  def build(self, input_shape):
    input_dim = tf.TensorShape(input_shape)[-1]
    if input_dim is None:
      raise ValueError(f"the feature dimension of the inputs to {self.name} "
                       f"must be known, got shape {input_shape}")
    width = self.GATES * self.units
    k_shape, r_shape = (int(input_dim), width), (self.units, width)
    self.kernel_blocks = _bsr_weights.resolve_blocks(
        self.kernel_blocks, self.density, k_shape, self.block_size,
        "kernel_blocks")
    self.recurrent_blocks = _bsr_weights.resolve_blocks(
        self.recurrent_blocks, self.density, r_shape, self.block_size,
        "recurrent_blocks")
    self.kernel = _bsr_weights.add_weight(
        self, "kernel", k_shape, self.block_size, self.kernel_blocks,
        self.kernel_initializer, self.dtype)
    self.recurrent_kernel = _bsr_weights.add_weight(
        self, "recurrent_kernel", r_shape, self.block_size,
        self.recurrent_blocks, self.recurrent_initializer, self.dtype)
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight("bias", shape=self._bias_shape(),
                                  initializer=self._bias_init(),
                                  dtype=self.dtype, trainable=True)
    self.built = True

  # --- pieces used by the layers ------------------------------------------

  def input_bias(self):
    return self.bias

  def recurrent_bias(self):
    return None

  def project(self, inputs):
    """`inputs @ kernel + input bias` for inputs `[..., input_dim]`."""
    x = _bsr_weights.matmul(inputs, self.kernel)
    bias = self.input_bias()
    return x if bias is None else x + bias

  def recurrent_matrix(self):
    """The recurrent kernel as a `BlockSparseMatrix` (all blocks if dense)."""
    if isinstance(self.recurrent_kernel, _bsr_weights.BsrWeight):
      return self.recurrent_kernel.product_matrix()  # only multiplied
    return _bsr_weights.full_layout(
        tf.convert_to_tensor(self.recurrent_kernel), self.block_size)

  def dense_kernel(self):
    return _bsr_weights.dense_value(self.kernel)

  def dense_recurrent_kernel(self):
    return _bsr_weights.dense_value(self.recurrent_kernel)

  def call(self, inputs, states, training=None):
    del training
    states = list(states) if tf.nest.is_nested(states) else [states]
    return self._step()(self.project(inputs), states)

  def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
    if inputs is not None:
      batch_size, dtype = tf.shape(inputs)[0], inputs.dtype
    sizes = tf.nest.flatten(self.state_size)
    # One zeros tensor for states of one size (h and c): the sequence op
    # then knows they agree and traces no check of c against h.
    zeros = {s: tf.zeros([batch_size, s], dtype or self.dtype)
             for s in set(sizes)}
    states = [zeros[s] for s in sizes]
    return states if len(states) > 1 else states[0]

  def get_config(self):
    config = super().get_config()
    config.update({
        "units": self.units,
        "activation": tf_keras.activations.serialize(self.activation),
        "use_bias": self.use_bias,
        "block_size": list(self.block_size),
        "kernel_blocks": self.kernel_blocks,
        "recurrent_blocks": self.recurrent_blocks,
        "density": self.density,
        "kernel_initializer": tf_keras.initializers.serialize(
            self.kernel_initializer),
        "recurrent_initializer": tf_keras.initializers.serialize(
            self.recurrent_initializer),
        "bias_initializer": tf_keras.initializers.serialize(
            self.bias_initializer),
    })
    return config


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseSimpleRNNCell(_BlockSparseCell):
  """Cell of `BlockSparseSimpleRNN`: `h = activation(x W + h U + b)`."""

  GATES = 1

  def _step(self):
    return bsr_rnn._simple_step(self.recurrent_matrix(), self.activation)  # pylint: disable=protected-access

  def run_sequence(self, x_proj, states, mask, **options):
    out, h = bsr_rnn.simple_rnn_sequence(
        x_proj, states[0], self.recurrent_matrix(), mask=mask,
        activation=_fused_activation(self.activation), **options)
    return out, [h]


class _GatedCell(_BlockSparseCell):

  def __init__(self, units, recurrent_activation="sigmoid", **kwargs):
    super().__init__(units, **kwargs)
    self.recurrent_activation = tf_keras.activations.get(recurrent_activation)

  def get_config(self):
    config = super().get_config()
    config["recurrent_activation"] = tf_keras.activations.serialize(
        self.recurrent_activation)
    return config


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseGRUCell(_GatedCell):
  """Cell of `BlockSparseGRU` (tf_keras GRU equations, gates z, r, h)."""

  GATES = 3

  def __init__(self, units, reset_after=True, **kwargs):
    super().__init__(units, **kwargs)
    self.reset_after = bool(reset_after)

  def _bias_shape(self):
    # tf_keras: input and recurrent bias rows when reset_after.
    return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

  def input_bias(self):
    if self.bias is None or not self.reset_after:
      return self.bias
    return self.bias[0]

  def recurrent_bias(self):
    if self.bias is None or not self.reset_after:
      return None
    return self.bias[1]

  def _step(self):
    return bsr_rnn._gru_step(  # pylint: disable=protected-access
        self.recurrent_matrix(), self.recurrent_bias(), self.activation,
        self.recurrent_activation, self.reset_after)

  def run_sequence(self, x_proj, states, mask, **options):
    out, h = bsr_rnn.gru_sequence(
        x_proj, states[0], self.recurrent_matrix(),
        recurrent_bias=self.recurrent_bias(), mask=mask,
        activation=_fused_activation(self.activation),
        recurrent_activation=_fused_activation(self.recurrent_activation),
        reset_after=self.reset_after, **options)
    return out, [h]

  def get_config(self):
    config = super().get_config()
    config["reset_after"] = self.reset_after
    return config


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseLSTMCell(_GatedCell):
  """Cell of `BlockSparseLSTM` (tf_keras LSTM equations, gates i, f, c, o)."""

  GATES = 4

  def __init__(self, units, unit_forget_bias=True, **kwargs):
    super().__init__(units, **kwargs)
    self.unit_forget_bias = bool(unit_forget_bias)

  @property
  def state_size(self):
    return [self.units, self.units]

  def _bias_init(self):
    if not self.unit_forget_bias:
      return self.bias_initializer
    units, init = self.units, self.bias_initializer

    def bias_init(shape, dtype=None, **kwargs):
      del shape
      return tf.concat([init((units,), dtype, **kwargs),
                        tf.ones((units,), dtype),
                        init((2 * units,), dtype, **kwargs)], axis=0)
    return bias_init

  def _step(self):
    return bsr_rnn._lstm_step(  # pylint: disable=protected-access
        self.recurrent_matrix(), self.activation, self.recurrent_activation)

  def run_sequence(self, x_proj, states, mask, **options):
    out, h, c = bsr_rnn.lstm_sequence(
        x_proj, states[0], states[1], self.recurrent_matrix(), mask=mask,
        activation=_fused_activation(self.activation),
        recurrent_activation=_fused_activation(self.recurrent_activation),
        **options)
    return out, [h, c]

  def get_config(self):
    config = super().get_config()
    config["unit_forget_bias"] = self.unit_forget_bias
    return config


# --- layers -------------------------------------------------------------------

_CELL_KEYS = {
    "activation", "use_bias", "block_size", "kernel_blocks",
    "recurrent_blocks", "density", "kernel_initializer",
    "recurrent_initializer", "bias_initializer", "recurrent_activation",
    "reset_after", "unit_forget_bias",
}


class _BlockSparseRNN(tf_keras.layers.RNN):
  """A tf_keras `RNN` over a block-sparse cell that runs the fused op."""

  CELL = None

  def __init__(self, units, return_sequences=False, return_state=False,
               go_backwards=False, stateful=False, unroll=False,
               time_major=False, **kwargs):
    if unroll:
      raise ValueError(f"{type(self).__name__} does not support unroll=True: "
                       "the fused op already runs the loop in one kernel")
    if time_major:
      raise ValueError(f"{type(self).__name__} does not support "
                       "time_major=True; transpose the inputs to "
                       "[batch, time, features]")
    for key in ("dropout", "recurrent_dropout"):
      if kwargs.pop(key, 0.0):
        raise ValueError(f"{type(self).__name__} does not support {key}")
    kwargs.pop("implementation", None)
    cell_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _CELL_KEYS}
    cell = self.CELL(units, name="cell", dtype=kwargs.get("dtype"),
                     **cell_kwargs)
    super().__init__(cell, return_sequences=return_sequences,
                     return_state=return_state, go_backwards=go_backwards,
                     stateful=stateful, **kwargs)
    self.input_spec = [tf_keras.layers.InputSpec(ndim=3)]

  def call(self, inputs, mask=None, training=None, initial_state=None):
    del training
    if isinstance(inputs, tf.RaggedTensor) or (
        isinstance(inputs, (list, tuple)) and inputs
        and isinstance(inputs[0], tf.RaggedTensor)):
      raise ValueError(
          f"{self.name}: ragged inputs are not supported; pad them "
          "(inputs.to_tensor()) and pass the padding as a mask (e.g. a "
          "tf_keras.layers.Masking layer or mask=...)")
    inputs, initial_state, _ = self._process_inputs(inputs, initial_state, None)
    inputs = tf.cast(inputs, self.compute_dtype)
    states = self._checked_states(inputs, initial_state)
    if isinstance(mask, list):
      mask = mask[0]
    x_proj = self.cell.project(inputs)
    outputs, states = self.cell.run_sequence(
        x_proj, states, mask, go_backwards=self.go_backwards,
        zero_output_for_mask=self.zero_output_for_mask)
    if self.stateful:
      self.add_update([
          tf.compat.v1.assign(var, tf.cast(state, var.dtype))
          for var, state in zip(tf.nest.flatten(self.states), states)])
    output = outputs if self.return_sequences else outputs[:, -1]
    if self.return_state:
      return [output] + list(states)
    return output

  def _checked_states(self, inputs, initial_state):
    states = list(tf.nest.flatten(initial_state))
    expected = len(tf.nest.flatten(self.cell.state_size))
    if len(states) != expected:
      raise ValueError(f"{self.name} takes {expected} initial state(s) of "
                       f"shape [batch, {self.cell.units}], got {len(states)}")
    checked = []
    for i, state in enumerate(states):
      state = tf.cast(tf.convert_to_tensor(state), self.compute_dtype)
      want = tf.TensorShape([inputs.shape[0], self.cell.units])
      if state.shape.rank != 2 or not state.shape.is_compatible_with(want):
        raise ValueError(
            f"{self.name}: initial state {i} must have shape [batch, units] = "
            f"{want.as_list()}, got {state.shape.as_list() if state.shape.rank is not None else state.shape}")
      checked.append(state)
    return checked

  # tf_keras-style accessors, so code written for LSTM/GRU reads the same.
  @property
  def units(self):
    return self.cell.units

  @property
  def block_size(self):
    return self.cell.block_size

  def get_config(self):
    config = dict(self.cell.get_config())
    for key in ("name", "trainable", "dtype"):
      config.pop(key, None)
    base = super().get_config()
    del base["cell"]
    base.update(config)
    return base

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  # --- conversion from tf_keras layers -----------------------------------

  @classmethod
  def converted_config(cls, layer, block_size, kernel=None, recurrent=None):
    """Config of a block-sparse twin of the tf_keras `layer`.

    `kernel`/`recurrent` are the `BlockSparseMatrix` to store, or None to
    keep that weight dense.
    """
    config = layer.get_config()
    for key in ("dropout", "recurrent_dropout", "implementation", "unroll",
                "time_major", "kernel_regularizer", "recurrent_regularizer",
                "bias_regularizer", "activity_regularizer",
                "kernel_constraint", "recurrent_constraint",
                "bias_constraint"):
      config.pop(key, None)
    config["block_size"] = list(_bsr_weights.block_size_pair(block_size))
    config["kernel_blocks"] = None if kernel is None else int(kernel.num_blocks)
    config["recurrent_blocks"] = (None if recurrent is None
                                  else int(recurrent.num_blocks))
    return config

  def assign_converted(self, kernel, recurrent_kernel, bias):
    """Copies dense arrays or `BlockSparseMatrix` values into the weights."""
    for target, value in ((self.cell.kernel, kernel),
                          (self.cell.recurrent_kernel, recurrent_kernel)):
      if isinstance(target, _bsr_weights.BsrWeight):
        target.assign(value)
      else:
        target.assign(np.asarray(value))
    if self.cell.bias is not None:
      self.cell.bias.assign(np.asarray(bias))

  @classmethod
  def from_dense_layer(cls, layer, block_size, sparse_kernel=True,
                       sparse_recurrent=True):
    """A block-sparse layer computing what the built tf_keras `layer` does.

    Each weight kept sparse stores every `block_size` block that holds a
    non-zero; `sparse_kernel=False`/`sparse_recurrent=False` keep it dense.

    Example:

    >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
    >>> lstm = tf_keras.layers.LSTM(16, return_sequences=True)
    >>> x = np.random.rand(2, 5, 8).astype(np.float32)
    >>> _ = lstm(x)
    >>> sparse = tfbs.layers.BlockSparseLSTM.from_dense_layer(lstm, 4)
    >>> np.allclose(sparse(x), lstm(x), rtol=1e-5, atol=1e-6)
    True
    """
    if not layer.built:
      raise ValueError(f"layer {layer.name} must be built (called once) first")
    kernel = np.asarray(layer.cell.kernel)
    recurrent = np.asarray(layer.cell.recurrent_kernel)
    bias = None if layer.cell.bias is None else np.asarray(layer.cell.bias)
    k_m = BlockSparseMatrix.from_dense(kernel, block_size) if sparse_kernel else None
    r_m = (BlockSparseMatrix.from_dense(recurrent, block_size)
           if sparse_recurrent else None)
    new = cls.from_config(cls.converted_config(layer, block_size, k_m, r_m))
    batch = None
    if layer.stateful and layer.input_spec and layer.input_spec[0].shape:
      batch = layer.input_spec[0].shape[0]  # stateful layers need it
    new.build(tf.TensorShape([batch, None, kernel.shape[0]]))
    new.assign_converted(kernel if k_m is None else k_m,
                         recurrent if r_m is None else r_m, bias)
    return new


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseSimpleRNN(_BlockSparseRNN):
  """tf_keras `SimpleRNN` with block-sparse weights and a fused time loop.

  Args:
    units: state width.
    activation: tf_keras activation (default tanh).
    use_bias: add a bias.
    block_size: int or `(bh, bw)` block shape of the sparse weights.
    kernel_blocks, recurrent_blocks: stored block counts of the kernel and
      the recurrent kernel; None keeps that weight dense unless `density`
      is given (then a fixed spread layout with that fraction of blocks).
    return_sequences, return_state, go_backwards, stateful: as in tf_keras.

  Example:

  >>> import numpy as np, tf_blocksparse as tfbs
  >>> rnn = tfbs.layers.BlockSparseSimpleRNN(32, block_size=16, density=0.5)
  >>> rnn(np.ones([2, 7, 8], np.float32)).shape
  TensorShape([2, 32])
  """

  CELL = BlockSparseSimpleRNNCell


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseGRU(_BlockSparseRNN):
  """tf_keras `GRU` with block-sparse weights and a fused time loop.

  Args as `BlockSparseSimpleRNN`, plus `recurrent_activation` and
  `reset_after` (tf_keras meaning; the bias is `[2, 3 * units]` when True).

  Example:

  >>> import numpy as np, tf_blocksparse as tfbs
  >>> gru = tfbs.layers.BlockSparseGRU(32, density=0.25, return_sequences=True)
  >>> gru(np.ones([2, 7, 8], np.float32)).shape
  TensorShape([2, 7, 32])
  """

  CELL = BlockSparseGRUCell


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class BlockSparseLSTM(_BlockSparseRNN):
  """tf_keras `LSTM` with block-sparse weights and a fused time loop.

  Args as `BlockSparseGRU`, plus `unit_forget_bias`; without `reset_after`.

  Example:

  >>> import numpy as np, tf_blocksparse as tfbs
  >>> lstm = tfbs.layers.BlockSparseLSTM(32, density=0.1, return_state=True)
  >>> out, h, c = lstm(np.ones([2, 7, 8], np.float32))
  >>> out.shape, c.shape
  (TensorShape([2, 32]), TensorShape([2, 32]))
  """

  CELL = BlockSparseLSTMCell


# Bare-name aliases for tf_keras' legacy wrapper deserialization (see the
# note at the end of block_sparse_dense.py).
for _cls in (BlockSparseSimpleRNN, BlockSparseGRU, BlockSparseLSTM,
             BlockSparseSimpleRNNCell, BlockSparseGRUCell, BlockSparseLSTMCell):
  tf_keras.utils.get_custom_objects().setdefault(_cls.__name__, _cls)
del _cls
