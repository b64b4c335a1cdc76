"""Fused block-sparse recurrences over a whole sequence (LSTM, GRU, SimpleRNN).

Each function takes the input projection of all timesteps, `x_proj =
x @ W + bias` of shape `[batch, time, gates * units]` (computed before, as
one matmul with M = batch * time: the cuDNN paper's first rule), the
initial state(s) and the recurrent matrix `U [units, gates * units]` as a
`BlockSparseMatrix` in the tf_keras gate order (LSTM i, f, c, o; GRU z, r,
h). The compiled ops run the time loop in C++: per step one BSR product
`h @ U` for all gates and one fused pass of gate math and state update.

Gradients: the compiled ops have no backward kernel. Their gradient is
defined (`tf.custom_gradient`) by recomputing the same recurrence as a
differentiable TF loop of `bsr_matmul` steps and differentiating that, so
gradients are exactly those of the TF loop, at the cost of a second
forward pass when training. Without the compiled library, with an
activation that has no fused kernel (any callable) or a dtype other than
float32/float64, the TF loop runs directly.

Semantics follow `tf_keras.backend.rnn`: a masked step (mask False) keeps
the states and outputs the previous step's output (zeros with
`zero_output_for_mask`); `go_backwards` processes the last step first and
returns the outputs in processing order.
"""

import tensorflow as tf

from tf_blocksparse.bsr import validation
from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.ops import _loader
from tf_blocksparse.ops.bsr_matmul import bsr_matmul

# Activations with a fused C++ version, by their tf_keras names.
FUSED_ACTIVATIONS = ("tanh", "sigmoid", "relu", "linear", "hard_sigmoid")
_KERNEL_DTYPES = (tf.float32, tf.float64)


def _hard_sigmoid(x):
  # tf_keras' definition, in the same order of operations.
  return tf.clip_by_value(x * tf.cast(0.2, x.dtype) + tf.cast(0.5, x.dtype),
                          0.0, 1.0)


_TF_ACTIVATIONS = {
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
    "relu": tf.nn.relu,
    "linear": tf.identity,
    "hard_sigmoid": _hard_sigmoid,
}


def _activation_fn(activation):
  if callable(activation):
    return activation
  if activation not in _TF_ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; pass one of "
                     f"{', '.join(FUSED_ACTIVATIONS)} or a callable")
  return _TF_ACTIVATIONS[activation]


def lstm_sequence(x_proj, h0, c0, recurrent, mask=None, activation="tanh",
                  recurrent_activation="sigmoid", go_backwards=False,
                  zero_output_for_mask=False, name=None):
  """Runs an LSTM over a sequence; returns `(outputs, h, c)`.

  Args:
    x_proj: `[batch, time, 4 * units]`, `x @ kernel + bias` for every step.
    h0, c0: `[batch, units]` initial states.
    recurrent: `BlockSparseMatrix` `[units, 4 * units]` (gates i, f, c, o).
    mask: optional bool `[batch, time]`; False marks a padded step.
    activation, recurrent_activation: a name in `FUSED_ACTIVATIONS`
      (fused kernel) or any callable (TF loop).
    go_backwards: process the sequence from the last step.
    zero_output_for_mask: output zeros (instead of the previous output) at
      masked steps.
    name: optional name scope.

  Returns:
    `outputs [batch, time, units]` (in processing order), final `h`, `c`.

  Example:

  >>> import numpy as np, tensorflow as tf, tf_blocksparse as tfbs
  >>> u = np.kron(np.eye(2), np.ones([4, 16]) * 0.1).astype(np.float32)
  >>> rec = tfbs.BlockSparseMatrix.from_dense(u, block_size=4)   # [8, 32]
  >>> x = tf.random.normal([2, 5, 32]); h0 = c0 = tf.zeros([2, 8])
  >>> out, h, c = tfbs.ops.lstm_sequence(x, h0, c0, rec)
  >>> out.shape, np.allclose(out[:, -1], h)
  (TensorShape([2, 5, 8]), True)
  """
  with tf.name_scope(name or "bsr_lstm_sequence"):
    x_proj, states, mask = _check_inputs("lstm", 4, x_proj, [h0, c0],
                                         recurrent, mask)
    acts = (activation, recurrent_activation)
    options = dict(go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)
    lib = _fused_library(x_proj.dtype, acts)

    def reference(x, h, c, values):
      step = _lstm_step(recurrent.with_values(values),
                        _activation_fn(activation),
                        _activation_fn(recurrent_activation))
      return _loop(step, x, [h, c], mask, **options)

    if lib is None:
      out, (h, c) = reference(x_proj, *states, recurrent.values)
      return out, h, c

    def fused(x, h, c, values):
      return lib.tfbs_bsr_lstm_sequence(
          x, h, c, _op_mask(mask), values, recurrent.col_indices,
          recurrent.row_ptr, _dense_shape(recurrent), activation=activation,
          recurrent_activation=recurrent_activation, **options)

    return _with_reference_gradient(
        fused, lambda *a: _flat(reference(*a)),
        [x_proj, *states, tf.convert_to_tensor(recurrent.values)])


