"""Block-sparse weights of the `BlockSparse*` layers, as Keras variables.

A weight is either dense (one `[K, N]` variable) or block sparse: three
variables holding the BSR components of a `BlockSparseMatrix`, the block
values trainable and the layout (`col_indices`, `row_ptr`, int32) not, so
fine-tuning keeps the layout. The number of stored blocks is part of the
layer config (`*_blocks`), so a layer rebuilt from its config has variables
of the saved shapes and loading the weights restores the layout.
"""

import functools

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.bsr import validation
from tf_blocksparse.bsr.matrix import BlockSparseMatrix


def block_size_pair(block_size):
  """Normalises an int or pair to `(bh, bw)` of positive ints."""
  if isinstance(block_size, bool):
    raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
  if isinstance(block_size, (int, np.integer)):
    block_size = (int(block_size), int(block_size))
  try:
    bh, bw = (int(b) for b in block_size)
  except (TypeError, ValueError):
    raise TypeError(
        f"block_size must be an int or a pair of ints, got {block_size!r}") from None
  if bh <= 0 or bw <= 0:
    raise ValueError(f"block_size must be positive, got ({bh}, {bw})")
  return bh, bw


def grid(shape, block_size):
  """`(block rows, block columns)` of a `[K, N]` weight."""
  (k, n), (bh, bw) = shape, block_size
  return validation.ceil_div(k, bh), validation.ceil_div(n, bw)


def resolve_blocks(blocks, density, shape, block_size, what):
  """Number of stored blocks from an explicit count or a density (or None)."""
  nbr, nbc = grid(shape, block_size)
  total = nbr * nbc
  if blocks is None and density is not None:
    density = float(density)
    if not 0.0 <= density <= 1.0:
      raise ValueError(f"density must be in [0, 1], got {density}")
    blocks = int(round(density * total))
  if blocks is None:
    return None
  if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)):
    raise TypeError(f"{what} must be an int number of blocks, got {blocks!r}")
  if not 0 <= blocks <= total:
    raise ValueError(f"{what} must be in [0, {total}] for a {list(shape)} weight "
                     f"in {block_size} blocks, got {blocks}")
  return int(blocks)


def spread_mask(shape, block_size, blocks):
  """A deterministic initial layout with `blocks` blocks, evenly spread."""
  nbr, nbc = grid(shape, block_size)
  total = nbr * nbc
  chosen = np.random.RandomState(0).choice(total, size=blocks, replace=False)
  mask = np.zeros(total, bool)
  mask[chosen] = True
  return mask.reshape(nbr, nbc)


