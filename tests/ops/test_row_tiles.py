"""Every row count a row tile can leave over (1..2 tiles of the widest ISA),
for each block shape with a specialised kernel: the tiles of 12, 8, 4, 2
and 1 rows, their accumulator chains, and the edge blocks at K and N, for
x @ W and for dy @ W^T (the gradient's transposed product)."""

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from bsr_testing import PATHS
from bsr_testing import check_product_and_transposed
from bsr_testing import path_scope
from bsr_testing import random_block_sparse

BLOCKS = [(4, 4), (8, 8), (16, 16), (32, 32), (16, 1), (1, 16), (4, 1)]
ROWS = range(1, 26)  # 25 = 12 + 8 + 4 + 1 rows on AVX-512


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", BLOCKS)
def test_every_row_count(path, block):
  rng = np.random.default_rng(sum(block))
  k, n = 70, 75  # neither a multiple of any block side above except 1
  dense, _ = random_block_sparse(rng, k, n, block, density=0.5)
  w = tfbs.BlockSparseMatrix.from_dense(dense, block)
  for rows in ROWS:
    x = rng.standard_normal([rows, k]).astype(np.float32)
    dy = rng.standard_normal([rows, n]).astype(np.float32)
    check_product_and_transposed(path, w, dense, x, dy, 1e-5, f"rows={rows}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [4, 8, 16, 32])
def test_transposed_product_of_few_rows_ignores_nan_padding(path, dtype, block):
  # dy @ W^T for 1..7 rows reads the stored blocks in place (GatherProduct):
  # the right and bottom edge blocks' padding is NaN here and must not
  # reach dx, in either dtype.
  rng = np.random.default_rng(block)
  k, n = 70, 75
  dense, _ = random_block_sparse(rng, k, n, (block, block), density=0.6)
  dense = dense.astype(dtype)
  w = tfbs.BlockSparseMatrix.from_dense(dense, (block, block))
  values = w.values.numpy().copy()
  rows = np.repeat(np.arange(len(w.row_ptr) - 1), np.diff(w.row_ptr.numpy()))
  for p, (r, c) in enumerate(zip(rows, w.col_indices.numpy())):
    values[p, max(0, k - r * block):, :] = np.nan
    values[p, :, max(0, n - c * block):] = np.nan
  padded = w.with_values(tf.constant(values))
  for m in range(1, 8):
    dy = rng.standard_normal([m, n]).astype(dtype)
    x = tf.zeros([m, k], dtype)
    with path_scope(path):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = tfbs.ops.bsr_matmul(x, padded)
      dx = tape.gradient(y, x, output_gradients=tf.constant(dy))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx.numpy(), dy.astype(np.float64) @ dense.T.astype(np.float64),
                               rtol=tol, atol=tol, err_msg=f"rows={m}")
