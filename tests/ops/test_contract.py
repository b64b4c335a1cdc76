"""One contract for both paths: each edge case runs on every path (each CPU
ISA of the compiled ops, and the pure-TF fallback) and must give the numpy
reference's result, or fail with the same message on all of them.

The contract is written in the `bsr_matmul` and sequence docstrings:
padding ignored, non-stored blocks structural zeros, empty dimensions, and
run-time checks where shapes are unknown while tracing.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from bsr_testing import PATHS
from bsr_testing import core_message
from bsr_testing import numpy_rnn
from bsr_testing import path_scope

F32 = tf.float32
ANY2 = tf.TensorSpec([None, None])
ANY3 = tf.TensorSpec([None, None, None])


def outcomes(fn):
  """{path: ("ok", [arrays]) or ("error", message)} of `fn()` on each path."""
  found = {}
  for path in PATHS:
    try:
      with path_scope(path):
        result = fn()
      result = result if isinstance(result, (list, tuple)) else [result]
      found[path] = ("ok", [np.asarray(r) for r in result])
    except tf.errors.InvalidArgumentError as e:
      found[path] = ("error", core_message(e))
  return found


def assert_error_everywhere(fn, message):
  for path, (kind, detail) in outcomes(fn).items():
    assert kind == "error", f"{path}: no error, expected {message!r}"
    assert detail == message, f"{path}: {detail!r} != {message!r}"


def assert_result_everywhere(fn, *want, atol=1e-5):
  for path, (kind, got) in outcomes(fn).items():
    assert kind == "ok", f"{path}: {got}"
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert g.shape == np.shape(w), f"{path}: shape {g.shape} != {np.shape(w)}"
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol, equal_nan=True,
                                 err_msg=path)


def _matrix(dense, block):
  return tfbs.BlockSparseMatrix.from_dense(np.asarray(dense, np.float32), block)


def _unchecked(values, cols, ptr, shape):
  """A matrix whose layout nobody checked (as a layer's variables could be)."""
  return tfbs.BlockSparseMatrix._from_checked_layout(  # pylint: disable=protected-access
      tf.constant(values, F32), tf.constant(cols, tf.int32),
      tf.constant(ptr, tf.int32), shape)


def _dynamic_matmul(shape, block):
  """bsr_matmul in a tf.function where every shape but the block's is unknown."""
  specs = [tf.TensorSpec(None), tf.TensorSpec([None, *block]),
           tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)]

  @tf.function(input_signature=specs)
  def f(x, values, cols, ptr):
    return tfbs.ops.bsr_matmul(x, tfbs.BlockSparseMatrix(values, cols, ptr, shape))
  return f


# --- padding, NaN and Inf ---------------------------------------------------------


def test_padding_is_ignored_even_when_it_holds_nan_and_inf():
  # A 3 x 3 matrix in one 4 x 4 block: row 3 and column 3 are padding.
  block = np.zeros([1, 4, 4], np.float32)
  block[0, :3, :3] = np.arange(9).reshape(3, 3)
  block[0, 3, :] = np.nan
  block[0, :, 3] = np.inf
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  w = block[0, :3, :3]

  def run():
    m = _unchecked(block, [0], [0, 1], (3, 3))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch([xt, m.values])
      y = tfbs.ops.bsr_matmul(xt, m)
    dx, dv = tape.gradient(y, [xt, m.values])
    return y, dx, dv

  want_dv = np.zeros([1, 4, 4])
  want_dv[0, :3, :3] = np.repeat(x.sum(0)[:, None], 3, axis=1)
  assert_result_everywhere(run, x @ w, np.ones([2, 3]) @ w.T, want_dv)


