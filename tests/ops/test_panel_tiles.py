"""The panel kernel (many dense rows: vectors along the rows) at every panel
count a work unit can hold and leave over: whole register tiles, the split
tails (3 + 1 panels run as 2 + 2), a last panel with few rows, the
transposed output squares cut at N, narrow segments (1-3 columns) and
blocks wider than a vector (several squares per block column), for x @ W
and dy @ W^T, in float32 and float64, on every compiled path."""

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from bsr_testing import PATHS
from bsr_testing import check_product_and_transposed
from bsr_testing import path_scope
from bsr_testing import random_block_sparse

# (16, 16) and (32, 32) take the unrolled whole-block loop, (20, 20) one and
# a quarter output squares of 16 lanes, (3, 5) and (16, 1) the generic loop
# and a narrow segment, (4, 4) and (8, 8) tiles of 4 and 8 columns.
BLOCKS = [(4, 4), (8, 8), (16, 16), (32, 32), (20, 20), (3, 5), (16, 1), (1, 16)]
# Panels of 16 rows (float32 with AVX-512): 1..10 whole and ragged panels.
ROWS = [16, 17, 33, 48, 63, 64, 65, 96, 100, 128, 130, 160]
CUSTOM = [p for p in PATHS if p.startswith("custom")]


@pytest.mark.parametrize("path", CUSTOM)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", BLOCKS)
def test_every_panel_count(path, dtype, block):
  rng = np.random.default_rng(sum(block) + dtype().itemsize)
  k, n = 70, 75  # neither a multiple of 16 nor of the blocks' sides
  dense, _ = random_block_sparse(rng, k, n, block, density=0.5, dtype=dtype)
  w = tfbs.BlockSparseMatrix.from_dense(dense, block)
  tol = 1e-4 if dtype == np.float32 else 1e-10
  for rows in ROWS:
    x = rng.standard_normal([rows, k]).astype(dtype)
    dy = rng.standard_normal([rows, n]).astype(dtype)
    check_product_and_transposed(path, w, dense, x, dy, tol, f"rows={rows}")


@pytest.mark.parametrize("path", CUSTOM)
def test_panels_of_a_long_inner_dimension(path):
  # K = 2100: several work units of panels (each unit's panels must fit a
  # core's L2, so a unit holds fewer panels) and a last square cut at K.
  rng = np.random.default_rng(7)
  k, n = 2100, 40
  dense, _ = random_block_sparse(rng, k, n, (16, 16), density=0.3)
  w = tfbs.BlockSparseMatrix.from_dense(dense, (16, 16))
  x = rng.standard_normal([200, k]).astype(np.float32)
  with path_scope(path):
    y = tfbs.ops.bsr_matmul(tf.constant(x), w).numpy()
  np.testing.assert_allclose(y, x.astype(np.float64) @ dense, rtol=1e-4, atol=1e-4)
