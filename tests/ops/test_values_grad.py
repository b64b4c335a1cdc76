"""The values gradient (dvalues[p] = x[:, rows(p)]^T @ dy[:, cols(p)]) with
the kernel's runs of blocks: several inner blocks of one block row at once,
runs cut by an edge block or a new block row, dense rows in chunks (the
partial sums kept between chunks), and no dense rows at all; every block
shape with a specialised kernel, float32 and float64, every path."""

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from bsr_testing import PATHS
from bsr_testing import path_scope
from bsr_testing import random_block_sparse

BLOCKS = [(4, 4), (8, 8), (16, 16), (32, 32), (1, 4), (1, 16), (3, 5)]
ROWS = [0, 1, 7, 64, 65, 150]  # the kernel sums 64 dense rows per chunk


def dvalues_of(path, x, dy, m):
  with path_scope(path), tf.GradientTape() as tape:
    values = tf.identity(m.values)
    tape.watch(values)
    y = tfbs.ops.bsr_matmul(tf.constant(x), m.with_values(values))
  return tape.gradient(y, values, output_gradients=tf.constant(dy))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", BLOCKS)
def test_values_gradient_matches_numpy(path, dtype, block):
  rng = np.random.default_rng(sum(block) * 10 + dtype().itemsize)
  k, n = 100, 230  # ragged edges; long block rows make runs of 2..6 blocks
  dense, mask = random_block_sparse(rng, k, n, block, density=0.7, dtype=dtype)
  m = tfbs.BlockSparseMatrix.from_dense(dense, block)
  cover = np.kron(mask, np.ones(block))[:k, :n]
  tol = 1e-4 if dtype == np.float32 else 1e-10
  for rows in ROWS:
    x = rng.standard_normal([rows, k]).astype(dtype)
    dy = rng.standard_normal([rows, n]).astype(dtype)
    dvalues = dvalues_of(path, x, dy, m)
    got = m.with_values(dvalues).to_dense().numpy()
    expected = (x.astype(np.float64).T @ dy) * cover
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol,
                               err_msg=f"rows={rows}")
    # The padding of edge blocks gets a zero gradient.
    assert np.isfinite(dvalues.numpy()).all()
    np.testing.assert_allclose(np.abs(dvalues.numpy()).sum(),
                               np.abs(got).sum(), rtol=tol)
