"""Pure-TensorFlow BSR products, used when the compiled ops are missing.

Only stock ops (pad, gather, batched matmul, unsorted_segment_sum), so it runs
anywhere TensorFlow runs and TensorFlow differentiates it; the compiled
kernels are tested against it. The structure and the operands are checked
with graph assertions that give the C++ kernels' messages, and the padding
of the edge blocks is ignored as the kernels ignore it (see `bsr_matmul`).
"""

import numpy as np
import tensorflow as tf

from tf_blocksparse.bsr import validation


def _effective_blocks(matrix):
  """The stored blocks cut to the matrix, `(values, bh', bw')`.

  A block taller than K (wider than N) has only one block row (column):
  the rest is padding. Cut, the zero-padded operands stay below twice
  their size, where padding them to a block of 2^30 rows would allocate
  gigabytes the kernels never touch.
  """
  (k, n), (bh, bw) = matrix.shape, matrix.block_size
  ebh, ebw = min(bh, k), min(bw, n)
  values = matrix.values
  if (ebh, ebw) != (bh, bw):
    values = values[:, :ebh, :ebw]
  return values, ebh, ebw


def bsr_matmul_2d(x, matrix):
  """`x @ W` for 2-D `x` [M, K], validated with graph assertions."""
  k = matrix.shape[0]
  row_ids = validation.structure_assertions(
      validation.num_blocks(matrix.values), matrix.col_indices, matrix.row_ptr,
      matrix.shape, matrix.block_size)
  if x.shape[1] is None:  # else checked while tracing
    cols = tf.shape(x, out_type=tf.int64)[1]
    with tf.control_dependencies([validation.check(
        tf.equal(cols, k), lambda: validation.fmt(
            "x has {} columns but the sparse matrix has K = " f"{k}", cols))]):
      x = tf.identity(x)
  return checked_product(matrix, row_ids)(x)


def checked_product(matrix, row_ids):
  """`x -> x @ W` for a layout already validated, `row_ids` its checked
  block rows (`validation.structure_assertions`), and `x` [M, K] whose K was
  checked too: no assertion in it. A recurrence multiplies by the same
  matrix at every step: validated once outside its loop, the loop body
  holds only the product (and the padding is cleared once, not per step).
  """
  (k, n) = matrix.shape
  nbr, nbc = matrix.block_grid
  values, bh, bw = _effective_blocks(matrix)
  # After the checks (row_ids is their output): in a graph, ops on the
  # unchecked values and col_indices could otherwise run first and fail
  # with their own message (a broadcast in `_without_padding` when the
  # counts disagree), whichever the executor happens to schedule first.
  values, col_indices = _after_checks(row_ids, values, matrix.col_indices)
  values = _without_padding(values, matrix.shape, matrix.block_grid,
                            col_indices, row_ids, bh, bw)
  # int64 sizes: K or N may be up to 2^31 - 1, the padded ones beyond.
  geometry = tf.constant([nbr * bh - k, nbr, bh, nbc, bw, n], tf.int64)
  shared = _shared_product(values.dtype)

  def product(x):
    y = shared(x, values, row_ids, col_indices, geometry)
    y.set_shape([x.shape[0], n])
    return y
  return product


def _after_checks(row_ids, *tensors):
  """`tensors`, available only once the layout checks (whose output is
  `row_ids`) have passed: graph ops on them then cannot run first."""
  with tf.control_dependencies([row_ids]):
    return [tf.identity(t) for t in tensors]


_SHARED = {}