def test_blocks_not_stored_are_zeros_even_against_inf_and_nan():
  dense = np.zeros([8, 4], np.float32)
  dense[4:, :] = 1.0  # block row 0 not stored
  x = np.ones([2, 8], np.float32)
  x[0, 1], x[1, 2] = np.inf, np.nan  # only in the rows of the missing block
  assert_result_everywhere(lambda: tfbs.ops.bsr_matmul(x, _matrix(dense, 4)),
                           np.full([2, 4], 4.0))


def test_stored_zero_times_inf_is_nan():
  dense = np.zeros([4, 4], np.float32)
  dense[0, 0] = 1.0  # the block is stored; its other entries are zeros
  x = np.zeros([1, 4], np.float32)
  x[0, 1] = np.inf
  assert_result_everywhere(lambda: tfbs.ops.bsr_matmul(x, _matrix(dense, 4)),
                           np.full([1, 4], np.nan))


# --- empty dimensions -------------------------------------------------------------


@pytest.mark.parametrize("x_shape,k,n", [((0, 8), 8, 4), ((3, 0), 0, 4),
                                         ((3, 8), 8, 0), ((0, 2, 0), 0, 1),
                                         ((2, 0, 8), 8, 4)])
def test_empty_dimensions(x_shape, k, n):
  rng = np.random.default_rng(0)
  dense = rng.standard_normal([k, n]).astype(np.float32)
  x = rng.standard_normal(x_shape).astype(np.float32)
  m = _matrix(dense, 4)
  want = x.astype(np.float64) @ dense
  assert_result_everywhere(lambda: tfbs.ops.bsr_matmul(x, m), want)
  # Inside a tf.function with all shapes unknown (K = 0 with no rows must
  # give no rows, not one).
  f = _dynamic_matmul((k, n), (4, 4))
  assert_result_everywhere(lambda: f(x, m.values, m.col_indices, m.row_ptr), want)


def test_no_stored_block_and_no_rows_differentiates():
  m = _matrix(np.zeros([8, 16]), 4)

  def run():
    x = tf.zeros([0, 8])
    with tf.GradientTape() as tape:
      tape.watch([x, m.values])
      y = tfbs.ops.bsr_matmul(x, m)
    return tape.gradient(y, [x, m.values])
  assert_result_everywhere(run, np.zeros([0, 8]), np.zeros([0, 4, 4]))


# --- run-time checks --------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, [None, None], [2, None], [None, None, None]])
def test_inner_dimension_is_checked_at_run_time(spec):
  m = _matrix(np.ones([8, 16]), 4)
  x = tf.ones([2, 12] if spec is None or len(spec) == 2 else [2, 1, 12])
  f = tf.function(lambda x: tfbs.ops.bsr_matmul(x, m),
                  input_signature=[tf.TensorSpec(spec)])
  assert_error_everywhere(lambda: f(x), "x has 12 columns but the sparse matrix has K = 8")


@pytest.mark.parametrize("values,cols,ptr,shape,message", [
    (np.zeros([0, 4, 4]), [], [0, 2**31 - 1, -2**31 + 1], (8, 16),
     "row_ptr must be non-decreasing, but row_ptr[2] = -2147483647 < "
     "row_ptr[1] = 2147483647"),
    (np.zeros([1, 4, 4]), [4], [0, 1, 1], (8, 16),
     "col_indices[0] = 4 is out of range [0, 4)"),
    (np.zeros([2, 4, 4]), [2, 1], [0, 2, 2], (8, 16),
     "col_indices must be strictly increasing within a block row, but block "
     "row 0 has 2 before 1"),
    (np.zeros([1, 4, 4]), [0], [0, 1, 2], (8, 16),
     "row_ptr must end at the number of blocks 1, got 2"),
    (np.zeros([1, 4, 4]), [0], [1, 1, 1], (8, 16), "row_ptr[0] must be 0, got 1"),
    (np.zeros([1, 4, 4]), [0, 1], [0, 1, 1], (8, 16),
     "col_indices has 2 entries but values holds 1 blocks"),
    (np.zeros([0, 4, 4]), [], [0, 0], (8, 16),
     "row_ptr must have ceil(8 / 4) + 1 = 3 entries, got 2"),
    (np.zeros([0, 1, 1]), [], [0, 0], (1, 2**62),
     "dense shape must be at most 1073741824 per dimension (int32 "
     "indices), got [1, 4611686018427387904]"),
    (np.zeros([0, 1, 1]), [], [0, 0], (-1, 4),
     "dense shape must be non-negative, got [-1, 4]"),
])
def test_malformed_layouts_fail_alike(values, cols, ptr, shape, message):
  k = max(shape[0], 0) if shape[0] <= 2**30 else 1
  x = np.ones([2, k], np.float32)
  # Eagerly through a matrix nobody validated, and in a tf.function where
  # the index arrays are run-time tensors.
  assert_error_everywhere(
      lambda: tfbs.ops.bsr_matmul(x, _unchecked(values, cols, ptr, shape)), message)
  if shape[0] >= 0 and shape[1] <= 2**30:
    f = _dynamic_matmul(shape, values.shape[1:])
    assert_error_everywhere(lambda: f(x, tf.constant(values, F32), cols, ptr), message)