def gru_sequence(x_proj, h0, recurrent, recurrent_bias=None, mask=None,
                 activation="tanh", recurrent_activation="sigmoid",
                 reset_after=True, go_backwards=False,
                 zero_output_for_mask=False, name=None):
  """Runs a GRU (tf_keras semantics) over a sequence; returns `(outputs, h)`.

  Args:
    x_proj: `[batch, time, 3 * units]`, `x @ kernel + input_bias`.
    h0: `[batch, units]` initial state.
    recurrent: `BlockSparseMatrix` `[units, 3 * units]` (gates z, r, h).
    recurrent_bias: optional `[3 * units]`, added to `h @ U` (the second
      row of a tf_keras `reset_after` GRU bias).
    mask, activation, recurrent_activation, go_backwards,
    zero_output_for_mask, name: as in `lstm_sequence`.
    reset_after: tf_keras' `reset_after`: apply the reset gate after the
      recurrent product (True) or to `h` before it (False).

  Returns:
    `outputs [batch, time, units]` and the final state `h`.

  Example:

  >>> import numpy as np, tensorflow as tf, tf_blocksparse as tfbs
  >>> rec = tfbs.BlockSparseMatrix.from_dense(np.eye(4, 12, dtype=np.float32), 4)
  >>> out, h = tfbs.ops.gru_sequence(tf.ones([1, 3, 12]), tf.zeros([1, 4]), rec)
  >>> out.shape
  TensorShape([1, 3, 4])
  """
  with tf.name_scope(name or "bsr_gru_sequence"):
    x_proj, states, mask = _check_inputs("gru", 3, x_proj, [h0], recurrent,
                                         mask)
    units = recurrent.shape[0]
    if recurrent_bias is not None:
      recurrent_bias = tf.convert_to_tensor(recurrent_bias, x_proj.dtype)
      if recurrent_bias.shape.rank != 1 or recurrent_bias.shape[0] != 3 * units:
        raise validation.invalid(
            f"recurrent_bias must have shape [{3 * units}], got "
            f"{recurrent_bias.shape}")
    acts = (activation, recurrent_activation)
    options = dict(go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)
    lib = _fused_library(x_proj.dtype, acts)
    has_bias = recurrent_bias is not None

    def reference(x, h, values, *bias):
      step = _gru_step(recurrent.with_values(values), bias[0] if bias else None,
                       _activation_fn(activation),
                       _activation_fn(recurrent_activation), reset_after)
      return _loop(step, x, [h], mask, **options)

    diff = [x_proj, *states, tf.convert_to_tensor(recurrent.values)]
    if has_bias:
      diff.append(recurrent_bias)
    if lib is None:
      out, (h,) = reference(*diff)
      return out, h

    def fused(x, h, values, *bias):
      return lib.tfbs_bsr_gru_sequence(
          x, h, _op_mask(mask), bias[0] if bias else tf.zeros([0], x.dtype),
          values, recurrent.col_indices, recurrent.row_ptr,
          _dense_shape(recurrent), activation=activation,
          recurrent_activation=recurrent_activation, reset_after=reset_after,
          **options)

    return _with_reference_gradient(fused, lambda *a: _flat(reference(*a)),
                                    diff)


