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
gradients are exactly those of the TF loop (higher orders included), at
the cost of a second forward pass when training. The gradient for the
recurrent block values is taken once for the whole sequence, one product
with M = time * batch, rather than once per step. Without the compiled
library the TF loop runs forward, with the same gradient; with an
activation that has no fused kernel (any callable) or a dtype other than
float32/float64, the TF loop runs and TF differentiates it directly.

Semantics follow `tf_keras.backend.rnn`: a masked step (mask False) keeps
the states and outputs the previous step's output (zeros with
`zero_output_for_mask`); `go_backwards` processes the last step first and
returns the outputs in processing order.

Contract (the fused op and the TF loop give the same result or fail with
the same message, eagerly and inside `tf.function`, also when shapes are
only known at run time):

* `x_proj` is `[batch, time, gates * units]`, every initial state
  `[batch, units]` (no broadcasting of a batch of 1), `mask`
  `[batch, time]` exactly; `recurrent_bias` has `3 * units` entries, or,
  when its length is unknown while tracing, may be empty (no bias).
  Violations raise `InvalidArgumentError` naming the shapes.
* The recurrent matrix follows `bsr_matmul`'s contract: a malformed
  layout fails even when no step runs; the padding of its edge blocks is
  ignored; blocks not stored are zeros.
* Empty dimensions: `time = 0` gives outputs `[batch, 0, units]` and the
  initial states; `batch = 0` gives empty outputs and states; `units = 0`
  gives empty features.
* NaN/Inf in `x_proj` or the states propagate through the cell math as in
  the TF loop. Gradients follow the same products: a GRU without
  `reset_after` multiplies `r * h` by U's candidate columns only, so a NaN
  or Inf in its z or r columns never reaches that product's gradient.