def test_huge_block_shape_without_blocks_fails_alike():
  values = np.zeros([0, 1, 2**40], np.float32)
  assert_error_everywhere(
      lambda: tfbs.ops.bsr_matmul(np.ones([1, 1], np.float32),
                                  _unchecked(values, [], [0, 1], (1, 2))),
      "block shape must be at most 1073741824 per dimension, got (1, 1099511627776)")


# --- sequences --------------------------------------------------------------------


def _recurrent(units, gates, block=2, scale=0.3):
  rng = np.random.default_rng(units * gates)
  u = (rng.standard_normal([units, gates * units]) * scale).astype(np.float32)
  return u, _matrix(u, block)


def _simple(x, h, rec, **kw):
  return tfbs.ops.simple_rnn_sequence(x, h, rec, **kw)


SIMPLE_DYN = lambda rec: tf.function(lambda x, h: _simple(x, h, rec),
                                     input_signature=[ANY3, ANY2])


def test_state_batch_is_checked_at_run_time():
  _, rec = _recurrent(4, 1)
  f = SIMPLE_DYN(rec)
  assert_error_everywhere(lambda: f(tf.ones([3, 5, 4]), tf.zeros([1, 4])),
                          "initial state h0 has batch size 1 but x_proj has 3")


def test_lstm_cell_state_shape_is_checked_at_run_time():
  _, rec = _recurrent(4, 4)
  f = tf.function(lambda x, h, c: tfbs.ops.lstm_sequence(x, h, c, rec),
                  input_signature=[ANY3, ANY2, ANY2])
  assert_error_everywhere(
      lambda: f(tf.ones([3, 5, 16]), tf.zeros([3, 4]), tf.zeros([1, 4])),
      "initial state c0 must have the shape of h0 [3,4], got [1,4]")


@pytest.mark.parametrize("mask_shape", [(1, 5), (3, 6), (3, 4)])
def test_mask_shape_is_checked_at_run_time(mask_shape):
  _, rec = _recurrent(4, 1)
  f = tf.function(lambda x, h, m: _simple(x, h, rec, mask=m),
                  input_signature=[ANY3, ANY2, tf.TensorSpec([None, None], tf.bool)])
  got = "[" + ",".join(str(d) for d in mask_shape) + "]"
  assert_error_everywhere(
      lambda: f(tf.ones([3, 5, 4]), tf.zeros([3, 4]), tf.ones(mask_shape, tf.bool)),
      f"mask must have shape [batch, time] = [3, 5] or be empty, got {got}")


def test_projection_width_is_checked_at_run_time():
  _, rec = _recurrent(4, 1)
  f = SIMPLE_DYN(rec)
  assert_error_everywhere(lambda: f(tf.ones([3, 5, 5]), tf.zeros([3, 4])),
                          "x_proj has 5 columns but 1 gates of 4 units need 4")


