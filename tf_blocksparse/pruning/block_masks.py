"""The arithmetic of block masks, free of Keras.

A weight is seen as a matrix `[K, N]` (a Conv1D kernel `[k, in, out]` as
`[k * in, out]`) whose last axis holds `gates` equal slices (1 for Dense and
SimpleRNN, 3 for GRU, 4 for LSTM). Each slice `[K, N / gates]` is cut into
`bh x bw` blocks; when a slice is not a multiple of the block shape, the
blocks on its bottom/right edge are partial. Block quantities are laid out as
`[gates, ceil(K / bh), ceil(N / gates / bw)]`.

Partial blocks are judged like whole ones: `"avg"` averages only the
elements that exist and `"l2"` is the norm a whole block would have with
the same root mean square (for whole blocks it is the plain L2 norm), so a
small edge block is not pruned merely for being small.

All functions take and return tensors and run eagerly or inside
`tf.function`.
"""

import numpy as np
import tensorflow as tf

POOLINGS = ("max", "avg", "l2")


def check_block_size(block_size):
  """Normalises an int or pair to a pair of positive ints.

  >>> check_block_size(4), check_block_size((2, 8))
  ((4, 4), (2, 8))
  """
  if isinstance(block_size, (int, np.integer)) and not isinstance(
      block_size, bool):
    block_size = (block_size, block_size)
  try:
    bh, bw = block_size
  except (TypeError, ValueError):
    raise ValueError(f"block_size must be an int or a pair (height, width) "
                     f"of ints, got {block_size!r}.") from None
  for b in (bh, bw):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise ValueError(f"block_size must hold ints, got {block_size!r}.")
  if bh <= 0 or bw <= 0:
    raise ValueError(f"block_size must be positive, got ({bh}, {bw}); use "
                     f"e.g. (4, 4), or (1, 1) for element-wise pruning.")
  return int(bh), int(bw)


def check_pooling(pooling):
  """Normalises a block representative name (case-insensitive)."""
  name = str(pooling).lower() if isinstance(pooling, str) else None
  if name not in POOLINGS:
    raise ValueError(f"Unknown block_pooling {pooling!r}; use one of "
                     f"{', '.join(repr(p) for p in POOLINGS)}.")
  return name


def matrix_shape(weight_shape, row_axes=None):
  """The `[K, N]` matrix view of a weight of any rank.

  The first `row_axes` axes make the rows and the others the columns;
  `None` means all but the last (a Conv2D kernel `[kh, kw, in, out]` is
  `[kh * kw * in, out]`), a negative count leaves that many axes to the
  columns (a depthwise kernel `[kh, kw, in, mult]` with `row_axes=-2` is
  `[kh * kw, in * mult]`). A vector is one row, a scalar `[1, 1]`.

  >>> matrix_shape((3, 3, 8, 16)), matrix_shape((3, 3, 8, 2), -2)
  ((72, 16), (9, 16))
  >>> matrix_shape((5,)), matrix_shape(())
  ((1, 5), (1, 1))
  """
  shape = [int(d) for d in weight_shape]
  if len(shape) < 2:
    return 1, (shape[0] if shape else 1)
  split = len(shape) - 1 if row_axes is None else int(row_axes)
  if split < 0:
    split += len(shape)
  if not 0 < split < len(shape):
    raise ValueError(f"row_axes={row_axes} does not split a weight of shape "
                     f"{shape} into rows and columns; use a count in "
                     f"[1, {len(shape) - 1}] or in [-{len(shape) - 1}, -1].")
  return int(np.prod(shape[:split])), int(np.prod(shape[split:]))