"""

import functools

import tensorflow as tf

from tf_blocksparse.bsr import validation
from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.ops import _loader
from tf_blocksparse.ops import fallback
from tf_blocksparse.ops.bsr_matmul import bsr_matmul

# Activations with a fused C++ version, by their tf_keras names.
FUSED_ACTIVATIONS = ("tanh", "sigmoid", "relu", "linear", "hard_sigmoid")
_KERNEL_DTYPES = (tf.float32, tf.float64)


def _hard_sigmoid(x):
  # tf_keras' definition, in the same order of operations.
  # (tf.constant: tf.cast(0.2, float64) would round 0.2 to float32 first.)
  return tf.clip_by_value(x * tf.constant(0.2, x.dtype) + tf.constant(0.5, x.dtype),
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

  Both paths follow the contract of this module's docstring (shapes
  checked at run time when unknown, padding ignored, empty dimensions).

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
    options = dict(mask=mask, go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)

    def loop(values, x, h, c, probes=(), row_ids=None):
      matrix = recurrent.with_values(values)
      step = _lstm_step(matrix, _activation_fn(activation),
                        _activation_fn(recurrent_activation))
      return _loop(step, x, [h, c], probes=probes, recurrent=matrix,
                   row_ids=row_ids, **options)

    def fused(lib, values, x, h, c):
      return lib.tfbs_bsr_lstm_sequence(
          x, h, c, _op_mask(mask), values, recurrent.col_indices,
          recurrent.row_ptr, _dense_shape(recurrent), activation=activation,
          recurrent_activation=recurrent_activation,
          go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask)

    checks = lambda: _runtime_checks(4, recurrent, x_proj, states, mask)
    out, h, c = _sequence(loop, fused, recurrent, [x_proj, *states], acts,
                          checks=checks)
    return out, h, c


def gru_sequence(x_proj, h0, recurrent, recurrent_bias=None, mask=None,
                 activation="tanh", recurrent_activation="sigmoid",
                 reset_after=True, go_backwards=False,
                 zero_output_for_mask=False, name=None):
  """Runs a GRU (tf_keras semantics) over a sequence; returns `(outputs, h)`.

  Both paths follow the contract of this module's docstring (shapes
  checked at run time when unknown, padding ignored, empty dimensions).

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
      if recurrent_bias.shape.rank != 1 or not recurrent_bias.shape.is_compatible_with(
          [3 * units]):
        raise _invalid(recurrent,
            f"recurrent_bias must have shape [{3 * units}], got "
            f"{recurrent_bias.shape}")
      if recurrent_bias.shape[0] is None:
        # Checked at run time (the op, or the loop's checks); an empty
        # vector means no bias there, as in the op.
        bias = recurrent_bias
        recurrent_bias = tf.cond(tf.equal(tf.size(bias), 0),
                                 lambda: tf.zeros([3 * units], bias.dtype),
                                 lambda: bias)
    acts = (activation, recurrent_activation)
    options = dict(mask=mask, go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)

    # Without reset_after a step has a second product, (r * h) @ U_h, whose
    # gradient must not meet U's z and r columns (0 * Inf there is NaN).
    units = recurrent.shape[0]
    columns = (0,) if reset_after else (0, 2 * units)

    def loop(values, x, h, *bias, probes=(), row_ids=None):
      matrix = recurrent.with_values(values)
      step = _gru_step(matrix, bias[0] if bias else None,
                       _activation_fn(activation),
                       _activation_fn(recurrent_activation), reset_after)
      return _loop(step, x, [h], probes=probes, recurrent=matrix,
                   row_ids=row_ids, product_columns=columns, **options)

    def fused(lib, values, x, h, *bias):
      return lib.tfbs_bsr_gru_sequence(
          x, h, _op_mask(mask), bias[0] if bias else tf.zeros([0], x.dtype),
          values, recurrent.col_indices, recurrent.row_ptr,
          _dense_shape(recurrent), activation=activation,
          recurrent_activation=recurrent_activation, reset_after=reset_after,
          go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask)

    inputs = [x_proj, *states]
    if recurrent_bias is not None:
      inputs.append(recurrent_bias)
    checks = lambda: _runtime_checks(3, recurrent, x_proj, states, mask,
                                     recurrent_bias)
    out, h = _sequence(loop, fused, recurrent, inputs, acts,
                       product_columns=columns, checks=checks)
    return out, h


