"""Checks of a BSR structure, shared by `BlockSparseMatrix` and the pure-TF op.

Three levels, used where each is cheapest:
- `check_static`: shapes and dtypes known while tracing (raises at once);
- `check_numpy`: index values of an eager matrix (raises at once);
- `structure_assertions`: the same index checks as graph ops, for the
  fallback matmul inside `tf.function`.
All raise `tf.errors.InvalidArgumentError` with the texts of the C++ kernels
(`ops/bsr_structure.h`), in the same order, so that a malformed matrix fails
the same way on both paths. The graph checks format their message only when
they fail (`check`), so a valid call pays for the comparisons alone.

Index arithmetic is done in int64 (a wrapping int32 difference of row
pointers must not pass as a non-negative one), and every dimension is
bounded by `MAX_DIMENSION` before anything is derived from it.
"""

import numpy as np
import tensorflow as tf

# The largest dense (K, N) or block (bh, bw) dimension: kMaxDimension in
# ops/bsr_structure.h. Then the padded shape and the block grid fit int32
# (the block indices, and TensorFlow's int32 shapes in the graph ops).
MAX_DIMENSION = 2**30


def invalid(message):
  """Returns an InvalidArgumentError carrying `message`."""
  return tf.errors.InvalidArgumentError(None, None, message)