def simple_rnn_sequence(x_proj, h0, recurrent, mask=None, activation="tanh",
                        go_backwards=False, zero_output_for_mask=False,
                        name=None):
  """Runs `h_t = activation(x_proj[:, t] + h_{t-1} @ U)`; returns `(outputs, h)`.

  Arguments as in `lstm_sequence`, with `recurrent` `[units, units]`.

  Example:

  >>> import numpy as np, tensorflow as tf, tf_blocksparse as tfbs
  >>> rec = tfbs.BlockSparseMatrix.from_dense(np.eye(4, dtype=np.float32), 2)
  >>> out, h = tfbs.ops.simple_rnn_sequence(tf.ones([1, 2, 4]), tf.zeros([1, 4]),
  ...                                       rec, activation="linear")
  >>> out.numpy()[0, :, 0].tolist()
  [1.0, 2.0]
  """
  with tf.name_scope(name or "bsr_simple_rnn_sequence"):
    x_proj, states, mask = _check_inputs("simple_rnn", 1, x_proj, [h0],
                                         recurrent, mask)
    options = dict(go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)
    lib = _fused_library(x_proj.dtype, (activation,))

    def reference(x, h, values):
      step = _simple_step(recurrent.with_values(values),
                          _activation_fn(activation))
      return _loop(step, x, [h], mask, **options)

    if lib is None:
      out, (h,) = reference(x_proj, *states, recurrent.values)
      return out, h

    def fused(x, h, values):
      return lib.tfbs_bsr_simple_rnn_sequence(
          x, h, _op_mask(mask), values, recurrent.col_indices,
          recurrent.row_ptr, _dense_shape(recurrent), activation=activation,
          **options)

    return _with_reference_gradient(
        fused, lambda *a: _flat(reference(*a)),
        [x_proj, *states, tf.convert_to_tensor(recurrent.values)])


def fused_kernels_available(dtype=tf.float32, activations=("tanh", "sigmoid")):
  """True when the sequence ops run the compiled kernel for these settings."""
  return _fused_library(tf.as_dtype(dtype), activations) is not None


# --- checks -----------------------------------------------------------------


def _check_inputs(kind, gates, x_proj, states, recurrent, mask):
  if not isinstance(recurrent, BlockSparseMatrix):
    raise TypeError("recurrent must be a BlockSparseMatrix, got "
                    f"{type(recurrent).__name__}")
  if isinstance(x_proj, tf.RaggedTensor):
    raise validation.invalid(
        f"{kind}: ragged inputs are not supported; pad them "
        "(`inputs.to_tensor()`) and pass a mask")
  x_proj = tf.convert_to_tensor(x_proj)
  units, width = recurrent.shape
  if width != gates * units:
    raise validation.invalid(
        f"{kind}: the recurrent matrix must be [units, {gates} * units], got "
        f"[{units}, {width}]")
  if x_proj.dtype != recurrent.dtype:
    raise validation.invalid(
        f"{kind}: x_proj has dtype {x_proj.dtype.name} but the recurrent "
        f"matrix holds {recurrent.dtype.name}")
  if x_proj.shape.rank != 3:
    raise validation.invalid(
        f"{kind}: x_proj must have rank 3 [batch, time, {gates * units}], "
        f"got shape {x_proj.shape}")
  if x_proj.shape[2] is not None and x_proj.shape[2] != gates * units:
    raise validation.invalid(
        f"{kind}: x_proj has {x_proj.shape[2]} features but {gates} gates of "
        f"{units} units need {gates * units}")
  checked = []
  for i, state in enumerate(states):
    state = tf.convert_to_tensor(state, x_proj.dtype)
    expected = tf.TensorShape([x_proj.shape[0], units])
    if state.shape.rank != 2 or not state.shape.is_compatible_with(expected):
      raise validation.invalid(
          f"{kind}: initial state {i} must have shape [batch, units] = "
          f"{expected.as_list()}, got {state.shape}")
    checked.append(state)
  if mask is not None:
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
      mask = tf.cast(mask, tf.bool)
    if mask.shape.rank != 2 or not mask.shape.is_compatible_with(
        x_proj.shape[:2]):
      raise validation.invalid(
          f"{kind}: mask must have shape [batch, time] = "
          f"{x_proj.shape[:2].as_list()}, got {mask.shape}")
  return x_proj, checked, mask


