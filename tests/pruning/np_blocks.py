"""Independent numpy references for block pruning tests (plain loops)."""

import numpy as np


def as_matrix(w, row_axes=None):
  """The first `row_axes` axes (all but the last by default) as rows."""
  w = np.asarray(w)
  if w.ndim < 2:
    return w.reshape(1, -1)
  split = w.ndim - 1 if row_axes is None else row_axes % w.ndim
  rows = 1
  for d in w.shape[:split]:
    rows *= d
  return w.reshape(rows, -1)


def blocks(w, block_size, gates=1, row_axes=None):
  """Yields (g, i, j, block view) over gate slices, partial blocks included."""
  m = as_matrix(w, row_axes)
  k, n = m.shape
  u = n // gates
  bh, bw = block_size
  for g in range(gates):
    s = m[:, g * u:(g + 1) * u]
    for i in range(0, k, bh):
      for j in range(0, u, bw):
        yield g, i // bh, j // bw, s[i:i + bh, j:j + bw]


def grid(w, block_size, gates=1, row_axes=None):
  m = as_matrix(w, row_axes)
  k, n = m.shape
  u = n // gates
  return gates, -(-k // block_size[0]), -(-u // block_size[1])


def representatives(w, block_size, pooling, gates=1, row_axes=None):
  out = np.zeros(grid(w, block_size, gates, row_axes))
  nb = block_size[0] * block_size[1]
  for g, i, j, b in blocks(w, block_size, gates, row_axes):
    a = np.abs(b.astype(np.float64))
    if pooling == "max":
      out[g, i, j] = a.max()
    elif pooling == "avg":
      out[g, i, j] = a.mean()
    else:  # l2 of a whole block with the same mean square
      out[g, i, j] = np.sqrt((a ** 2).mean() * nb)
  return out


def block_mask_of_values(w, block_size, gates=1, row_axes=None):
  """True where a block holds any non-zero element."""
  out = np.zeros(grid(w, block_size, gates, row_axes), bool)
  for g, i, j, b in blocks(w, block_size, gates, row_axes):
    out[g, i, j] = np.any(b != 0)
  return out


def expand(block_mask, w_shape, block_size, gates=1, row_axes=None):
  """Element mask of a weight of shape `w_shape` from a block mask."""
  m = np.zeros(as_matrix(np.zeros(w_shape), row_axes).shape)
  u = m.shape[1] // gates
  bh, bw = block_size
  for g in range(gates):
    for i in range(block_mask.shape[1]):
      for j in range(block_mask.shape[2]):
        m[i * bh:(i + 1) * bh, g * u + j * bw:min(g * u + (j + 1) * bw,
                                                  (g + 1) * u)] = \
            block_mask[g, i, j]
  return m.reshape(w_shape)


def top_blocks(reps, sparsity):
  """Keeps n - round(n * sparsity) blocks with the largest reps (>= 1)."""
  flat = reps.ravel()
  n = flat.size
  keep = max(n - int(np.floor(n * sparsity + 0.5)), 1)
  order = np.argsort(-flat, kind="stable")
  mask = np.zeros(n, bool)
  mask[order[:keep]] = True
  return mask.reshape(reps.shape)


def assert_block_structure(value, block_size, gates=1, row_axes=None):
  """Every block is either all zero or has no zero at all (an untouched
  trained block of random weights has no exact zeros)."""
  for g, i, j, b in blocks(value, block_size, gates, row_axes):
    nz = np.count_nonzero(b)
    assert nz in (0, b.size), (g, i, j, b)


def m_by_n_blocks(reps, m_by_n, segment=None):
  """Block mask keeping n - m of every n consecutive block rows (the
  largest, earlier on ties) in each block column, groups restarting every
  `segment` block rows; a last partial group of r keeps min(n - m, r)."""
  m, n = m_by_n
  g, nbr, nbc = reps.shape
  segment = segment or nbr
  keep = np.zeros(reps.shape, bool)
  for gi in range(g):
    for j in range(nbc):
      for start in range(0, nbr, segment):
        for lo in range(start, start + segment, n):
          hi = min(lo + n, start + segment)
          vals = reps[gi, lo:hi, j]
          order = np.argsort(-vals, kind="stable")[:n - m]
          keep[gi, lo + order, j] = True
  return keep
