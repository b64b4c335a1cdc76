"""bsr_matmul: values, gradients, dtypes, empty inputs, NaN and input
validation, each on both paths (compiled kernels and pure-TF fallback)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from bsr_testing import PATHS
from bsr_testing import path_scope
from bsr_testing import random_block_sparse
from tf_blocksparse.ops import _loader

BLOCKS = [(4, 4), (8, 8), (16, 16), (32, 32), (4, 1), (16, 1), (1, 4), (3, 5)]
SHAPES = [(64, 96), (50, 37)]


def test_custom_ops_are_built():
  """The install builds the op library; both paths below must really run."""
  assert tfbs.ops.custom_ops_available(), _loader.load_error()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_numpy(path, block, shape):
  rng = np.random.default_rng(hash((block, shape)) % 2**32)
  dense, _ = random_block_sparse(rng, *shape, block)
  m = tfbs.BlockSparseMatrix.from_dense(dense, block)
  for rows in (1, 5, 70):  # 70 > 32 exercises the packed operand
    x = rng.standard_normal([rows, shape[0]]).astype(np.float32)
    with path_scope(path):
      y = tfbs.ops.bsr_matmul(x, m).numpy()
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(16, 16), (4, 1), (3, 5)])
def test_paths_agree(block):
  rng = np.random.default_rng(7)
  dense, _ = random_block_sparse(rng, 128, 80, block, density=0.3)
  m = tfbs.BlockSparseMatrix.from_dense(dense, block)
  x = rng.standard_normal([40, 128]).astype(np.float32)
  with path_scope("custom"):
    a = tfbs.ops.bsr_matmul(x, m).numpy()
  with path_scope("fallback"):
    b = tfbs.ops.bsr_matmul(x, m).numpy()
  # rtol 1e-5, with cancellation near zero measured against the output scale.
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("path", PATHS)
def test_batch_dimensions_and_vectors(path):
  rng = np.random.default_rng(8)
  dense, _ = random_block_sparse(rng, 24, 16, (8, 8))
  m = tfbs.BlockSparseMatrix.from_dense(dense, 8)
  x = rng.standard_normal([2, 3, 24]).astype(np.float32)
  with path_scope(path):
    y = tfbs.ops.bsr_matmul(x, m)
    v = tfbs.ops.bsr_matmul(x[0, 0], m)
  assert y.shape == (2, 3, 16) and v.shape == (16,)
  np.testing.assert_allclose(y.numpy(), x @ dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v.numpy(), x[0, 0] @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (tf.float16.as_numpy_dtype, 2e-2),
                                       (tf.bfloat16.as_numpy_dtype, 5e-2)])
def test_dtypes(path, dtype, tol):
  rng = np.random.default_rng(9)
  dense, _ = random_block_sparse(rng, 32, 32, (8, 8), dtype=np.float64)
  x = rng.standard_normal([4, 32])
  m = tfbs.BlockSparseMatrix.from_dense(dense.astype(dtype), 8)
  with path_scope(path):
    y = tfbs.ops.bsr_matmul(x.astype(dtype), m)
  assert y.dtype == tf.as_dtype(dtype)
  ref = x.astype(dtype).astype(np.float64) @ dense.astype(dtype).astype(np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", [(4, 4), (4, 1), (3, 5)])
def test_gradients_match_numerical(path, block):
  rng = np.random.default_rng(10)
  dense, _ = random_block_sparse(rng, 11, 9, block, density=0.6, dtype=np.float64)
  m = tfbs.BlockSparseMatrix.from_dense(dense, block)
  x = rng.standard_normal([3, 11])
  with path_scope(path):
    theoretical, numerical = tf.test.compute_gradient(
        lambda x_, v_: tfbs.ops.bsr_matmul(x_, m.with_values(v_)), [x, m.values])
  for t, n in zip(theoretical, numerical):
    np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_gradients_match_dense_formula(path):
  rng = np.random.default_rng(11)
  dense, mask = random_block_sparse(rng, 40, 24, (8, 8))
  m = tfbs.BlockSparseMatrix.from_dense(dense, 8)
  x = tf.constant(rng.standard_normal([6, 40]).astype(np.float32))
  dy = rng.standard_normal([6, 24]).astype(np.float32)
  with path_scope(path), tf.GradientTape() as tape:
    tape.watch(x)
    values = tf.identity(m.values)
    tape.watch(values)
    y = tfbs.ops.bsr_matmul(x, m.with_values(values))
  dx, dvalues = tape.gradient(y, [x, values], output_gradients=tf.constant(dy))
  np.testing.assert_allclose(dx.numpy(), dy @ dense.T, rtol=1e-4, atol=1e-5)
  dw = m.with_values(dvalues).to_dense().numpy()
  expected = (x.numpy().T @ dy) * np.kron(mask, np.ones([8, 8]))[:40, :24]
  np.testing.assert_allclose(dw, expected, rtol=1e-4, atol=1e-5)


def test_second_order_gradients_agree_between_paths():
  rng = np.random.default_rng(12)
  dense, _ = random_block_sparse(rng, 12, 8, (4, 4), density=0.7, dtype=np.float64)
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  x = tf.constant(rng.standard_normal([3, 12]))
  results = []
  for path in PATHS:
    with path_scope(path), tf.GradientTape() as outer:
      values = tf.identity(m.values)
      outer.watch([x, values])
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = tfbs.ops.bsr_matmul(x, m.with_values(values))
        loss = tf.reduce_sum(y ** 2)
      gx = inner.gradient(loss, x)
      penalty = tf.reduce_sum(gx ** 2)
    results.append([g.numpy() for g in outer.gradient(penalty, [x, values])])
  for other in results[1:]:  # every kernel ISA and the fallback
    for a, b in zip(results[0], other):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_empty_inputs(path):
  rng = np.random.default_rng(13)
  dense, _ = random_block_sparse(rng, 16, 12, (4, 4))
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  empty = tfbs.BlockSparseMatrix.from_dense(np.zeros([16, 12], np.float32), 4)
  no_cols = tfbs.BlockSparseMatrix.from_dense(np.zeros([16, 0], np.float32), 4)
  no_rows = tfbs.BlockSparseMatrix.from_dense(np.zeros([0, 12], np.float32), 4)
  x = rng.standard_normal([3, 16]).astype(np.float32)
  with path_scope(path):
    assert tfbs.ops.bsr_matmul(np.zeros([0, 16], np.float32), m).shape == (0, 12)
    np.testing.assert_array_equal(tfbs.ops.bsr_matmul(x, empty).numpy(), np.zeros([3, 12]))
    assert tfbs.ops.bsr_matmul(x, no_cols).shape == (3, 0)
    np.testing.assert_array_equal(
        tfbs.ops.bsr_matmul(np.zeros([3, 0], np.float32), no_rows).numpy(), np.zeros([3, 12]))


@pytest.mark.parametrize("path", PATHS)
def test_nan_and_inf_propagate_like_dense(path):
  dense = np.zeros([8, 8], np.float32)
  dense[0:4, 0:4] = 1.0   # block (0, 0)
  dense[4:8, 4:8] = 2.0   # block (1, 1)
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  x = np.ones([2, 8], np.float32)
  x[0, 1] = np.nan   # feeds block (0, 0) only
  x[1, 6] = np.inf   # feeds block (1, 1) only
  with path_scope(path):
    y = tfbs.ops.bsr_matmul(x, m).numpy()
  with np.errstate(invalid="ignore"):
    expected = x @ dense
  # Dense matmul gives NaN for 0 * NaN too; the sparse product skips the
  # stored-zero-free blocks, so compare where a stored block is involved.
  np.testing.assert_array_equal(np.isnan(y[0, :4]), [True] * 4)
  np.testing.assert_array_equal(y[0, 4:], [8.0] * 4)
  np.testing.assert_array_equal(y[1, :4], [4.0] * 4)
  np.testing.assert_array_equal(np.isposinf(y[1, 4:]), [True] * 4)
  np.testing.assert_array_equal(np.isnan(expected[0, :4]), [True] * 4)


def _graph_matmul(x, values, cols, row_ptr, shape):
  """Builds the matrix inside a graph, so only the op's own checks run."""
  @tf.function
  def run(x, values, cols, row_ptr):
    return tfbs.ops.bsr_matmul(x, tfbs.BlockSparseMatrix(values, cols, row_ptr, shape))
  return run(tf.constant(x), tf.constant(values), tf.constant(cols), tf.constant(row_ptr))