def _shared_product(dtype):
  """The product as one traced function per dtype, for every matrix: an
  exported model multiplies at several sites (each layer, the loop body,
  the step signature), which then hold a call each rather than a copy of
  the ~25 ops below."""
  if dtype not in _SHARED:
    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None], dtype), tf.TensorSpec([None, None, None], dtype),
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([6], tf.int64)])
    def bsr_product(x, values, row_ids, col_indices, geometry):
      pad, nbr, bh, nbc, bw, n = tf.unstack(geometry)
      m = tf.shape(x, out_type=tf.int64)[0]
      x_blocks = tf.reshape(tf.pad(x, [[0, 0], [0, pad]]), [m, nbr, bh])
      x_blocks = tf.transpose(x_blocks, [1, 0, 2])              # [nbr, M, bh]
      gathered = tf.gather(x_blocks, row_ids)                   # [nnzb, M, bh]
      # A batched matmul, not einsum: einsum gives [1, 0, bw] for M = nnzb = 0.
      products = tf.matmul(gathered, values)                    # [nnzb, M, bw]
      summed = tf.math.unsorted_segment_sum(products, col_indices, nbc)
      y = tf.reshape(tf.transpose(summed, [1, 0, 2]), [m, nbc * bw])
      return y[:, :n]
    _SHARED[dtype] = bsr_product
  return _SHARED[dtype]


def _without_padding(values, shape, block_grid, col_indices, row_ids, bh, bw):
  """The (effective) block values with the edge blocks' padding set to zero.

  The padding is ignored (the compiled kernels never read it): multiplied
  with the zero-padded operand, a NaN or Inf stored there would still give
  NaN. `tf.where`, so its gradient there is zero too, as the kernels'.
  Only the last block row (column) has padding rows (columns): each block
  picks its row (column) pattern from a two-entry table, which keeps the
  graph small (it is traced into every exported call).
  """
  k, n = shape
  nbr, nbc = block_grid
  keep = None
  if k and k % bh:
    table = np.ones([2, bh, 1], bool)
    table[1, k % bh:] = False
    keep = tf.gather(table, tf.cast(tf.equal(row_ids, nbr - 1), tf.int32))
  if n and n % bw:
    table = np.ones([2, 1, bw], bool)
    table[1, :, n % bw:] = False
    cols = tf.gather(table, tf.cast(tf.equal(col_indices, nbc - 1), tf.int32))
    keep = cols if keep is None else keep & cols
  if keep is None:
    return values
  return tf.where(keep, values, tf.zeros([], values.dtype))


def bsr_values_grad_2d(x, dy, matrix):
  """Gradient of `x @ W` with respect to the block values, `[nnzb, bh, bw]`.

  `x` [M, K], `dy` [M, N]: the blocks of `x^T dy` at the stored positions
  (zero in the padding, which x and dy do not reach). One dense product
  rather than per-block gathers: for the large M of a whole sequence
  (batch * time) gathering `[M, nnzb, bh]` slices would need far more
  memory than the `[K, N]` product.
  """
  (k, n), (bh, bw) = matrix.shape, matrix.block_size
  nbr, nbc = matrix.block_grid
  row_ids = validation.structure_assertions(
      validation.num_blocks(matrix.values), matrix.col_indices, matrix.row_ptr,
      matrix.shape, matrix.block_size)
  _, ebh, ebw = _effective_blocks(matrix)
  # The [K, N] product below is sized by the dense shape: it must wait for
  # the layout checks, or a malformed huge shape allocates before they fail.
  x, dy = _after_checks(row_ids, x, dy)
  x = tf.pad(x, [[0, 0], [0, nbr * ebh - k]])
  dy = tf.pad(dy, [[0, 0], [0, nbc * ebw - n]])
  full = tf.matmul(x, dy, transpose_a=True)                # [nbr*bh', nbc*bw']
  blocks = tf.transpose(tf.reshape(full, [nbr, ebh, nbc, ebw]), [0, 2, 1, 3])
  grad = tf.gather_nd(blocks, tf.stack([row_ids, matrix.col_indices], axis=1))
  # gather_nd of no indices has an unknown block shape; the values' is known.
  # (not [-1, ...]: with bh' or bw' 0 that makes one block out of none)
  grad = tf.reshape(grad, [tf.size(matrix.col_indices), ebh, ebw])
  if (ebh, ebw) != (bh, bw):  # zero for the cut padding
    grad = tf.pad(grad, [[0, 0], [0, bh - ebh], [0, bw - ebw]])
  return grad