def test_zero_length_sequence_with_unknown_shapes():
  u, rec = _recurrent(4, 1)
  h0 = np.random.default_rng(1).standard_normal([3, 4]).astype(np.float32)
  f = SIMPLE_DYN(rec)
  assert_result_everywhere(lambda: f(tf.ones([3, 0, 4]), h0), np.zeros([3, 0, 4]), h0)


def test_malformed_layout_fails_even_without_steps():
  rec = _unchecked(np.zeros([1, 2, 2]), [5], [0, 1, 1], (4, 4))
  assert_error_everywhere(lambda: _simple(tf.ones([3, 0, 4]), tf.zeros([3, 4]), rec),
                          "col_indices[0] = 5 is out of range [0, 2)")


@pytest.mark.parametrize("bias_len", [12, 0])
def test_gru_bias_of_unknown_static_length(bias_len):
  u, rec = _recurrent(4, 3)
  rng = np.random.default_rng(2)
  x = rng.standard_normal([2, 3, 12]).astype(np.float32)
  h0 = rng.standard_normal([2, 4]).astype(np.float32)
  bias = rng.standard_normal([bias_len]).astype(np.float32)
  f = tf.function(lambda x, h, b: tfbs.ops.gru_sequence(x, h, rec, recurrent_bias=b),
                  input_signature=[ANY3, ANY2, tf.TensorSpec([None])])
  want, states = numpy_rnn("gru", x, [h0], u, bias if bias_len else None, None,
                           False, False)
  assert_result_everywhere(lambda: f(x, h0, bias), want, states[0])


def test_gru_bias_length_is_checked_at_run_time():
  _, rec = _recurrent(4, 3)
  f = tf.function(lambda x, h, b: tfbs.ops.gru_sequence(x, h, rec, recurrent_bias=b),
                  input_signature=[ANY3, ANY2, tf.TensorSpec([None])])
  assert_error_everywhere(lambda: f(tf.ones([2, 3, 12]), tf.zeros([2, 4]), tf.ones([11])),
                          "recurrent_bias must have shape [12] or be empty, got [11]")


def test_sequence_ignores_padding_nan():
  # units 3 in 2 x 2 blocks: the last block row and column hold padding.
  u = np.random.default_rng(3).standard_normal([3, 3]).astype(np.float32) * 0.4
  m = _matrix(u, 2)
  values = m.values.numpy()
  values[:, :, :] = np.where(np.isfinite(values), values, 0)
  rows = np.repeat(np.arange(2), np.diff(m.row_ptr.numpy()))
  for p, (r, c) in enumerate(zip(rows, m.col_indices.numpy())):
    if r == 1:
      values[p, 1, :] = np.nan
    if c == 1:
      values[p, :, 1] = np.nan
  rec = _unchecked(values, m.col_indices.numpy(), m.row_ptr.numpy(), (3, 3))
  x = np.random.default_rng(4).standard_normal([2, 4, 3]).astype(np.float32)
  h0 = np.zeros([2, 3], np.float32)
  want, states = numpy_rnn("simple", x, [h0], u, None, None, False, False)
  assert_result_everywhere(lambda: _simple(x, h0, rec), want, states[0])