BAD_STRUCTURES = [
    ([0, 1], [0, 2, 1], "non-decreasing"),
    ([0, 1], [0, 1, 1], "end at the number of blocks"),
    ([0, 1], [1, 1, 2], r"row_ptr\[0\] must be 0"),
    ([0, 2], [0, 1, 2], "range"),
    ([0, -1], [0, 1, 2], "range"),
    ([1, 0], [0, 2, 2], "strictly increasing"),
    ([1, 1], [0, 2, 2], "strictly increasing"),
    ([0, 1, 1], [0, 1, 2], "col_indices"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cols,row_ptr,message", BAD_STRUCTURES)
def test_malformed_structure_at_run_time(path, cols, row_ptr, message):
  values = np.ones([2, 4, 4], np.float32)
  x = np.ones([3, 8], np.float32)
  with path_scope(path), pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _graph_matmul(x, values, np.int32(cols), np.int32(row_ptr), (8, 8))


@pytest.mark.parametrize("path", PATHS)
def test_bad_dense_operand(path):
  m = tfbs.BlockSparseMatrix.from_dense(np.eye(8, dtype=np.float32), 4)
  with path_scope(path):
    with pytest.raises(tf.errors.InvalidArgumentError, match="has 7 columns"):
      tfbs.ops.bsr_matmul(np.ones([2, 7], np.float32), m)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
      tfbs.ops.bsr_matmul(np.ones([2, 8], np.float64), m)
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank"):
      tfbs.ops.bsr_matmul(np.float32(1.0), m)
    with pytest.raises(TypeError, match="BlockSparseMatrix"):
      tfbs.ops.bsr_matmul(np.ones([2, 8], np.float32), np.eye(8))
    # Inner dimension known only at run time.
    f = tf.function(lambda x: tfbs.ops.bsr_matmul(x, m),
                    input_signature=[tf.TensorSpec([None, None], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError):
      f(tf.ones([2, 5]))


def test_raw_op_rejects_bad_shapes():
  """The C++ kernels check what the Python wrapper would have caught."""
  lib = _loader.library()
  values = tf.ones([2, 4, 4])
  cols, row_ptr = tf.constant([0, 1]), tf.constant([0, 1, 2])
  shape = tf.constant([8, 8], tf.int64)
  cases = [
      (lambda: lib.tfbs_bsr_matmul(tf.ones([3, 7]), values, cols, row_ptr, shape), "columns"),
      (lambda: lib.tfbs_bsr_matmul(tf.ones([3, 8]), values, cols, row_ptr,
                                   tf.constant([8, -8], tf.int64)), "non-negative"),
      (lambda: lib.tfbs_bsr_matmul(tf.ones([3, 8]), tf.ones([2, 0, 4]), cols, row_ptr,
                                   shape), "positive"),
      (lambda: lib.tfbs_bsr_matmul_transposed(tf.ones([3, 9]), values, cols, row_ptr,
                                              shape), "columns"),
      (lambda: lib.tfbs_bsr_matmul_values_grad(tf.ones([3, 8]), tf.ones([2, 8]), values,
                                               cols, row_ptr, shape), "same number of rows"),
  ]
  for call, message in cases:
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
      call()


def test_fallback_warns_once_when_library_is_missing():
  code = (
      "import warnings, numpy as np\n"
      "import tf_blocksparse as tfbs\n"
      "from tf_blocksparse.ops import _loader\n"
      "_loader._HERE = '/nonexistent'\n"
      "m = tfbs.BlockSparseMatrix.from_dense(np.eye(8, dtype=np.float32), 4)\n"
      "with warnings.catch_warnings(record=True) as w:\n"
      "  warnings.simplefilter('always')\n"
      "  y1 = tfbs.ops.bsr_matmul(np.ones([2, 8], np.float32), m)\n"
      "  y2 = tfbs.ops.bsr_matmul(np.ones([2, 8], np.float32), m)\n"
      "ours = [x for x in w if 'custom ops unavailable' in str(x.message)]\n"
      "print(len(ours), tfbs.ops.custom_ops_available(), float(np.sum(y1)), float(np.sum(y2)))\n")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True).stdout.split()
  assert out == ["1", "False", "16.0", "16.0"]


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fallback"])
def test_few_rows_over_many_blocks_split_between_threads(path):
  """ScatterProduct (x @ W with M <= 4) splits its block rows between
  threads only when the blocks take long to stream (about 50 MB here):
  the partial sums of that split against numpy."""
  rng = np.random.default_rng(12)
  k, n, b = 4096, 4096, 16
  keep = rng.random([k // b, n // b]) < 0.75
  blocks = rng.standard_normal([int(keep.sum()), b, b]).astype(np.float32)
  dense = np.zeros([k // b, b, n // b, b], np.float32)
  rows, cols = np.nonzero(keep)
  dense[rows, :, cols, :] = blocks
  dense = dense.reshape(k, n)
  m = tfbs.BlockSparseMatrix.from_dense(dense, b)
  x = rng.standard_normal([3, k]).astype(np.float32)
  with path_scope(path):
    y = tfbs.ops.bsr_matmul(x, m).numpy()
  np.testing.assert_allclose(y, x.astype(np.float64) @ dense, rtol=1e-4, atol=1e-3)