class BsrWeight:
  """The variables of one block-sparse weight of a layer."""

  def __init__(self, layer, name, shape, block_size, blocks, initializer,
               dtype, trainable=True):
    self.shape = tuple(int(d) for d in shape)
    self.block_size = block_size
    bh, bw = block_size
    mask = spread_mask(self.shape, block_size, blocks)
    dense_init = tf_keras.initializers.get(initializer)

    def values_init(shape, dtype=None):
      dense = dense_init(self.shape, dtype=dtype)
      return BlockSparseMatrix.from_mask(dense, mask, block_size).values

    where = np.argwhere(mask)
    row_ptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    self.values = layer.add_weight(
        f"{name}_values", shape=(blocks, bh, bw), initializer=values_init,
        dtype=dtype, trainable=trainable)
    self.col_indices = layer.add_weight(
        f"{name}_col_indices", shape=(blocks,), dtype=tf.int32,
        initializer=tf_keras.initializers.Constant(where[:, 1].astype(np.int32)),
        trainable=False)
    self.row_ptr = layer.add_weight(
        f"{name}_row_ptr", shape=(len(row_ptr),), dtype=tf.int32,
        initializer=tf_keras.initializers.Constant(row_ptr), trainable=False)
    # Plain variables (no distribution wrapper) can be read by their handle.
    self._layout_by_handle = all(type(v).__name__ == "ResourceVariable"
                                 for v in (self.col_indices, self.row_ptr))

  def matrix(self):
    """The `BlockSparseMatrix` over the current variable values."""
    return BlockSparseMatrix(self.values, self.col_indices, self.row_ptr,
                             self.shape)

  def product_matrix(self):
    """`matrix()` without the eager host-side layout checks, for products.

    The layout was checked when it was set (`assign`; the initial spread is
    valid by construction), and the products check it again in their
    kernels or graph assertions, so a call need not copy the indices to the
    host to check them. Only for inputs of `bsr_matmul` and the fused ops:
    other uses (`to_dense`) rely on a validated matrix.
    """
    col_indices, row_ptr = self.col_indices, self.row_ptr
    if self._layout_by_handle and tf.executing_eagerly():
      # The layout is not differentiated: a bare read skips the tape and
      # conversion machinery, which costs about as much as the read itself.
      col_indices, row_ptr = (
          tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=tf.int32)
          for v in (col_indices, row_ptr))
    return BlockSparseMatrix._from_checked_layout(  # pylint: disable=protected-access
        self.values, col_indices, row_ptr, self.shape)

  def assign(self, matrix):
    """Copies a `BlockSparseMatrix` with the same number of blocks in."""
    values, col_indices, row_ptr = (np.asarray(c) for c in (
        matrix.values, matrix.col_indices, matrix.row_ptr))
    if values.shape != tuple(self.values.shape):
      raise ValueError(f"expected values of shape {tuple(self.values.shape)}, "
                       f"got {values.shape}")
    # Once here rather than on every call: calls trust the stored layout.
    validation.check_numpy(values.shape[0], col_indices, row_ptr, self.shape,
                           self.block_size)
    self.values.assign(values)
    self.col_indices.assign(col_indices)
    self.row_ptr.assign(row_ptr)


def full_layout(dense, block_size):
  """A dense `[K, N]` tensor as a BSR matrix storing every block.

  Differentiable with respect to `dense`; used to run a dense recurrent
  weight through the fused sequence ops.
  """
  k, n = (int(d) for d in dense.shape)
  bh, bw = block_size
  nbr, nbc = grid((k, n), block_size)
  padded = tf.pad(dense, [[0, nbr * bh - k], [0, nbc * bw - n]])
  values = tf.reshape(
      tf.transpose(tf.reshape(padded, [nbr, bh, nbc, bw]), [0, 2, 1, 3]),
      [nbr * nbc, bh, bw])
  col_indices, row_ptr = _full_indices(nbr, nbc)
  # Valid by construction: no need for the host-side checks of __init__.
  return BlockSparseMatrix._from_checked_layout(  # pylint: disable=protected-access
      values, col_indices, row_ptr, (k, n))


@functools.lru_cache(maxsize=64)
def _full_indices(nbr, nbc):
  """`col_indices`, `row_ptr` of a full block grid, built once per grid."""
  col_indices = np.tile(np.arange(nbc, dtype=np.int32), nbr)
  row_ptr = np.arange(nbr + 1, dtype=np.int32) * nbc
  for a in (col_indices, row_ptr):
    a.setflags(write=False)  # shared between calls
  return col_indices, row_ptr


def matmul(x, weight):
  """`x @ W` for `x [..., K]` and a dense tensor or `BsrWeight`."""
  from tf_blocksparse.ops import bsr_matmul  # pylint: disable=import-outside-toplevel
  if isinstance(weight, BsrWeight):
    return bsr_matmul(x, weight.product_matrix())
  w = tf.convert_to_tensor(weight)
  if x.shape.rank == 2:
    return tf.matmul(x, w)
  return tf.tensordot(x, w, axes=[[x.shape.rank - 1], [0]])


def dense_value(weight):
  """The dense `[K, N]` value of a dense variable or a `BsrWeight`."""
  if isinstance(weight, BsrWeight):
    return weight.matrix().to_dense()
  return tf.convert_to_tensor(weight)


def add_weight(layer, name, shape, block_size, blocks, initializer, dtype):
  """A `BsrWeight` when `blocks` is an int, else a dense variable."""
  if blocks is None:
    return layer.add_weight(name, shape=tuple(shape), initializer=initializer,
                            dtype=dtype, trainable=True)
  return BsrWeight(layer, name, shape, block_size, blocks, initializer, dtype)
