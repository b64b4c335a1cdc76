"""Checks of a BSR structure, shared by `BlockSparseMatrix` and the pure-TF op.

Three levels, used where each is cheapest:
- `check_static`: shapes and dtypes known while tracing (raises at once);
- `check_numpy`: index values of an eager matrix (raises at once);
- `structure_assertions`: the same index checks as graph ops, for the
  fallback matmul inside `tf.function`.
All raise `tf.errors.InvalidArgumentError` with a message naming the problem,
the same errors the C++ kernels give.
"""

import numpy as np
import tensorflow as tf


def invalid(message):
  """Returns an InvalidArgumentError carrying `message`."""
  return tf.errors.InvalidArgumentError(None, None, message)


def ceil_div(a, b):
  return -(-a // b)


def check_block_size(block_size):
  """Normalises an int or pair to a pair of positive ints."""
  if isinstance(block_size, (int, np.integer)):
    block_size = (int(block_size), int(block_size))
  try:
    bh, bw = (int(b) for b in block_size)
  except (TypeError, ValueError):
    raise invalid(f"block_size must be an int or a pair of ints, got {block_size!r}")
  if bh <= 0 or bw <= 0:
    raise invalid(f"block shape must be positive, got ({bh}, {bw})")
  return bh, bw


def check_static(values, col_indices, row_ptr, shape):
  """Checks everything known without reading the index values."""
  if len(shape) != 2:
    raise invalid(f"shape must be [K, N], got {shape!r}")
  k, n = shape
  if k < 0 or n < 0:
    raise invalid(f"dense shape must be non-negative, got [{k}, {n}]")
  if values.shape.rank != 3:
    raise invalid(f"values must have rank 3 [nnzb, bh, bw], got shape {values.shape}")
  if not values.dtype.is_floating:
    raise invalid(f"values must be floating point, got {values.dtype.name}")
  for name, t in (("col_indices", col_indices), ("row_ptr", row_ptr)):
    if t.dtype != tf.int32:
      raise invalid(f"{name} must be int32, got {t.dtype.name}")
    if t.shape.rank != 1:
      raise invalid(f"{name} must be a vector, got shape {t.shape}")
  bh, bw = values.shape[1], values.shape[2]
  if bh is None or bw is None:
    raise invalid("the block shape (values.shape[1:]) must be known statically")
  if bh <= 0 or bw <= 0:
    raise invalid(f"block shape must be positive, got ({bh}, {bw})")
  nbr = ceil_div(k, bh)
  if row_ptr.shape[0] is not None and row_ptr.shape[0] != nbr + 1:
    raise invalid(f"row_ptr must have ceil({k} / {bh}) + 1 = {nbr + 1} entries, "
                  f"got {row_ptr.shape[0]}")
  nnzb = values.shape[0]
  if (nnzb is not None and col_indices.shape[0] is not None
      and col_indices.shape[0] != nnzb):
    raise invalid(f"col_indices has {col_indices.shape[0]} entries but values "
                  f"holds {nnzb} blocks")


def check_numpy(nnzb, col_indices, row_ptr, shape, block_size):
  """Checks the index values of an eager matrix (numpy arrays)."""
  k, n = shape
  bh, bw = block_size
  nbr, nbc = ceil_div(k, bh), ceil_div(n, bw)
  if len(col_indices) != nnzb:
    raise invalid(f"col_indices has {len(col_indices)} entries but values holds "
                  f"{nnzb} blocks")
  if len(row_ptr) != nbr + 1:
    raise invalid(f"row_ptr must have ceil({k} / {bh}) + 1 = {nbr + 1} entries, "
                  f"got {len(row_ptr)}")
  if row_ptr[0] != 0:
    raise invalid(f"row_ptr[0] must be 0, got {row_ptr[0]}")
  steps = np.diff(row_ptr)
  if np.any(steps < 0):
    i = int(np.argmax(steps < 0))
    raise invalid(f"row_ptr must be non-decreasing, but row_ptr[{i + 1}] = "
                  f"{row_ptr[i + 1]} < row_ptr[{i}] = {row_ptr[i]}")
  if row_ptr[-1] != nnzb:
    raise invalid(f"row_ptr must end at the number of blocks {nnzb}, got {row_ptr[-1]}")
  bad = (col_indices < 0) | (col_indices >= nbc)
  if np.any(bad):
    p = int(np.argmax(bad))
    raise invalid(f"col_indices[{p}] = {col_indices[p]} is out of range [0, {nbc})")
  if nnzb > 1:
    row_ids = np.repeat(np.arange(nbr), steps)
    same_row = row_ids[1:] == row_ids[:-1]
    unsorted = same_row & (col_indices[1:] <= col_indices[:-1])
    if np.any(unsorted):
      p = int(np.argmax(unsorted))
      raise invalid("col_indices must be strictly increasing within a block row, "
                    f"but block row {row_ids[p]} has {col_indices[p]} before "
                    f"{col_indices[p + 1]}")


def structure_assertions(nnzb, col_indices, row_ptr, shape, block_size):
  """Graph-mode version of `check_numpy`; returns the row id of each block.

  The row ids are computed only after the row pointers were checked, so a
  malformed matrix fails with our message rather than inside `tf.repeat`.
  """
  k, n = shape
  bh, bw = block_size
  nbr, nbc = ceil_div(k, bh), ceil_div(n, bw)
  nnzb = tf.cast(nnzb, tf.int32)
  checks = [
      tf.debugging.assert_equal(
          tf.size(col_indices), nnzb,
          message="col_indices must have one entry per block of values"),
      tf.debugging.assert_equal(
          tf.size(row_ptr), nbr + 1,
          message=f"row_ptr must have ceil({k} / {bh}) + 1 = {nbr + 1} entries"),
  ]
  with tf.control_dependencies(checks):
    steps = row_ptr[1:] - row_ptr[:-1]
    checks = [
        tf.debugging.assert_equal(row_ptr[0], 0, message="row_ptr[0] must be 0"),
        tf.debugging.assert_non_negative(
            steps, message="row_ptr must be non-decreasing"),
        tf.debugging.assert_equal(
            row_ptr[-1], nnzb,
            message="row_ptr must end at the number of blocks"),
        tf.debugging.assert_non_negative(
            col_indices, message=f"col_indices must be in range [0, {nbc})"),
        tf.debugging.assert_less(
            col_indices, nbc, message=f"col_indices must be in range [0, {nbc})"),
    ]
  with tf.control_dependencies(checks):
    row_ids = tf.repeat(tf.range(nbr, dtype=tf.int32), steps)
    same_row = tf.equal(row_ids[1:], row_ids[:-1])
    increasing = tf.greater(col_indices[1:], col_indices[:-1])
    ordered = tf.debugging.Assert(
        tf.reduce_all(tf.logical_or(tf.logical_not(same_row), increasing)),
        ["col_indices must be strictly increasing within a block row"])
  with tf.control_dependencies([ordered]):
    return tf.identity(row_ids)