def block_grid(matrix_shape_, block_size, gates=1):
  """`(gates, block rows, block columns per gate)` of a `[K, N]` matrix."""
  k, n = matrix_shape_
  if n % gates:
    raise ValueError(f"A weight with {n} columns cannot split into {gates} "
                     f"equal gate slices.")
  bh, bw = block_size
  return gates, -(-k // bh), -(-(n // gates) // bw)


def block_element_counts(matrix_shape_, block_size, gates=1):
  """Number of real elements of each block, `[gates, nbr, nbc]` numpy."""
  k, n = matrix_shape_
  bh, bw = block_size
  g, nbr, nbc = block_grid(matrix_shape_, block_size, gates)
  u = n // gates
  rows = np.minimum(bh, k - bh * np.arange(nbr))
  cols = np.minimum(bw, u - bw * np.arange(nbc))
  return np.broadcast_to(np.outer(rows, cols), (g, nbr, nbc)).copy()


def _blocked(matrix, block_size, gates):
  """`[K, N]` -> zero padded `[gates, nbr, bh, nbc, bw]`."""
  k, n = matrix.shape
  bh, bw = block_size
  g, nbr, nbc = block_grid((k, n), block_size, gates)
  u = n // g
  x = tf.transpose(tf.reshape(matrix, [k, g, u]), [1, 0, 2])
  x = tf.pad(x, [[0, 0], [0, nbr * bh - k], [0, nbc * bw - u]])
  return tf.reshape(x, [g, nbr, bh, nbc, bw])


def block_l2_norms(matrix, block_size, gates=1):
  """Plain L2 norm of each block, `[gates, nbr, nbc]`.

  The gradient of an all-zero block's norm is taken as zero (not NaN), so
  penalties built on it can be trained through pruned blocks.
  """
  matrix = tf.convert_to_tensor(matrix)
  sq = tf.reduce_sum(tf.square(_blocked(matrix, block_size, gates)), [2, 4])
  nonzero = sq > 0
  return tf.where(nonzero, tf.sqrt(tf.where(nonzero, sq, tf.ones_like(sq))),
                  tf.zeros_like(sq))


def representatives(matrix, block_size, pooling="max", gates=1):
  """The magnitude that stands for each block, `[gates, nbr, nbc]`.

  Args:
    matrix: `[K, N]` float tensor.
    block_size: `(bh, bw)`.
    pooling: `"max"` (largest |w|, as in Narang et al.), `"avg"` (mean |w|
      over the block's elements) or `"l2"` (see the module docstring).
    gates: number of gate slices of the last axis.

  >>> import numpy as np
  >>> m = np.arange(12, dtype=np.float32).reshape(3, 4) - 6
  >>> representatives(m, (2, 2), "max").numpy()[0]
  array([[6., 4.],
         [3., 5.]], dtype=float32)
  """
  matrix = tf.convert_to_tensor(matrix)
  pooling = check_pooling(pooling)
  if pooling == "l2":
    counts = block_element_counts(matrix.shape, block_size, gates)
    scale = np.sqrt(block_size[0] * block_size[1] / counts)
    return block_l2_norms(matrix, block_size, gates) * tf.constant(
        scale, matrix.dtype)
  blocks = tf.abs(_blocked(matrix, block_size, gates))
  if pooling == "max":
    return tf.reduce_max(blocks, [2, 4])
  counts = block_element_counts(matrix.shape, block_size, gates)
  return tf.reduce_sum(blocks, [2, 4]) / tf.constant(counts, matrix.dtype)


def expand(block_mask, matrix_shape_, block_size):
  """Block mask `[gates, nbr, nbc]` -> element mask `[K, N]` (same dtype)."""
  k, n = matrix_shape_
  bh, bw = block_size
  block_mask = tf.convert_to_tensor(block_mask)
  g = block_mask.shape[0]
  u = n // g
  x = tf.repeat(tf.repeat(block_mask, bh, axis=1), bw, axis=2)[:, :k, :u]
  return tf.reshape(tf.transpose(x, [1, 0, 2]), [k, n])


def from_element_mask(element_mask, block_size, gates=1):
  """Element mask `[K, N]` -> bool block mask: a block is kept if any of
  its elements is."""
  element_mask = tf.convert_to_tensor(element_mask)
  return representatives(element_mask, block_size, "max", gates) > 0


def keep_top_blocks(reps, sparsity, kept_before):
  """Keeps the blocks with the largest representatives.

  `round(n * sparsity)` of the `n` blocks are pruned (at least one block is
  kept). Blocks pruned before stay pruned: they rank below every live block
  and the result is and-ed with `kept_before`. Ties keep the earlier block.

  Returns:
    `(kept, weakest)`: the bool block mask and the smallest representative
    kept (the effective threshold).
  """
  reps = tf.convert_to_tensor(reps)
  shape = tf.shape(reps)
  flat = tf.reshape(reps, [-1])
  alive = tf.reshape(kept_before, [-1])
  n = tf.size(flat)
  ranked = tf.where(alive, flat, tf.fill([n], tf.constant(-np.inf, flat.dtype)))
  order = tf.argsort(ranked, direction="DESCENDING", stable=True)
  rank = tf.scatter_nd(order[:, None], tf.range(n), [n])
  n_prune = tf.cast(tf.floor(tf.cast(n, tf.float32) *
                             tf.cast(sparsity, tf.float32) + 0.5), tf.int32)
  n_keep = tf.maximum(n - n_prune, 1)
  kept = tf.logical_and(rank < n_keep, alive)
  weakest = tf.reduce_min(tf.where(kept, flat, tf.fill([n], flat.dtype.max)))
  return tf.reshape(kept, shape), weakest


def check_m_by_n(m_by_n):
  """Normalises `sparsity_m_by_n`: `(m, n)`, m zeros in every n, 0 < m < n.

  >>> check_m_by_n((2, 4)), check_m_by_n(None)
  ((2, 4), None)
  """
  if m_by_n is None:
    return None
  try:
    m, n = m_by_n
  except (TypeError, ValueError):
    m = n = None
  ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
           for v in (m, n))
  if not ok or not 0 < m < n:
    raise ValueError(f"sparsity_m_by_n must be a pair (m, n) of ints with "
                     f"0 < m < n (m zeros in every n consecutive blocks "
                     f"along the input axis), e.g. (2, 4); got {m_by_n!r}.")
  return int(m), int(n)


