"""Helpers shared by the BSR tests: random block-sparse matrices and the
execution paths: the compiled kernels on every CPU instruction set this
machine runs ("custom:avx512", ...), and the pure-TF fallback."""

import contextlib

import numpy as np

import tf_blocksparse as tfbs


def _supported_isas():
  info = tfbs.ops.kernel_info()
  return info.get("supported", []) if info["custom_ops"] else []


# "custom" alone is the ISA the dispatch picks; the named ones are forced.
PATHS = tuple(f"custom:{isa}" for isa in _supported_isas()) + ("fallback",)


@contextlib.contextmanager
def path_scope(path):
  """Runs the block with the compiled ops (custom[:isa]) or the pure-TF ones."""
  kind, _, isa = path.partition(":")
  if kind == "custom" and isa:
    tfbs.ops.set_kernel_isa(isa)
  try:
    with tfbs.ops.use_custom_ops(kind == "custom"):
      yield
  finally:
    if kind == "custom" and isa:
      tfbs.ops.set_kernel_isa("auto")


def random_block_sparse(rng, k, n, block, density=0.4, dtype=np.float32):
  """A dense [k, n] array whose non-zeros fill random whole blocks, and its
  block mask. Edge blocks are cut at k and n (ragged shapes)."""
  bh, bw = block
  nbr, nbc = -(-k // bh), -(-n // bw)
  mask = rng.random([nbr, nbc]) < density
  expand = np.kron(mask, np.ones([bh, bw]))[:k, :n]
  dense = rng.standard_normal([k, n]) * expand
  return dense.astype(dtype), mask


def numpy_bsr(dense, mask, block):
  """BSR components built with plain loops, as an independent reference."""
  bh, bw = block
  k, n = dense.shape
  values, cols, row_ptr = [], [], [0]
  for i in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      if mask[i, j]:
        blk = np.zeros([bh, bw], dense.dtype)
        part = dense[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]
        blk[:part.shape[0], :part.shape[1]] = part
        values.append(blk)
        cols.append(j)
    row_ptr.append(len(cols))
  values = np.array(values, dense.dtype).reshape([-1, bh, bw])
  return values, np.array(cols, np.int32), np.array(row_ptr, np.int32)
