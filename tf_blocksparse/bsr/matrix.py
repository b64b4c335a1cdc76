"""`BlockSparseMatrix`: a 2-D weight in block compressed sparse row form."""

import typing

import numpy as np
import tensorflow as tf

from tf_blocksparse.bsr import validation


class BlockSparseMatrix(tf.experimental.ExtensionType):
  """A `[K, N]` matrix stored as dense blocks in block-CSR (BSR) order.

  Components:
    values: `[nnzb, bh, bw]` float tensor, the stored blocks in row-major
      block order (block row by block row, columns increasing).
    col_indices: `[nnzb]` int32, the block column of each stored block.
    row_ptr: `[ceil(K / bh) + 1]` int32, block row `i` holds blocks
      `row_ptr[i] .. row_ptr[i + 1] - 1`.
    shape: the true dense shape `(K, N)`. When it is not a multiple of the
      block shape, the right/bottom edge blocks are stored zero padded.

  It is a `tf.experimental.ExtensionType`, so it is a value that
  `tf.function`, `tf.saved_model.save` and `tf.nest` understand without
  any help: inside a traced function it is its component tensors, and a
  saved function that takes one stores its `TypeSpec`. Keras layers keep the
  components as variables (trainable `values`, fixed `col_indices`/`row_ptr`)
  and build the matrix from them in `call`, which keeps the layout fixed
  while fine-tuning the block values.

  Example:

  >>> import numpy as np, tf_blocksparse as tfbs
  >>> dense = np.zeros([8, 8], np.float32); dense[:4, 4:] = 1.0
  >>> w = tfbs.BlockSparseMatrix.from_dense(dense, block_size=4)
  >>> int(w.num_blocks), w.block_size, float(w.density)
  (1, (4, 4), 0.25)
  >>> np.allclose(w.to_dense(), dense)
  True
  """

  __name__ = "tf_blocksparse.BlockSparseMatrix"

  values: tf.Tensor
  col_indices: tf.Tensor
  row_ptr: tf.Tensor
  shape: typing.Tuple[int, int]

  def __validate__(self):
    validation.check_static(self.values, self.col_indices, self.row_ptr,
                            self.shape)
    if tf.executing_eagerly():
      # Eager shapes are always static: no shape op for the block count.
      validation.check_numpy(int(self.values.shape[0]),
                             self.col_indices.numpy(), self.row_ptr.numpy(),
                             self.shape, self.block_size)

  @classmethod
  def _from_checked_layout(cls, values, col_indices, row_ptr, shape):
    """Builds a matrix without `__validate__`, for layouts checked before.

    The eager checks copy the indices to the host, which costs more than a
    small product; callers whose layout was validated when it was set (a
    layer's layout variables, a matrix's own layout under new values) skip
    them on every call. The compiled kernels and the fallback's graph
    assertions check the layout again wherever it is multiplied, so a
    layout that was changed behind our back still fails there. Fields are
    converted as `__init__` would, in declaration order (the `TypeSpec`
    follows it), the way `TypeSpec._from_components` builds a value.
    """
    matrix = object.__new__(cls)
    matrix.__dict__.update(
        values=_as_tensor(values), col_indices=_as_tensor(col_indices),
        row_ptr=_as_tensor(row_ptr), shape=(int(shape[0]), int(shape[1])))
    return matrix

  @property
  def block_size(self):
    """The block shape `(bh, bw)`."""
    return (int(self.values.shape[1]), int(self.values.shape[2]))

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def block_grid(self):
    """Number of block rows and block columns, `(ceil(K/bh), ceil(N/bw))`."""
    (k, n), (bh, bw) = self.shape, self.block_size
    return (validation.ceil_div(k, bh), validation.ceil_div(n, bw))

  @property
  def num_blocks(self):
    """Number of stored blocks (a scalar tensor)."""
    return tf.shape(self.values, out_type=tf.int64)[0]

  @property
  def density(self):
    """Fraction of blocks stored: `num_blocks / (block rows * block cols)`."""
    nbr, nbc = self.block_grid
    total = max(nbr * nbc, 1)
    return tf.cast(self.num_blocks, tf.float64) / total

  @property
  def nbytes(self):
    """Bytes of the BSR components: values, column indices, row pointers."""
    bh, bw = self.block_size
    per_block = bh * bw * self.values.dtype.size + 4
    return self.num_blocks * per_block + 4 * (self.block_grid[0] + 1)

  def row_ids(self):
    """Block row of each stored block, `[nnzb]` int32."""
    return tf.repeat(tf.range(self.block_grid[0], dtype=tf.int32),
                     self.row_ptr[1:] - self.row_ptr[:-1])

  @classmethod
  def from_dense(cls, dense, block_size):
    """Keeps every `block_size` block of `dense` that holds any non-zero.

    Works eagerly and inside `tf.function` (where the number of blocks is
    dynamic). `dense` must have a static 2-D shape.
    """
    bh, bw = validation.check_block_size(block_size)
    dense = tf.convert_to_tensor(dense)
    if dense.shape.rank != 2 or not dense.shape.is_fully_defined():
      raise validation.invalid(
          f"from_dense needs a 2-D tensor of static shape, got {dense.shape}")
    if not dense.dtype.is_floating:
      raise validation.invalid(f"from_dense needs a float tensor, got {dense.dtype.name}")
    blocks = _blocks_of(dense, bh, bw)
    # NaN != 0, so a block holding a NaN is kept and the NaN propagates.
    keep = tf.reduce_any(tf.not_equal(blocks, 0), axis=[2, 3])
    return _from_kept_blocks(cls, blocks, keep, tuple(int(d) for d in dense.shape))

  @classmethod
  def from_mask(cls, dense, block_mask, block_size):
    """Stores the blocks of `dense` where `block_mask` (`[nbr, nbc]`) is true.

    Unlike `from_dense`, a kept block may be all zero: the layout is fixed
    by the mask, as a pruning mask fixes it.
    """
    bh, bw = validation.check_block_size(block_size)
    dense = tf.convert_to_tensor(dense)
    block_mask = tf.convert_to_tensor(block_mask, tf.bool)
    if dense.shape.rank != 2 or not dense.shape.is_fully_defined():
      raise validation.invalid(
          f"from_mask needs a 2-D tensor of static shape, got {dense.shape}")
    k, n = (int(d) for d in dense.shape)
    nbr, nbc = validation.ceil_div(k, bh), validation.ceil_div(n, bw)
    if block_mask.shape != (nbr, nbc):
      raise validation.invalid(
          f"block mask must have shape [{nbr}, {nbc}] for a [{k}, {n}] matrix "
          f"in ({bh}, {bw}) blocks, got {block_mask.shape}")
    return _from_kept_blocks(cls, _blocks_of(dense, bh, bw), block_mask, (k, n))

  def to_dense(self):
    """The dense `[K, N]` matrix (padding dropped)."""
    (k, n), (bh, bw) = self.shape, self.block_size
    nbr, nbc = self.block_grid
    # A block taller than K or wider than N is cut to it first (the rest is
    # padding), so the scattered grid stays below twice the dense size.
    ebh, ebw = min(bh, k), min(bw, n)
    values = self.values
    if (ebh, ebw) != (bh, bw):
      values = values[:, :ebh, :ebw]
    where = tf.stack([self.row_ids(), self.col_indices], axis=1)
    blocks = tf.scatter_nd(where, values, [nbr, nbc, ebh, ebw])
    dense = tf.reshape(tf.transpose(blocks, [0, 2, 1, 3]), [nbr * ebh, nbc * ebw])
    return dense[:k, :n]

  def with_values(self, values):
    """The same layout holding other block values (e.g. a cast or a variable)."""
    return BlockSparseMatrix(values, self.col_indices, self.row_ptr, self.shape)

  def numpy_components(self):
    """`(values, col_indices, row_ptr)` as numpy arrays (eager only)."""
    return (self.values.numpy(), self.col_indices.numpy(), self.row_ptr.numpy())


def _as_tensor(value):
  # convert_to_tensor of a tensor is the tensor, but costs a dispatch.
  return value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)


def _blocks_of(dense, bh, bw):
  """`[nbr, nbc, bh, bw]` view of a zero-padded 2-D tensor."""
  k, n = (int(d) for d in dense.shape)
  nbr, nbc = validation.ceil_div(k, bh), validation.ceil_div(n, bw)
  padded = tf.pad(dense, [[0, nbr * bh - k], [0, nbc * bw - n]])
  return tf.transpose(tf.reshape(padded, [nbr, bh, nbc, bw]), [0, 2, 1, 3])


def _from_kept_blocks(cls, blocks, keep, shape):
  # tf.where lists the kept blocks in row-major order: rows grouped, columns
  # increasing, which is exactly BSR order.
  where = tf.cast(tf.where(keep), tf.int32)
  counts = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
  row_ptr = tf.concat([[0], tf.cumsum(counts)], axis=0)
  return cls(tf.gather_nd(blocks, where), where[:, 1], row_ptr, shape)