def keep_m_by_n(reps, m_by_n, kept_before, segment=None):
  """Prunes `m` of every `n` consecutive blocks down each block column.

  Groups run along the rows (the input axis of the matrix view) and
  restart every `segment` block rows (one input-channel run of a
  convolution tap), so a group never mixes two taps. A last partial group
  of `r` blocks keeps `min(n - m, r)`, as tfmot's M-by-N does. Blocks
  pruned before rank below every live block, so they stay pruned.

  Args:
    reps: `[gates, nbr, nbc]` representatives.
    m_by_n: `(m, n)`.
    kept_before: bool, like `reps`.
    segment: block rows per run; `None` is all `nbr`.

  Returns:
    `(kept, weakest)` as `keep_top_blocks`.

  >>> import numpy as np
  >>> reps = np.array([[[4.], [1.], [3.], [2.]]], np.float32)
  >>> kept, _ = keep_m_by_n(reps, (2, 4), np.ones([1, 4, 1], bool))
  >>> kept.numpy().ravel().tolist()
  [True, False, True, False]
  """
  reps = tf.convert_to_tensor(reps)
  g, nbr, nbc = [int(d) for d in reps.shape]
  m, n = m_by_n
  segment = nbr if segment is None else int(segment)
  runs = nbr // segment
  groups = -(-segment // n)
  pad = groups * n - segment
  low = tf.constant(-np.inf, reps.dtype)

  def grouped(x, fill):
    x = tf.reshape(x, [g, runs, segment, nbc])
    x = tf.pad(x, [[0, 0], [0, 0], [0, pad], [0, 0]], constant_values=fill)
    return tf.reshape(x, [g, runs, groups, n, nbc])

  alive = grouped(tf.convert_to_tensor(kept_before), False)
  real = grouped(tf.ones_like(kept_before, tf.bool), False)
  ranked = tf.where(alive, grouped(reps, low), low)
  order = tf.argsort(ranked, axis=3, direction="DESCENDING", stable=True)
  rank = tf.argsort(order, axis=3)   # the inverse permutation
  kept = (rank < n - m) & alive & real
  kept = tf.reshape(kept, [g, runs, groups * n, nbc])[:, :, :segment]
  kept = tf.reshape(kept, [g, nbr, nbc])
  weakest = tf.reduce_min(tf.where(kept, reps, tf.fill(tf.shape(reps),
                                                       reps.dtype.max)))
  return kept, weakest


def keep_above_threshold(reps, threshold, kept_before):
  """Prunes the blocks whose representative is below `threshold`."""
  reps = tf.convert_to_tensor(reps)
  return tf.logical_and(kept_before, reps >= tf.cast(threshold, reps.dtype))


def percentile(values, q):
  """The q-th percentile of `values`, interpolated like `np.percentile`."""
  flat = tf.sort(tf.reshape(tf.cast(values, tf.float32), [-1]))
  pos = (q / 100.0) * tf.cast(tf.size(flat) - 1, tf.float32)
  lo = tf.cast(tf.floor(pos), tf.int32)
  hi = tf.minimum(lo + 1, tf.size(flat) - 1)
  frac = pos - tf.floor(pos)
  return tf.gather(flat, lo) * (1 - frac) + tf.gather(flat, hi) * frac