@pytest.mark.parametrize("activation", ["tanh", "relu", "hard_sigmoid", "linear"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
def test_sequence_nan_and_inf_propagate_alike(kind, activation):
  gates = {"lstm": 4, "gru": 3, "simple": 1}[kind]
  u, rec = _recurrent(4, gates)
  rng = np.random.default_rng(5)
  x = rng.standard_normal([3, 4, 4 * gates]).astype(np.float32)
  x[0, 1, 0], x[1, 2, 1], x[2, 0, :] = np.nan, np.inf, -np.inf
  h0 = rng.standard_normal([3, 4]).astype(np.float32)
  kw = dict(activation=activation, recurrent_activation="hard_sigmoid")
  if kind == "lstm":
    run = lambda: tfbs.ops.lstm_sequence(x, h0, h0, rec, **kw)
    want, states = numpy_rnn("lstm", x, [h0, h0], u, None, None, False, False,
                             act=_ACTS[activation], rec_act=_ACTS["hard_sigmoid"])
  elif kind == "gru":
    run = lambda: tfbs.ops.gru_sequence(x, h0, rec, **kw)
    want, states = numpy_rnn("gru", x, [h0], u, None, None, False, False,
                             act=_ACTS[activation], rec_act=_ACTS["hard_sigmoid"])
  else:
    run = lambda: _simple(x, h0, rec, activation=activation)
    want, states = numpy_rnn("simple", x, [h0], u, None, None, False, False,
                             act=_ACTS[activation])
  with np.errstate(invalid="ignore"):
    assert_result_everywhere(run, want, *states)


_ACTS = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "linear": lambda v: v,
         "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0, 1)}


# --- order of checks in a graph --------------------------------------------------


def _ancestors(graph, op):
  """Every op `op` waits for in `graph`, through data and control inputs."""
  seen, todo = set(), [op]
  while todo:
    current = todo.pop()
    for parent in [t.op for t in current.inputs] + list(current.control_inputs):
      if parent.name not in seen:
        seen.add(parent.name)
        todo.append(parent)
  return {graph.get_operation_by_name(n) for n in seen}


def _layout_check_calls(ops):
  return [o for o in ops if o.type in ("PartitionedCall", "StatefulPartitionedCall")
          and "layout_checks" in o.get_attr("f").name]


@pytest.mark.parametrize("which", ["matmul", "gru_sequence"])
def test_fallback_ops_on_the_layout_wait_for_its_checks(which):
  # In a graph the executor may run any ready op first: an op that reads
  # values or col_indices before the checks pass fails with its own message
  # when their counts disagree (fuzz seeds 411087, 510927: a tf.where
  # broadcast error instead of "col_indices has 4 entries but values holds
  # 3 blocks"). Every op reading them must depend on the checks.
  shape, block = (3, 9), (3, 2)     # 9 % 2: the padding is cleared by a where
  specs = [tf.TensorSpec([None, *block]), tf.TensorSpec([None], tf.int32),
           tf.TensorSpec([None], tf.int32)]

  def body(values, cols, ptr):
    matrix = tfbs.BlockSparseMatrix(values, cols, ptr, shape)
    if which == "matmul":
      return tfbs.ops.bsr_matmul(tf.ones([2, 3]), matrix)
    return tfbs.ops.gru_sequence(tf.ones([2, 4, 9]), tf.ones([2, 3]), matrix)[0]

  with tfbs.ops.use_custom_ops(False):
    graph = tf.function(body, input_signature=specs).get_concrete_function().graph
  # values and col_indices, and what passes them on unchanged (Identity,
  # the custom gradient's IdentityN: output i is input i).
  aliases = {t.ref() for t in graph.inputs[:2]}
  for o in graph.get_operations():
    if o.type == "Identity" and o.inputs[0].ref() in aliases:
      aliases.add(o.outputs[0].ref())
    elif o.type == "IdentityN":
      aliases |= {out.ref() for t, out in zip(o.inputs, o.outputs)
                  if t.ref() in aliases}
  readers = [o for o in graph.get_operations()
             if {t.ref() for t in o.inputs} & aliases
             and not _layout_check_calls([o])
             and o.type not in ("Identity", "IdentityN", "Shape", "Size")]
  assert readers
  for op in readers:
    assert _layout_check_calls(_ancestors(graph, op)), (
        f"{op.type} {op.name} reads the layout before its checks")


@pytest.mark.parametrize("path", PATHS)
def test_reset_before_gru_gradient_keeps_to_the_candidate_columns(path):
  """Without reset_after, (r * h) @ U_h uses U's h columns only: an Inf in
  the z columns makes NaN where it multiplies (d h0), but not in the reset
  gate's gradient, which the z columns do not reach (0 * Inf)."""
  rng = np.random.default_rng(6)
  u = (0.4 * rng.standard_normal([4, 12])).astype(np.float32)
  u[1, 0] = np.inf
  rec = tfbs.BlockSparseMatrix.from_dense(u, (4, 4))
  x = tf.constant(rng.standard_normal([2, 1, 12]).astype(np.float32))
  h0 = tf.constant(rng.standard_normal([2, 4]).astype(np.float32))
  weights = rng.standard_normal([2, 1, 4])

  def loss_and_grads(run, values):
    with tf.GradientTape() as tape:
      tape.watch([x, h0, values])
      loss = tf.reduce_sum(tf.cast(run(x, h0, values), tf.float64) * weights)
    return tape.gradient(loss, [x, h0, values])

  def reference(x, h0, values):
    u_ = tf.cast(rec.with_values(values).to_dense(), tf.float64)
    x, h = tf.cast(x[:, 0], tf.float64), tf.cast(h0, tf.float64)
    xz, xr, xh = tf.split(x, 3, axis=1)
    rz, rr = tf.split(h @ u_[:, :8], 2, axis=1)
    z, r = tf.sigmoid(xz + rz), tf.sigmoid(xr + rr)
    hh = tf.tanh(xh + (r * h) @ u_[:, 8:])
    return (z * h + (1 - z) * hh)[:, None]

  ours = lambda x, h0, v: tfbs.ops.gru_sequence(
      x, h0, rec.with_values(v), reset_after=False)[0]
  with path_scope(path):
    got = loss_and_grads(ours, rec.values)
  want = loss_and_grads(reference, tf.convert_to_tensor(rec.values))
  assert np.isnan(want[1]).any()  # the Inf does reach d h0
  assert np.isfinite(want[0][..., 4:]).all()  # not the r and h gates
  for g, w, name in zip(got, want, ["x_proj", "h0", "values"]):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-6,
                               err_msg=name)


_HUGE_GRID = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import numpy as np, tensorflow as tf, tf_blocksparse as tfbs

def body(values, cols, ptr, x):
  matrix = tfbs.BlockSparseMatrix(values, cols, ptr, (2**30, 16))
  return tfbs.ops.bsr_matmul(x, matrix)

def values_grad(values, cols, ptr, x):
  # x^T dy would be [2**30, 16] (64 GB): it must wait for the checks.
  with tf.GradientTape() as tape:
    tape.watch(values)
    y = body(values, cols, ptr, x)
  return tape.gradient(y, values, output_gradients=tf.zeros([0, 16]))

specs = [tf.TensorSpec([None, 1, 2**20]), tf.TensorSpec([None], tf.int32),
         tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None])]
rejected = 0
with tfbs.ops.use_custom_ops(False):
  for fn, x in ((body, np.ones([1, 8], np.float32)),
                (values_grad, np.zeros([0, 2**30], np.float32))):
    f = tf.function(fn, input_signature=specs)
    try:
      f(np.zeros([0, 1, 2**20], np.float32), np.zeros([0], np.int32),
        np.zeros([9], np.int32), x)
    except tf.errors.InvalidArgumentError as e:
      print("rejected:", e.message)
      rejected += 1
sys.exit(0 if rejected == 2 else 3)
"""


def test_a_huge_block_grid_is_rejected_before_anything_is_sized_by_it():
  """2**30 block rows with 9 row pointers: the checks must fail before any
  tensor of the grid's size exists (Grappler constant-folded one: fuzz
  seed 1511839 crashed the process under an 8 GB address-space limit)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  run = subprocess.run([sys.executable, "-c", _HUGE_GRID], capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
  assert "row_ptr must have" in run.stdout, run.stdout
