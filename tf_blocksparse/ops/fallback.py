"""Pure-TensorFlow BSR products, used when the compiled ops are missing.

Only stock ops (pad, gather, einsum, unsorted_segment_sum), so it runs
anywhere TensorFlow runs and TensorFlow differentiates it; the compiled
kernels are tested against it.
"""

import tensorflow as tf

from tf_blocksparse.bsr import validation


def bsr_matmul_2d(x, matrix):
  """`x @ W` for 2-D `x` [M, K], validated with graph assertions."""
  (k, n), (bh, bw) = matrix.shape, matrix.block_size
  nbr, nbc = matrix.block_grid
  row_ids = validation.structure_assertions(
      tf.shape(matrix.values)[0], matrix.col_indices, matrix.row_ptr,
      matrix.shape, matrix.block_size)
  m = tf.shape(x)[0]
  x_blocks = tf.reshape(tf.pad(x, [[0, 0], [0, nbr * bh - k]]), [m, nbr, bh])
  gathered = tf.gather(x_blocks, row_ids, axis=1)            # [M, nnzb, bh]
  products = tf.einsum("mpi,pio->pmo", gathered, matrix.values)  # [nnzb, M, bw]
  summed = tf.math.unsorted_segment_sum(products, matrix.col_indices, nbc)
  y = tf.reshape(tf.transpose(summed, [1, 0, 2]), [m, nbc * bw])
  return y[:, :n]


def bsr_values_grad_2d(x, dy, matrix):
  """Gradient of `x @ W` with respect to the block values, `[nnzb, bh, bw]`.

  `x` [M, K], `dy` [M, N]: the blocks of `x^T dy` at the stored positions.
  One dense product rather than per-block gathers: for the large M of a
  whole sequence (batch * time) gathering `[M, nnzb, bh]` slices would need
  far more memory than the `[K, N]` product.
  """
  (k, n), (bh, bw) = matrix.shape, matrix.block_size
  nbr, nbc = matrix.block_grid
  row_ids = validation.structure_assertions(
      tf.shape(matrix.values)[0], matrix.col_indices, matrix.row_ptr,
      matrix.shape, matrix.block_size)
  x = tf.pad(x, [[0, 0], [0, nbr * bh - k]])
  dy = tf.pad(dy, [[0, 0], [0, nbc * bw - n]])
  full = tf.matmul(x, dy, transpose_a=True)                  # [nbr*bh, nbc*bw]
  blocks = tf.transpose(tf.reshape(full, [nbr, bh, nbc, bw]), [0, 2, 1, 3])
  return tf.gather_nd(blocks, tf.stack([row_ids, matrix.col_indices], axis=1))