def ceil_div(a, b):
  return -(-a // b)


def check(ok, message):
  """A graph check: fails with `message()` (a string tensor) unless `ok`.

  Returns a tensor to use as a control dependency. The message ops run only
  in the failing branch. Raised as InvalidArgumentError; the text appears
  in the error message (after TensorFlow's "assertion failed:").
  """
  def fail():
    with tf.control_dependencies([tf.debugging.Assert(False, [message()])]):
      return tf.constant(False)
  return tf.cond(ok, lambda: tf.constant(True), fail)


def first_failure(conditions):
  """`check` of several `(ok, message)` pairs; the first failing one wins.

  One branch for all of them, so that a valid call runs one cond. Every
  message is built in that branch and the first failing one picked, so a
  message must be safe to build whatever the inputs (clamp its indices).
  """
  if not conditions:
    return None
  oks = [c for c, _ in conditions]
  if len(oks) == 1:
    return check(oks[0], conditions[0][1])
  oks = tf.stack(oks)

  def message():
    first = tf.argmin(tf.cast(oks, tf.int32), output_type=tf.int32)
    return tf.gather(tf.stack([make() for _, make in conditions]), first)
  return check(tf.reduce_all(oks), message)


def shape_string(shape):
  """`[a,b]` like TensorShape::DebugString, from a 1-D shape tensor."""
  parts = tf.strings.reduce_join(tf.strings.as_string(shape), separator=",")
  return tf.strings.join(["[", parts, "]"])


def fmt(template, *args):
  """tf.strings.format with `{}` placeholders and scalar arguments."""
  return tf.strings.format(template, list(args)) if args else tf.constant(template)


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
  if bh > MAX_DIMENSION or bw > MAX_DIMENSION:
    raise invalid(f"block shape must be at most {MAX_DIMENSION} per dimension, "
                  f"got ({bh}, {bw})")
  return bh, bw


def check_dims(shape, block_size):
  """The dimension rules of ValidateBsr, in its order (static ints)."""
  (k, n), (bh, bw) = shape, block_size
  if bh <= 0 or bw <= 0:
    raise invalid(f"block shape must be positive, got ({bh}, {bw})")
  if k < 0 or n < 0:
    raise invalid(f"dense shape must be non-negative, got [{k}, {n}]")
  if k > MAX_DIMENSION or n > MAX_DIMENSION:
    raise invalid(f"dense shape must be at most {MAX_DIMENSION} per dimension "
                  f"(int32 indices), got [{k}, {n}]")
  if bh > MAX_DIMENSION or bw > MAX_DIMENSION:
    raise invalid(f"block shape must be at most {MAX_DIMENSION} per dimension, "
                  f"got ({bh}, {bw})")


def check_static(values, col_indices, row_ptr, shape):
  """Checks everything known without reading the index values."""
  if len(shape) != 2:
    raise invalid(f"shape must be [K, N], got {shape!r}")
  try:
    k, n = (int(d) for d in shape)
  except (TypeError, ValueError):
    raise invalid(f"shape must be two ints [K, N], got {shape!r}")
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
  check_dims((k, n), (bh, bw))
  nbr = ceil_div(k, bh)
  nnzb = values.shape[0]
  if (nnzb is not None and col_indices.shape[0] is not None
      and col_indices.shape[0] != nnzb):
    raise invalid(f"col_indices has {col_indices.shape[0]} entries but values "
                  f"holds {nnzb} blocks")
  if row_ptr.shape[0] is not None and row_ptr.shape[0] != nbr + 1:
    raise invalid(f"row_ptr must have ceil({k} / {bh}) + 1 = {nbr + 1} entries, "
                  f"got {row_ptr.shape[0]}")


def check_matrix(matrix):
  """Every check of a matrix that can run now: the static ones, and the
  index values too when eager. For error paths that must report a broken
  layout before their own problem, as the kernels order their checks."""
  check_static(matrix.values, matrix.col_indices, matrix.row_ptr, matrix.shape)
  if tf.executing_eagerly():
    check_numpy(int(matrix.values.shape[0]), matrix.col_indices.numpy(),
                matrix.row_ptr.numpy(), matrix.shape, matrix.block_size)


def check_numpy(nnzb, col_indices, row_ptr, shape, block_size):
  """Checks the index values of an eager matrix (numpy arrays)."""
  k, n = shape
  bh, bw = block_size
  check_dims(shape, block_size)
  nbr, nbc = ceil_div(k, bh), ceil_div(n, bw)
  col_indices = np.asarray(col_indices, np.int64)
  row_ptr = np.asarray(row_ptr, np.int64)
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
  if nnzb == 0:
    return
  # The first block (in storage order) that is out of range or out of order.
  bad_range = (col_indices < 0) | (col_indices >= nbc)
  row_ids = np.repeat(np.arange(nbr), steps)
  bad_order = np.zeros(nnzb, bool)
  bad_order[1:] = ((row_ids[1:] == row_ids[:-1])
                   & (col_indices[1:] <= col_indices[:-1]))
  bad = bad_range | bad_order
  if np.any(bad):
    p = int(np.argmax(bad))
    if bad_range[p]:
      raise invalid(f"col_indices[{p}] = {col_indices[p]} is out of range "
                    f"[0, {nbc})")
    raise invalid("col_indices must be strictly increasing within a block row, "
                  f"but block row {row_ids[p]} has {col_indices[p - 1]} before "
                  f"{col_indices[p]}")


def num_blocks(values):
  """The number of stored blocks: static where known (no shape op traced
  for it), else a tensor."""
  nnzb = values.shape[0]
  return nnzb if nnzb is not None else tf.shape(values)[0]


def structure_assertions(nnzb, col_indices, row_ptr, shape, block_size):
  """Graph-mode version of `check_numpy`; returns the row id of each block.

  In three stages, each run only once the previous one passed: the sizes,
  the row pointers, the column indices. The row ids are computed only after
  the row pointers were checked, so a malformed matrix fails with our
  message rather than inside `tf.repeat` (or asking it for 2^31 elements).

  The dimensions are checked here, statically; the index checks are one
  traced function shared by every call site (`_layout_checks`): a graph that
  multiplies several matrices, or a SavedModel with several signatures,
  holds one copy of them and a call node per site, not ~50 nodes each.
  """
  check_dims(shape, block_size)
  dims = tf.constant([*shape, *block_size], tf.int64)
  return _layout_checks(tf.cast(nnzb, tf.int64), col_indices, row_ptr, dims)


@tf.function(autograph=False, input_signature=[
    tf.TensorSpec([], tf.int64), tf.TensorSpec([None], tf.int32),
    tf.TensorSpec([None], tf.int32), tf.TensorSpec([4], tf.int64)])
def _layout_checks(nnzb, col_indices, row_ptr, dims):
  """The index checks of `structure_assertions`; `dims` = (K, N, bh, bw),
  already bounded by `check_dims` (so the block grid below cannot wrap)."""
  k, n, bh, bw = tf.unstack(dims)
  nbr = (k + bh - 1) // bh
  nbc = (n + bw - 1) // bw
  num_cols = tf.size(col_indices, out_type=tf.int64)
  num_ptr = tf.size(row_ptr, out_type=tf.int64)
  sizes = first_failure([
      (tf.equal(num_cols, nnzb),
       lambda: fmt("col_indices has {} entries but values holds {} blocks",
                   num_cols, nnzb)),
      (tf.equal(num_ptr, nbr + 1),
       lambda: fmt("row_ptr must have ceil({} / {}) + 1 = {} entries, got {}",
                   k, bh, nbr + 1, num_ptr)),
  ])
  with tf.control_dependencies([sizes]):
    # From here row_ptr has nbr + 1 >= 1 entries.
    ptr = tf.cast(row_ptr, tf.int64)
    steps = ptr[1:] - ptr[:-1]
    decreasing = steps < 0
    # First decreasing step, clamped (to a valid pair; with one entry, i = 0
    # and i + 1 -> 0) so that its message is safe to build when another
    # check fails.
    i = tf.minimum(tf.argmax(tf.concat([decreasing, [True]], 0),
                             output_type=tf.int64), tf.maximum(nbr - 1, 0))
    first, last = ptr[0], ptr[-1]
    pointers = first_failure([
        (tf.equal(first, 0), lambda: fmt("row_ptr[0] must be 0, got {}", first)),
        (tf.logical_not(tf.reduce_any(decreasing)),
         lambda: fmt("row_ptr must be non-decreasing, but row_ptr[{}] = {} < "
                     "row_ptr[{}] = {}", i + 1,
                     tf.gather(ptr, tf.minimum(i + 1, nbr)), i, ptr[i])),
        (tf.equal(last, nnzb),
         lambda: fmt("row_ptr must end at the number of blocks {}, got {}",
                     nnzb, last)),
    ])
  with tf.control_dependencies([pointers]):
    # Sized by the blocks, not by nbr: Grappler may constant-fold a
    # tf.range(nbr) of the dense shape before any check runs (2**30 rows
    # allocated gigabytes and crashed the process: fuzz seed 1511839).
    blocks = tf.range(nnzb, dtype=tf.int64)
    row_ids = tf.searchsorted(ptr[1:], blocks, side="right", out_type=tf.int32)
    cols = tf.cast(col_indices, tf.int64)
    bad_range = (cols < 0) | (cols >= nbc)
    bad_order = tf.concat(
        [[False], tf.equal(row_ids[1:], row_ids[:-1]) & (cols[1:] <= cols[:-1])],
        0)[:tf.size(cols)]
    bad = bad_range | bad_order
    p = tf.argmax(tf.concat([bad, [True]], 0), output_type=tf.int64)

    def column_message():
      q = tf.minimum(p, tf.maximum(num_cols - 1, 0))
      range_text = fmt("col_indices[{}] = {} is out of range [0, {})",
                       p, cols[q], nbc)
      order_text = fmt("col_indices must be strictly increasing within a block "
                       "row, but block row {} has {} before {}",
                       row_ids[q], cols[tf.maximum(q - 1, 0)], cols[q])
      return tf.where(bad_range[q], range_text, order_text)

    columns = check(tf.logical_not(tf.reduce_any(bad)), column_message)
  with tf.control_dependencies([columns]):
    return tf.identity(row_ids)