def simple_rnn_sequence(x_proj, h0, recurrent, mask=None, activation="tanh",
                        go_backwards=False, zero_output_for_mask=False,
                        name=None):
  """Runs `h_t = activation(x_proj[:, t] + h_{t-1} @ U)`; returns `(outputs, h)`.

  Both paths follow the contract of this module's docstring (shapes
  checked at run time when unknown, padding ignored, empty dimensions).

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
    options = dict(mask=mask, go_backwards=go_backwards,
                   zero_output_for_mask=zero_output_for_mask)

    def loop(values, x, h, probes=(), row_ids=None):
      matrix = recurrent.with_values(values)
      step = _simple_step(matrix, _activation_fn(activation))
      return _loop(step, x, [h], probes=probes, recurrent=matrix,
                   row_ids=row_ids, **options)

    def fused(lib, values, x, h):
      return lib.tfbs_bsr_simple_rnn_sequence(
          x, h, _op_mask(mask), values, recurrent.col_indices,
          recurrent.row_ptr, _dense_shape(recurrent), activation=activation,
          go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask)

    checks = lambda: _runtime_checks(1, recurrent, x_proj, states, mask)
    out, h = _sequence(loop, fused, recurrent, [x_proj, *states],
                       (activation,), checks=checks)
    return out, h


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
  # The matrix's dimensions before anything is compared with them, as the
  # op orders its checks (a matrix built from checked layout variables
  # skipped `__validate__`).
  validation.check_dims(recurrent.shape, recurrent.block_size)
  units, width = recurrent.shape
  if width != gates * units:
    raise _invalid(recurrent,
        f"{kind}: the recurrent matrix must be [units, {gates} * units], got "
        f"[{units}, {width}]")
  if x_proj.dtype != recurrent.dtype:
    raise _invalid(recurrent,
        f"{kind}: x_proj has dtype {x_proj.dtype.name} but the recurrent "
        f"matrix holds {recurrent.dtype.name}")
  if x_proj.shape.rank != 3:
    raise _invalid(recurrent,
        f"{kind}: x_proj must have rank 3 [batch, time, {gates * units}], "
        f"got shape {x_proj.shape}")
  if x_proj.shape[2] is not None and x_proj.shape[2] != gates * units:
    raise _invalid(recurrent,
        f"{kind}: x_proj has {x_proj.shape[2]} features but {gates} gates of "
        f"{units} units need {gates * units}")
  checked = []
  for i, state in enumerate(states):
    state = tf.convert_to_tensor(state, x_proj.dtype)
    expected = tf.TensorShape([x_proj.shape[0], units])
    if state.shape.rank != 2 or not state.shape.is_compatible_with(expected):
      raise _invalid(recurrent,
          f"{kind}: initial state {i} must have shape [batch, units] = "
          f"{expected.as_list()}, got {state.shape}")
    checked.append(state)
  if mask is not None:
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
      mask = tf.cast(mask, tf.bool)
    if mask.shape.rank != 2 or not mask.shape.is_compatible_with(
        x_proj.shape[:2]):
      raise _invalid(recurrent,
          f"{kind}: mask must have shape [batch, time] = "
          f"{x_proj.shape[:2].as_list()}, got {mask.shape}")
  return x_proj, checked, mask


def _invalid(recurrent, message):
  """The error for a static check; a broken layout is reported first, as the
  op orders its checks (only on this error path: the static checks of the
  matrix cost time on every call)."""
  validation.check_matrix(recurrent)
  return validation.invalid(message)


def _runtime_checks(gates, recurrent, x_proj, states, mask, bias=None):
  """The op's shape checks, as graph assertions for the TF loop.

  The shapes only where a dimension is unknown while tracing (the static
  checks above cover the rest), with the op's messages and in its order: a
  TF loop would otherwise broadcast a state or mask of batch 1, or accept a
  longer mask. Returns `(control dependencies, row ids)`: the row id of
  each block, valid once the layout checks passed (for the loop's products,
  which then need no checks of their own).
  """
  units, width = recurrent.shape
  # The loop only multiplies inside its steps: with no step (time or batch
  # 0) nothing would check the layout, which the op always checks.
  layout = lambda: validation.structure_assertions(
      validation.num_blocks(recurrent.values), recurrent.col_indices, recurrent.row_ptr,
      recurrent.shape, recurrent.block_size)
  tensors = [x_proj, *states] + [t for t in (mask, bias) if t is not None]
  if all(t.shape.is_fully_defined() for t in tensors):
    row_ids = layout()
    return [row_ids], row_ids
  xs = tf.shape(x_proj, out_type=tf.int64)
  h0 = tf.shape(states[0], out_type=tf.int64)
  fmt = validation.fmt
  # A condition whose dimensions are all known while tracing held there:
  # it is left out of the graph (every exported call would carry it).
  static = lambda *ts: all(t.shape.is_fully_defined() for t in ts)
  conditions = []
  if states[0].shape[0] is None or x_proj.shape[0] is None:
    conditions.append(
        (tf.equal(h0[0], xs[0]),
         lambda: fmt("initial state h0 has batch size {} but x_proj has {}",
                     h0[0], xs[0])))
  if states[0].shape[1] is None or x_proj.shape[2] is None:
    conditions.append(
        (tf.equal(xs[2], gates * h0[1]),
         lambda: fmt("x_proj has {} columns but " f"{gates}" " gates of {} "
                     "units need {}", xs[2], h0[1], gates * h0[1])))
  if len(states) > 1 and states[1] is not states[0] and not (
      static(*states[:2]) and states[0].shape == states[1].shape):
    c0 = tf.shape(states[1], out_type=tf.int64)
    conditions.append(
        (tf.reduce_all(tf.equal(c0, h0)),
         lambda: tf.strings.join([
             "initial state c0 must have the shape of h0 ",
             validation.shape_string(h0), ", got ", validation.shape_string(c0)])))
  if mask is not None and not (static(mask) and x_proj.shape[:2].is_fully_defined()):
    ms = tf.shape(mask, out_type=tf.int64)
    conditions.append(
        (tf.reduce_all(tf.equal(ms, xs[:2])),
         lambda: tf.strings.join([
             fmt("mask must have shape [batch, time] = [{}, {}] or be empty, "
                 "got ", xs[0], xs[1]), validation.shape_string(ms)])))
  if bias is not None and (bias.shape[0] is None or states[0].shape[1] is None):
    bs = tf.shape(bias, out_type=tf.int64)
    conditions.append(
        (tf.equal(bs[0], gates * h0[1]),
         lambda: tf.strings.join([
             fmt("recurrent_bias must have shape [{}] or be empty, got ",
                 gates * h0[1]), validation.shape_string(bs)])))
  with tf.control_dependencies(
      [c for c in [validation.first_failure(conditions)] if c is not None]):
    row_ids = layout()
  if states[0].shape[1] is not None:   # == units, checked while tracing
    return [row_ids], row_ids
  with tf.control_dependencies([row_ids]):
    units_ok = validation.check(
        tf.equal(h0[1], units),
        lambda: fmt("the recurrent matrix must be [units, " f"{gates}"
                    " * units] = [{}, {}], got " f"[{units}, {width}]",
                    h0[1], gates * h0[1]))
  with tf.control_dependencies([units_ok]):
    return [units_ok], tf.identity(row_ids)


def _fusable(dtype, activations):
  return dtype in _KERNEL_DTYPES and all(
      isinstance(a, str) and a in FUSED_ACTIVATIONS for a in activations)


def _fused_library(dtype, activations):
  return _loader.library() if _fusable(dtype, activations) else None


def _op_mask(mask):
  return tf.zeros([0], tf.bool) if mask is None else mask


def _dense_shape(matrix):
  return tf.constant(matrix.shape, tf.int64)


def _flat(result):
  outputs, states = result[:2]
  return (outputs, *states)


# --- running and differentiating a sequence -----------------------------------


def _sequence(loop, fused, recurrent, inputs, activations, product_columns=(0,),
              checks=None):
  """Runs `fused(lib, values, *inputs)`, or the TF `loop` without the library.

  `loop(values, *inputs, probes=())` is the differentiable recurrence (see
  `_loop`); `product_columns` has, for each recurrent product of a step,
  the first column of the matrix it uses (see `_loop`);
  `checks()` gives the run-time shape checks the loop needs (the op makes
  its own) and the checked row ids the loop multiplies with. Returns
  `(outputs, *final_states)`.
  """
  values = tf.convert_to_tensor(recurrent.values)
  fusable = _fusable(values.dtype, activations)
  lib = _loader.library() if fusable else None
  if lib is None and checks is not None:
    deps, row_ids = checks()
    with tf.control_dependencies(deps):
      inputs = [tf.identity(inputs[0]), *inputs[1:]]
    loop = functools.partial(loop, row_ids=row_ids)
  if not fusable:
    # A callable (which may hold variables) or a half type: plain autodiff.
    return _flat(loop(values, *inputs))
  if lib is None:
    forward = lambda *args: _flat(loop(*args))
  else:
    forward = lambda *args: fused(lib, *args)
  return _with_sequence_gradient(forward, loop, recurrent, values, inputs,
                                 product_columns, custom=lib is not None)


def _with_sequence_gradient(forward, loop, recurrent, values, inputs,
                            product_columns, custom):
  """Runs `forward(values, *inputs)`, with the gradient of the TF `loop`.

  Differentiating every step's product for the block values would run one
  values-gradient over all blocks per step, with M = batch. Instead the
  recomputed loop adds a zero probe to each product (the probes' gradients
  are then the products' upstream gradients dZ_t) and records each
  product's left operand, and the tape does not watch the values (graph
  mode then prunes the per-step values-gradient ops; eager mode still runs
  them); the values gradient is one product over the whole sequence,
  `lhs^T dZ` with M = products * time * batch. Nothing is stopped, so an
  outer tape still sees the whole computation (higher derivatives).
  """

  @tf.custom_gradient
  def run(values, *inputs):
    results = forward(values, *inputs)

    def grad(*upstream):
      upstream = [tf.zeros_like(r) if u is None else u
                  for u, r in zip(upstream, results)]
      # After the forward pass (and so after its checks): a malformed input
      # then fails with the forward's message, not inside the recomputed
      # loop running alongside it.
      with tf.control_dependencies(upstream):
        inputs_after = [tf.identity(t) for t in inputs]
      # The path the forward pass took, even if the gradient is taken
      # outside its `use_custom_ops` block.
      with _loader.use_custom_ops(custom):
        return _sequence_grads(loop, recurrent.with_values(values),
                               inputs_after, upstream, product_columns)

    return tuple(results), grad

  return run(values, *inputs)


def _sequence_grads(loop, matrix, inputs, upstream, product_columns):
  """Gradients `[d values, *d inputs]` of `loop`'s results for `upstream`."""
  x = inputs[0]
  units, width = matrix.shape
  probe_shape = [tf.shape(x)[1], tf.shape(x)[0], width]  # [time, batch, N]
  probes = [tf.zeros(probe_shape, x.dtype) for _ in product_columns]
  with tf.GradientTape() as tape:
    tape.watch([inputs, probes])
    outputs, states, taps = loop(matrix.values, *inputs, probes=probes)
  grads = tape.gradient(_flat((outputs, states)), [*inputs, *probes],
                        output_gradients=upstream,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  d_products = [_rows(g, width) for g in grads[len(inputs):]]
  lhs = [_rows(t, units) for t in taps]
  # The products over the whole matrix in one values gradient; one that
  # uses columns from c only adds to the entries there (its lhs may hold
  # NaN or Inf, which must not reach the other entries as NaN * 0).
  whole = [k for k, c in enumerate(product_columns) if c == 0]
  d_values = _values_grad(tf.concat([lhs[k] for k in whole], axis=0),
                          tf.concat([d_products[k] for k in whole], axis=0),
                          matrix)
  for k, c in enumerate(product_columns):
    if c != 0:
      part = _values_grad(lhs[k], d_products[k], matrix)
      d_values += tf.where(_columns_from(matrix, c), part, tf.zeros_like(part))
  return [d_values, *grads[:len(inputs)]]


def _columns_from(matrix, first_column):
  """Which entries of `matrix.values` lie in columns >= first_column."""
  bw = matrix.block_size[1]
  cols = (tf.cast(matrix.col_indices, tf.int64)[:, None] * bw +
          tf.range(bw, dtype=tf.int64)[None, :])
  return tf.broadcast_to((cols >= first_column)[:, None, :],
                         tf.shape(matrix.values))


def _from_column(matrix, first_column):
  """`matrix` with its entries left of `first_column` stored as zeros."""
  values = tf.convert_to_tensor(matrix.values)
  return matrix.with_values(tf.where(_columns_from(matrix, first_column),
                                     values, tf.zeros_like(values)))


def _rows(t, cols):
  """`t [..., cols]` as `[rows, cols]`, counting the rows (`[-1, 0]` would
  make one row out of none)."""
  return tf.reshape(t, tf.stack([tf.reduce_prod(tf.shape(t)[:-1]), cols]))


def _values_grad(x, dy, matrix):
  """d(x @ W)/d values for the upstream `dy`, `[nnzb, bh, bw]`."""
  lib = _loader.library()
  if lib is None or _dense_is_faster(matrix, _DENSE_VALUES_GRAD_MIN_DENSITY):
    return fallback.bsr_values_grad_2d(x, dy, matrix)
  return lib.tfbs_bsr_matmul_values_grad(x, dy, matrix.values,
                                         matrix.col_indices, matrix.row_ptr,
                                         _dense_shape(matrix))


def _recomputed_product(matrix, row_ids=None):
  """`lhs -> lhs @ matrix` for the loop that the gradient differentiates."""
  if _dense_is_faster(matrix, _DENSE_STEPS_MIN_DENSITY):
    dense = matrix.to_dense()
    return lambda lhs: tf.matmul(lhs, dense)
  return _step_product(matrix, row_ids)


def _step_product(matrix, row_ids):
  """`lhs -> lhs @ matrix` for the steps of one loop: with the layout
  checked before the loop (`row_ids`) and no compiled library, the pure-TF
  product without checks of its own; else `bsr_matmul`."""
  if row_ids is not None and _loader.library() is None:
    return fallback.checked_product(matrix, row_ids)
  return lambda lhs: bsr_matmul(lhs, matrix)


# Where one dense GEMM beats the BSR kernels, by the fraction of blocks
# stored; measured on 2 CPU cores (1024 x 3072 and 1024 x 4096, 16 x 16
# blocks), revisit when the kernels change. The values gradient over a
# sequence (M = batch * time): the compiled kernel runs at about 1/2 to 1/4
# of the rate of a dense `x^T dy`, so the dense product wins above ~30 %.
_DENSE_VALUES_GRAD_MIN_DENSITY = 0.3
# One step's `h @ U` and `dz @ U^T` (M = batch): dense wins above ~70 %
# (at 100 %, the layers' dense recurrent kernels, it takes half the time).
_DENSE_STEPS_MIN_DENSITY = 0.75
# The dense route needs a [K, N] temporary: not for very large matrices.
_DENSE_MAX_SIZE = 1 << 26


def _dense_is_faster(matrix, min_density):
  (k, n), nnzb = matrix.shape, matrix.values.shape[0]
  if nnzb is None or k * n > _DENSE_MAX_SIZE:
    return False
  nbr, nbc = matrix.block_grid
  return nnzb >= min_density * nbr * nbc


# --- the differentiable TF loop -----------------------------------------------


def _loop(step, x_proj, states, mask, go_backwards, zero_output_for_mask,
          probes=(), recurrent=None, row_ids=None, product_columns=(0,)):
  """`tf_keras.backend.rnn` semantics over projected inputs; returns
  `(outputs [batch, time, units], final states)`.

  A step calls `product(lhs)` or `product(lhs, c)` (c in
  `product_columns`): the latter multiplies with the matrix's columns from
  c only (the others stored as zeros), so that its gradient never meets
  the values there.

  With `probes` (one `[time, batch, N]` tensor per recurrent product of a
  step, in processing order) each product `lhs @ recurrent` gets
  `probes[k][t]` added and its `lhs` is recorded: then also returns these,
  `[time, batch, K]` each.
  """
  xs = tf.transpose(x_proj, [1, 0, 2])
  ms = None if mask is None else tf.transpose(mask, [1, 0])
  if go_backwards:
    xs = tf.reverse(xs, [0])
    ms = None if ms is None else tf.reverse(ms, [0])
  time = tf.shape(xs)[0]
  # Steps read their slices from TensorArrays: the gradient of a slice
  # `xs[t]` taken inside the loop is a dense [time, ...] tensor per step.
  x_ta = _unstacked(xs)
  probe_tas = [_unstacked(p) for p in probes]
  make = _recomputed_product if probes else _step_product
  # Built before the loop: ops made while tracing its body run every step.
  products = {c: make(recurrent if c == 0 else _from_column(recurrent, c),
                      row_ids) for c in product_columns}
  product = lambda lhs, first_column=0: products[first_column](lhs)
  out_ta, *tap_tas = [
      tf.TensorArray(x_proj.dtype, size=time, element_shape=states[0].shape)
      for _ in range(1 + len(probes))]
  prev_out = tf.zeros_like(states[0])

  def body(t, out_ta, prev_out, states, tap_tas):
    taps = []

    def probed_product(lhs, first_column=0):
      taps.append(lhs)
      return product(lhs, first_column) + probe_tas[len(taps) - 1].read(t)

    out, new_states = step(x_ta.read(t), states,
                           probed_product if probes else product)
    if len(taps) != len(probes):
      raise AssertionError(f"{len(taps)} recurrent products in a step, "
                           f"{len(probes)} probes")
    if ms is not None:
      keep = ms[t][:, None]
      new_states = [tf.where(keep, n, o) for n, o in zip(new_states, states)]
      fill = tf.zeros_like(out) if zero_output_for_mask else prev_out
      out = tf.where(keep, out, fill)
    tap_tas = [ta.write(t, lhs) for ta, lhs in zip(tap_tas, taps)]
    return t + 1, out_ta.write(t, out), out, new_states, tap_tas

  _, out_ta, _, states, tap_tas = tf.while_loop(
      lambda t, *_: t < time, body,
      (0, out_ta, prev_out, list(states), tap_tas))
  outputs = tf.transpose(_stack(out_ta, time, states[0]), [1, 0, 2])
  if probes:
    return outputs, states, [_stack(ta, time, states[0]) for ta in tap_tas]
  return outputs, states


def _stack(ta, time, like):
  """`ta.stack()`, also for no steps with an element shape known only at
  run time (TensorArray cannot stack an empty list of unknown shape)."""
  if like.shape.is_fully_defined():
    return ta.stack()
  empty = lambda: tf.zeros(tf.concat([[0], tf.shape(like)], 0), like.dtype)
  return tf.cond(time > 0, ta.stack, empty)


def _unstacked(tensor):
  return tf.TensorArray(tensor.dtype, size=tf.shape(tensor)[0],
                        element_shape=tensor.shape[1:]).unstack(tensor)


def _product(recurrent, product):
  """`product`, or by default `lhs @ recurrent` (also for a product over
  columns from c: the step keeps only those, and the default serves steps
  that are run, not differentiated over a sequence)."""
  return product or (lambda lhs, first_column=0: bsr_matmul(lhs, recurrent))


def _lstm_step(recurrent, activation, recurrent_activation):
  def step(x_t, states, product=None):
    product = _product(recurrent, product)
    h, c = states
    z = x_t + product(h)
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
    c = (recurrent_activation(z_f) * c
         + recurrent_activation(z_i) * activation(z_c))
    h = recurrent_activation(z_o) * activation(c)
    return h, [h, c]
  return step


def _gru_step(recurrent, recurrent_bias, activation, recurrent_activation,
              reset_after):
  units = recurrent.shape[0]

  def step(x_t, states, product=None):
    product = _product(recurrent, product)
    (h,) = states
    x_z, x_r, x_h = tf.split(x_t, 3, axis=1)
    inner = product(h)
    if recurrent_bias is not None:
      inner = inner + recurrent_bias
    r_z, r_r, r_h = tf.split(inner, 3, axis=1)
    z = recurrent_activation(x_z + r_z)
    r = recurrent_activation(x_r + r_r)
    if reset_after:
      hh = activation(x_h + r * r_h)
    else:
      # (r * h) @ U_h: a product with the h columns of U, kept.
      hh = activation(x_h + product(r * h, 2 * units)[:, 2 * units:])
    h = z * h + (1 - z) * hh
    return h, [h]
  return step


def _simple_step(recurrent, activation):
  def step(x_t, states, product=None):
    product = _product(recurrent, product)
    (h,) = states
    h = activation(x_t + product(h))
    return h, [h]
  return step