def _fused_library(dtype, activations):
  if dtype not in _KERNEL_DTYPES:
    return None
  if not all(isinstance(a, str) and a in FUSED_ACTIVATIONS for a in activations):
    return None
  return _loader.library()


def _op_mask(mask):
  return tf.zeros([0], tf.bool) if mask is None else mask


def _dense_shape(matrix):
  return tf.constant(matrix.shape, tf.int64)


def _flat(result):
  outputs, states = result
  return (outputs, *states)


# --- gradient through the TF loop ---------------------------------------------


def _with_reference_gradient(fused, reference, inputs):
  """Runs `fused(*inputs)`; its gradient is that of `reference(*inputs)`."""

  @tf.custom_gradient
  def run(*args):
    results = fused(*args)

    def grad(*upstream):
      upstream = [tf.zeros_like(r) if u is None else u
                  for u, r in zip(upstream, results)]
      with tf.GradientTape() as tape:
        tape.watch(args)
        recomputed = reference(*args)
      return tape.gradient(recomputed, args, output_gradients=upstream,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return tuple(results), grad

  return run(*inputs)


# --- the differentiable TF loop -----------------------------------------------


def _loop(step, x_proj, states, mask, go_backwards, zero_output_for_mask):
  """`tf_keras.backend.rnn` semantics over projected inputs; returns
  `(outputs [batch, time, units], final states)`."""
  xs = tf.transpose(x_proj, [1, 0, 2])
  ms = None if mask is None else tf.transpose(mask, [1, 0])
  if go_backwards:
    xs = tf.reverse(xs, [0])
    ms = None if ms is None else tf.reverse(ms, [0])
  time = tf.shape(xs)[0]
  out_ta = tf.TensorArray(x_proj.dtype, size=time, element_shape=states[0].shape)
  prev_out = tf.zeros_like(states[0])

  def body(t, out_ta, prev_out, states):
    out, new_states = step(xs[t], states)
    if ms is not None:
      keep = ms[t][:, None]
      new_states = [tf.where(keep, n, o) for n, o in zip(new_states, states)]
      fill = tf.zeros_like(out) if zero_output_for_mask else prev_out
      out = tf.where(keep, out, fill)
    return t + 1, out_ta.write(t, out), out, new_states

  _, out_ta, _, states = tf.while_loop(
      lambda t, *_: t < time, body, (0, out_ta, prev_out, list(states)))
  outputs = tf.transpose(out_ta.stack(), [1, 0, 2])
  return outputs, states


def _lstm_step(recurrent, activation, recurrent_activation):
  def step(x_t, states):
    h, c = states
    z = x_t + bsr_matmul(h, recurrent)
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
    c = (recurrent_activation(z_f) * c
         + recurrent_activation(z_i) * activation(z_c))
    h = recurrent_activation(z_o) * activation(c)
    return h, [h, c]
  return step


def _gru_step(recurrent, recurrent_bias, activation, recurrent_activation,
              reset_after):
  units = recurrent.shape[0]

  def step(x_t, states):
    (h,) = states
    x_z, x_r, x_h = tf.split(x_t, 3, axis=1)
    inner = bsr_matmul(h, recurrent)
    if recurrent_bias is not None:
      inner = inner + recurrent_bias
    r_z, r_r, r_h = tf.split(inner, 3, axis=1)
    z = recurrent_activation(x_z + r_z)
    r = recurrent_activation(x_r + r_r)
    if reset_after:
      hh = activation(x_h + r * r_h)
    else:
      # (r * h) @ U_h: the product over all gates, keeping the h columns.
      hh = activation(x_h + bsr_matmul(r * h, recurrent)[:, 2 * units:])
    h = z * h + (1 - z) * hh
    return h, [h]
  return step


def _simple_step(recurrent, activation):
  def step(x_t, states):
    (h,) = states
    h = activation(x_t + bsr_matmul(h, recurrent))
    return h, [h]
  return step
