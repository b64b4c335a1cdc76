"""Structured random cases for the BSR ops, their oracle, and how to run them.

A case is a function of its seed only (`make_case(suite, seed)`), so a case
that crashed a worker is regenerated and saved by the driver. Each case is
a valid BSR problem, mutated about half the time the way an attacker or a
careless user would: dense shapes near the int32/int64 limits, negative or
zero sizes, huge block shapes with no blocks, row pointers that wrap,
decrease or end wrong, column indices out of range or out of order, wrong
operand and state shapes, NaN/Inf in operands and in the edge blocks'
padding.

The oracle (`bsr_error`, `dense_operand`) restates the contract
independently of `tf_blocksparse/bsr/validation.py`: it decides whether a
case is valid, and for a valid one the numpy reference gives the answer
(non-stored blocks are structural zeros, padding is ignored, stored entries
follow IEEE arithmetic). `run_case` executes a case on one path and
classifies the outcome:

  ok        valid, and the result equals the reference
  rejected  invalid, and InvalidArgumentError was raised (with the
            oracle's structure message where it names one)
  wrong     valid, but the result differs from the reference
  silent    invalid, but a result came back
  refused   valid, but an error was raised
  message   invalid and rejected, but with a different message
  unexpected  an exception other than InvalidArgumentError
  oom       ResourceExhausted or MemoryError (the cases are small)
"""

import json

import numpy as np
import tensorflow as tf

import tf_blocksparse as tfbs
from tf_blocksparse.ops import _loader
from bsr_testing import core_message
from bsr_testing import numpy_rnn
from bsr_testing import path_scope
from bsr_testing import sigmoid

MAX_DIM = 2**30
HUGE = [2**30, 2**30 + 1, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
INT32_EDGES = [-2**31, -2**31 + 1, -1, 2**31 - 1, 2**31 - 2]
GATES = {"lstm": 4, "gru": 3, "simple": 1}
FINDINGS = ("wrong", "silent", "refused", "message", "unexpected", "oom")

RAW_OPS = ("raw_matmul", "raw_transposed", "raw_values_grad", "raw_lstm",
           "raw_gru", "raw_simple", "raw_kernel_isa")
PUBLIC_OPS = ("bsr_matmul", "bsr_matmul_grad", "lstm_sequence",
              "gru_sequence", "simple_rnn_sequence", "sequence_grad")
ISA_NAMES = ("baseline", "avx2", "avx512", "auto")


def ceil_div(a, b):
  return -(-a // b)


# --- generation -----------------------------------------------------------------


def random_bsr(rng, k, n, bh, bw, density, dtype=np.float32, garbage=0.0):
  """Valid components for a [k, n] matrix; padding is garbage with the
  given probability (NaN, Inf or a large value: the contract ignores it)."""
  nbr, nbc = ceil_div(k, bh), ceil_div(n, bw)
  mask = rng.random([nbr, nbc]) < density
  cols = np.nonzero(mask)[1].astype(np.int32)
  row_ptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
  values = rng.standard_normal([len(cols), bh, bw]).astype(dtype)
  if rng.random() < garbage and len(cols):
    fill = rng.choice([np.nan, np.inf, -np.inf, 1e30])
    rows = np.repeat(np.arange(nbr), mask.sum(1))
    for p in range(len(cols)):
      r_end = k - rows[p] * bh
      c_end = n - cols[p] * bw
      values[p, r_end:, :] = fill
      values[p, :, c_end:] = fill
  return values, cols, row_ptr


def mutate_bsr(rng, values, cols, ptr, shape):
  """One malformation (or a legal edge value) of the BSR components."""
  values, cols, ptr = values.copy(), cols.copy(), ptr.copy()
  k, n = shape
  what = rng.integers(14)
  if what == 0:
    shape = (int(rng.choice(HUGE)), n) if rng.random() < 0.5 else (k, int(rng.choice(HUGE)))
  elif what == 1:
    shape = (-int(rng.integers(1, 3)), n) if rng.random() < 0.5 else (k, -int(rng.integers(1, 2**40)))
  elif what == 2:  # a neighbouring dense shape (may stay valid)
    shape = (max(0, k + int(rng.integers(-3, 4))), max(0, n + int(rng.integers(-3, 4))))
  elif what == 3:  # huge blocks with no blocks stored
    # (numpy needs bh * bw * itemsize < 2^63 even for no blocks)
    bh = int(rng.choice(HUGE[:4])) if rng.random() < 0.7 else 1
    bw = int(rng.choice([1, 3, 2**20, 2**30, 2**30 + 1, 2**31]))
    if bh * bw >= 2**58:
      bw = 1
    values = np.zeros([0, bh, bw], values.dtype)
    cols = np.zeros([0], np.int32)
    ptr = np.zeros([ceil_div(k, bh) + 1 if k < 2**20 else 2], np.int32)
    if rng.random() < 0.5:
      shape = (int(rng.choice(HUGE)), n)
  elif what == 4 and len(ptr):
    ptr[rng.integers(len(ptr))] = rng.choice(INT32_EDGES + [int(rng.integers(-5, 50))])
  elif what == 5:  # a wrapping pair: row_ptr jumps up then down by ~2^31
    if len(ptr) >= 3:
      i = int(rng.integers(1, len(ptr) - 1))
      ptr[i] = 2**31 - 1
      ptr[i + 1] = -2**31 + 1 + int(rng.integers(0, 3))
    else:
      ptr = np.array([0, 2**31 - 1], np.int32)
  elif what == 6:
    ptr = ptr[:-1] if len(ptr) > 1 and rng.random() < 0.5 else np.append(ptr, ptr[-1:])
  elif what == 7 and len(cols):
    cols[rng.integers(len(cols))] = rng.choice(INT32_EDGES + [ceil_div(n, values.shape[2])])
  elif what == 8 and len(cols) > 1:  # out of order or duplicate within rows
    p = int(rng.integers(1, len(cols)))
    cols[p] = cols[p - 1] - int(rng.integers(0, 2))
  elif what == 9:
    cols = cols[:-1] if len(cols) and rng.random() < 0.5 else np.append(cols, [0]).astype(np.int32)
  elif what == 10:  # values with one block more or fewer
    if len(values) and rng.random() < 0.5:
      values = values[:-1]
    else:
      values = np.concatenate([values, np.ones([1, *values.shape[1:]], values.dtype)])
  elif what == 11:  # other block shape, same index arrays
    bh = max(0, values.shape[1] + int(rng.integers(-2, 3)))
    bw = max(0, values.shape[2] + int(rng.integers(-2, 3)))
    values = rng.standard_normal([len(values), bh, bw]).astype(values.dtype)
  elif what == 12:  # row_ptr all zeros while blocks exist / or first != 0
    ptr = ptr - 1 if rng.random() < 0.5 else np.zeros_like(ptr)
  else:  # empty everything
    values = values[:0]
    cols = cols[:0]
    ptr = np.zeros_like(ptr)
  return values, cols.astype(np.int32), ptr.astype(np.int32), (int(shape[0]), int(shape[1]))


def _operand(rng, rows, cols, dtype=np.float32, specials=0.0):
  x = rng.standard_normal([rows, cols]).astype(dtype)
  if x.size and rng.random() < specials:
    flat = x.reshape(-1)
    idx = rng.integers(flat.size, size=max(1, flat.size // 10))
    flat[idx] = rng.choice([np.nan, np.inf, -np.inf], size=len(idx))
  return x


def make_case(suite, seed):
  """The case of `seed` in `suite` ("raw" or "public"): a dict of numpy
  inputs and settings."""
  rng = np.random.default_rng([7919, seed])
  ops = RAW_OPS if suite == "raw" else PUBLIC_OPS
  op = ops[seed % len(ops)]
  rnn = (op.startswith(("raw_lstm", "raw_gru", "raw_simple")) or
         op.endswith("_sequence") or op == "sequence_grad")
  if op == "raw_kernel_isa":
    return _isa_case(rng, seed)
  case = {"suite": suite, "seed": seed, "op": op,
          "dtype": "float64" if rng.random() < 0.15 else "float32",
          # (graph cases trace functions: fewer where tracing costs most)
          "graph": bool(rng.random() < (0.35 if suite == "raw" else
                                        0.05 if op == "sequence_grad" else 0.2))}
  dtype = np.dtype(case["dtype"])
  bh, bw = (int(rng.choice([1, 2, 3, 4, 8])) for _ in range(2))
  # Graph cases reuse traced functions: few static configurations.
  graph_public = case["graph"] and suite == "public"
  if graph_public:
    bh, bw = [(4, 4), (3, 2)][int(rng.integers(2))]
  if rnn:
    kind = op.replace("raw_", "").split("_")[0]
    if op == "sequence_grad":
      kind = str(rng.choice(["lstm", "gru", "simple"]))
    g = GATES[kind]
    units = int(rng.choice([3, 4] if graph_public else [0, 1, 2, 3, 4, 6, 8]))
    k, n = units, g * units
    batch, time = int(rng.choice([0, 1, 2, 3])), int(rng.choice([0, 1, 2, 4]))
    case.update(kind=kind, units=units, batch=batch, time=time,
                go_backwards=bool(rng.random() < 0.3),
                zero_out=bool(rng.random() < 0.3),
                reset_after=bool(rng.random() < 0.7),
                activation=str(rng.choice(["tanh"] if graph_public else [
                    "tanh", "sigmoid", "relu", "linear", "hard_sigmoid"])))
    if graph_public:
      case.update(go_backwards=False, zero_out=False, reset_after=True)
    values, cols, ptr = random_bsr(rng, k, n, bh, bw, 0.5, dtype, garbage=0.3)
    values *= 0.4
    x = _operand(rng, batch * time, n, dtype).reshape([batch, time, n])
    states = [_operand(rng, batch, units, dtype) for _ in range(2 if kind == "lstm" else 1)]
    mask = rng.random([batch, time]) < 0.7 if rng.random() < 0.5 else None
    bias = _operand(rng, 1, n, dtype)[0] if kind == "gru" and rng.random() < 0.6 else None
    case.update(x=x, states=states, mask=mask, bias=bias)
  else:
    k, n = int(rng.choice([0, 1, 5, 8, 13, 16])), int(rng.choice([0, 1, 4, 7, 16]))
    if graph_public:
      k, n = [(8, 16), (5, 7)][int(rng.integers(2))]
    m = int(rng.choice([0, 1, 3, 9]))
    values, cols, ptr = random_bsr(rng, k, n, bh, bw, float(rng.choice([0.0, 0.3, 1.0])),
                                   dtype, garbage=0.3)
    case.update(x=_operand(rng, m, k, dtype, specials=0.15),
                dy=_operand(rng, m, n, dtype, specials=0.1))
  shape = (k, n)
  malformed = rng.random() < 0.5
  case["mutation"] = "none"
  if malformed:
    if rng.random() < 0.75:
      values, cols, ptr, shape = mutate_bsr(rng, values, cols, ptr, shape)
      case["mutation"] = "bsr"
    else:
      case["mutation"] = "operand"
      _mutate_operand(rng, case)
  case.update(values=values, cols=cols, ptr=ptr, shape=shape)
  if max(shape) > 2**16 and bsr_error(values.shape, cols, ptr, shape) is None:
    # A valid huge dimension: no rows, so that the result stays empty (one
    # row would be gigabytes, a clean OOM at best).
    _no_rows(case)
  return case


def _no_rows(case):
  if "states" in case:
    x = case["x"]
    case["x"] = x[:0]
    case["states"] = [s[:0] for s in case["states"]]
    if case["mask"] is not None:
      case["mask"] = case["mask"][:0]
  else:
    case["x"] = case["x"][:0]
    case["dy"] = case["dy"][:0]


def _isa_case(rng, seed):
  """TfbsSetKernelIsa with a name, garbage, or a non-scalar."""
  choice = rng.integers(6)
  if choice < 3:
    isa = str(rng.choice(ISA_NAMES))
  elif choice == 3:
    isa = "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, size=int(rng.integers(0, 40))))
  elif choice == 4:
    isa = str(rng.choice(["", "AVX2", "avx512 ", "avx1024", "x" * 5000, "auto\0"]))
  else:
    isa = [str(rng.choice(ISA_NAMES))] * int(rng.integers(0, 3))  # not a scalar
  return {"suite": "raw", "seed": seed, "op": "raw_kernel_isa", "isa": isa,
          "graph": bool(rng.random() < 0.3), "mutation": "isa", "dtype": "float32"}


def _mutate_operand(rng, case):
  dtype = np.dtype(case["dtype"])
  if "states" in case:
    what = rng.integers(5)
    b, t, w = case["x"].shape
    if what == 0:  # another batch for a state
      i = int(rng.integers(len(case["states"])))
      s = case["states"][i]
      case["states"][i] = _operand(rng, int(rng.choice([0, 1, b + 1])), s.shape[1], dtype)
    elif what == 1:  # mask of another batch or length
      case["mask"] = rng.random([int(rng.choice([1, b + 1])) if rng.random() < 0.5 else b,
                                 t + int(rng.choice([-1, 1])) if t else 1]) < 0.5
    elif what == 2:  # x_proj with another width
      w2 = w + int(rng.choice([-1, 1, 2])) if w else 1
      case["x"] = _operand(rng, b * t, w2, dtype).reshape([b, t, w2])
    elif what == 3 and case["kind"] == "gru":
      case["bias"] = _operand(rng, 1, max(0, case["units"] * 3 + int(rng.choice([-1, 1]))), dtype)[0]
    else:  # states with other units
      case["states"] = [_operand(rng, s.shape[0], s.shape[1] + 1, dtype) for s in case["states"]]
  else:
    m, k = case["x"].shape
    what = rng.integers(3)
    if what == 0:
      case["x"] = _operand(rng, m, k + int(rng.choice([-1, 1, 3])) if k else 2, dtype)
    elif what == 1 and case["op"] != "bsr_matmul_grad":  # (dy there is ours)
      case["dy"] = _operand(rng, m + 1, case["dy"].shape[1], dtype)
    else:
      case["x"] = np.zeros([2**16, 0], dtype)  # many rows of nothing
      if case["op"] == "bsr_matmul_grad":  # (dy only weighs our loss)
        case["dy"] = _operand(rng, 2**16, case["dy"].shape[1], dtype)


# --- oracle -----------------------------------------------------------------------


def _loss_weight_grad(dy, m, n):
  """d sum(y * dy) / dy for y [m, n] under numpy broadcasting (a mutated
  layout can change n while dy keeps its shape: [1, 0] * [1, 1] is valid),
  or None when the two do not broadcast."""
  try:
    full = np.broadcast_to(dy, np.broadcast_shapes((m, n), dy.shape))
  except ValueError:
    return None
  axes = tuple(i for i, d in enumerate((m, n)) if d == 1 and full.shape[i] != 1)
  return full.sum(axis=axes, keepdims=True) if axes else full


def bsr_error(values_shape, cols, ptr, shape):
  """The first rule a BSR structure breaks, in the kernels' words, or None."""
  nnzb, bh, bw = values_shape
  k, n = shape
  if bh <= 0 or bw <= 0:
    return f"block shape must be positive, got ({bh}, {bw})"
  if k < 0 or n < 0:
    return f"dense shape must be non-negative, got [{k}, {n}]"
  if k > MAX_DIM or n > MAX_DIM:
    return (f"dense shape must be at most {MAX_DIM} per dimension (int32 "
            f"indices), got [{k}, {n}]")
  if bh > MAX_DIM or bw > MAX_DIM:
    return f"block shape must be at most {MAX_DIM} per dimension, got ({bh}, {bw})"
  nbr, nbc = ceil_div(k, bh), ceil_div(n, bw)
  if len(cols) != nnzb:
    return f"col_indices has {len(cols)} entries but values holds {nnzb} blocks"
  if len(ptr) != nbr + 1:
    return f"row_ptr must have ceil({k} / {bh}) + 1 = {nbr + 1} entries, got {len(ptr)}"
  ptr = [int(p) for p in ptr]
  if ptr[0] != 0:
    return f"row_ptr[0] must be 0, got {ptr[0]}"
  for i in range(nbr):
    if ptr[i + 1] < ptr[i]:
      return (f"row_ptr must be non-decreasing, but row_ptr[{i + 1}] = {ptr[i + 1]}"
              f" < row_ptr[{i}] = {ptr[i]}")
  if ptr[nbr] != nnzb:
    return f"row_ptr must end at the number of blocks {nnzb}, got {ptr[nbr]}"
  for i in range(nbr):
    for p in range(ptr[i], ptr[i + 1]):
      c = int(cols[p])
      if c < 0 or c >= nbc:
        return f"col_indices[{p}] = {c} is out of range [0, {nbc})"
      if p > ptr[i] and c <= int(cols[p - 1]):
        return ("col_indices must be strictly increasing within a block row, but "
                f"block row {i} has {int(cols[p - 1])} before {c}")
  return None


def blocks_of(case):
  """(row block, col block, cropped block) of each stored block."""
  (k, n), values, cols, ptr = case["shape"], case["values"], case["cols"], case["ptr"]
  bh, bw = values.shape[1:]
  out = []
  for i in range(len(ptr) - 1):
    for p in range(ptr[i], ptr[i + 1]):
      c = int(cols[p])
      out.append((p, i, c, values[p, :max(0, min(bh, k - i * bh)),
                              :max(0, min(bw, n - c * bw))].astype(np.float64)))
  return out


def sparse_product(x, case):
  """x @ W with W's non-stored blocks structural zeros (x [m, k])."""
  (k, n), (bh, bw) = case["shape"], case["values"].shape[1:]
  y = np.zeros([x.shape[0], n])
  x = x.astype(np.float64)
  for _, i, c, blk in blocks_of(case):
    r, q = blk.shape
    y[:, c * bw:c * bw + q] += x[:, i * bh:i * bh + r] @ blk
  return y


def sparse_product_t(dy, case):
  (k, n), (bh, bw) = case["shape"], case["values"].shape[1:]
  dx = np.zeros([dy.shape[0], k])
  dy = dy.astype(np.float64)
  for _, i, c, blk in blocks_of(case):
    r, q = blk.shape
    dx[:, i * bh:i * bh + r] += dy[:, c * bw:c * bw + q] @ blk.T
  return dx


def sparse_values_grad(x, dy, case):
  bh, bw = case["values"].shape[1:]
  g = np.zeros(case["values"].shape)
  x, dy = x.astype(np.float64), dy.astype(np.float64)
  for p, i, c, blk in blocks_of(case):
    r, q = blk.shape
    g[p, :r, :q] = x[:, i * bh:i * bh + r].T @ dy[:, c * bw:c * bw + q]
  return g


class StructuralMatrix:
  """W as the sequence references multiply it: `h @ W` sums the stored
  blocks only (columns from `col0`), so a NaN or Inf in `h` meets no
  structural zero, as the contract says; `W[:, c:]` keeps columns c.."""

  __array_ufunc__ = None  # numpy defers h @ W to __rmatmul__

  def __init__(self, case, col0=0):
    self.case, self.col0 = case, col0
    k, n = case["shape"]
    self.shape = (k, n - col0)

  def __getitem__(self, key):
    rows, cols = key
    assert rows == slice(None) and cols.step is None and cols.stop is None, key
    return StructuralMatrix(self.case, self.col0 + cols.start)

  def __rmatmul__(self, h):
    bh, bw = self.case["values"].shape[1:]
    y = np.zeros([h.shape[0], self.shape[1]])
    for _, i, c, blk in blocks_of(self.case):
      lo, hi = max(c * bw, self.col0), c * bw + blk.shape[1]
      if lo < hi:
        y[:, lo - self.col0:hi - self.col0] += (
            h[:, i * bh:i * bh + blk.shape[0]] @ blk[:, lo - c * bw:])
    return y


def structural_matmul(case, h, u, col0=0):
  """h @ u[:, col0:] in TF over the stored blocks' entries of the dense,
  differentiable u only (StructuralMatrix's rule)."""
  (k, n), (bh, bw) = case["shape"], case["values"].shape[1:]
  # Zeros that still depend on h and u, as the ops' products do: with no
  # block in the columns, h's gradient is 0 (0 * NaN downstream is NaN),
  # not "unconnected".
  y = h[:, :0] @ u[:0, col0:]
  for _, i, c, blk in blocks_of(case):
    lo, hi = max(c * bw, col0), c * bw + blk.shape[1]
    if lo < hi:
      part = h[:, i * bh:i * bh + blk.shape[0]] @ u[i * bh:i * bh + blk.shape[0], lo:hi]
      y += tf.pad(part, [[0, 0], [lo - col0, n - hi]])
  return y


def dense_matrix(case):
  (k, n), (bh, bw) = case["shape"], case["values"].shape[1:]
  w = np.zeros([k, n])
  for _, i, c, blk in blocks_of(case):
    r, q = blk.shape
    w[i * bh:i * bh + r, c * bw:c * bw + q] = blk
  return w


def operand_error(case):
  """Whether the dense operands / states are inconsistent (no message)."""
  op = case["op"]
  if "states" not in case:
    m, xk = case["x"].shape
    k, n = case["shape"]
    if op in ("raw_matmul", "bsr_matmul"):
      return xk != k
    if op == "raw_transposed":
      return case["dy"].shape[1] != n
    if op == "bsr_matmul_grad":  # dy only weighs sum(y * dy): it broadcasts
      return xk != k or _loss_weight_grad(case["dy"], m, n) is None
    return xk != k or case["dy"].shape[1] != n or case["dy"].shape[0] != m
  x, states, mask, bias = case["x"], case["states"], case["mask"], case["bias"]
  g = GATES[case["kind"]]
  b, t, w = x.shape
  units = states[0].shape[1]
  if any(s.shape != states[0].shape for s in states) or states[0].shape[0] != b:
    return True
  if w != g * units or case["shape"] != (units, g * units):
    return True
  if mask is not None and mask.shape != (b, t):
    return True
  if bias is not None and bias.shape != (g * units,) and (
      op.startswith("raw_") or bias.size or not case["graph"]):
    # Empty means no bias to the op, and to the public function when its
    # length is unknown while tracing; a static empty one is rejected.
    return True
  return False


_ACTS = {"tanh": np.tanh, "sigmoid": sigmoid, "relu": lambda v: np.maximum(v, 0),
         "linear": lambda v: v, "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0, 1)}


def reference(case):
  """The expected result of a valid case (a list of float64 arrays)."""
  op = case["op"]
  if op == "raw_kernel_isa":
    return [np.array(1.0)]
  if op == "sequence_grad":
    return dense_sequence_grads(case)
  if op in ("raw_matmul", "bsr_matmul"):
    return [sparse_product(case["x"], case)]
  if op == "raw_transposed":
    return [sparse_product_t(case["dy"], case)]
  if op == "raw_values_grad":
    return [sparse_values_grad(case["x"], case["dy"], case)]
  if op == "bsr_matmul_grad":  # d(sum(y * dy)) for x and values
    dy = _loss_weight_grad(case["dy"], *case["x"].shape[:1], case["shape"][1])
    return [sparse_product_t(dy, case), sparse_values_grad(case["x"], dy, case)]
  kind = case["kind"]
  nk = kind if kind != "gru" or case["reset_after"] else "gru_before"
  bias = case["bias"]
  if bias is not None and bias.size == 0:
    bias = None
  act = _ACTS[case["activation"]]
  out, states = numpy_rnn(nk, case["x"], case["states"], StructuralMatrix(case),
                          None if bias is None else bias.astype(np.float64),
                          case["mask"], case["go_backwards"], case["zero_out"],
                          act=act, rec_act=sigmoid)
  return [out, *states]


_TF_ACTS = {"tanh": tf.tanh, "sigmoid": tf.sigmoid, "relu": tf.nn.relu,
            "linear": lambda v: v,
            "hard_sigmoid": lambda v: tf.clip_by_value(
                v * tf.constant(0.2, v.dtype) + tf.constant(0.5, v.dtype), 0.0, 1.0)}


def loss_weights(t):
  """Fixed weights of the gradient cases' loss, from the shape alone."""
  size = tf.size(t)
  return tf.reshape(tf.sin(tf.cast(tf.range(size), t.dtype)), tf.shape(t))


def _dense_loop(case, x, states, u, bias):
  """The recurrence in plain TF ops on a dense U (the gradient reference),
  its products over the stored blocks only (structural_matmul)."""
  kind, act = case["kind"], _TF_ACTS[case["activation"]]
  rec = _TF_ACTS["sigmoid"]
  b, t = case["x"].shape[:2]
  units = case["shape"][0]
  steps = range(t - 1, -1, -1) if case["go_backwards"] else range(t)
  prev = tf.zeros([b, units], x.dtype)
  outs = []
  for step in steps:
    xt, h = x[:, step], states[0]
    if kind == "simple":
      new = [act(xt + structural_matmul(case, h, u))]
    elif kind == "lstm":
      i, f, g, o = tf.split(xt + structural_matmul(case, h, u), 4, axis=1)
      c = rec(f) * states[1] + rec(i) * act(g)
      new = [rec(o) * act(c), c]
    else:
      xz, xr, xh = tf.split(xt, 3, axis=1)
      inner = structural_matmul(case, h, u) + (0 if bias is None else bias)
      rz, rr, rh = tf.split(inner, 3, axis=1)
      z, r = rec(xz + rz), rec(xr + rr)
      hh = (act(xh + r * rh) if case["reset_after"]
            else act(xh + structural_matmul(case, r * h, u, 2 * units)))
      new = [z * h + (1 - z) * hh]
    out = new[0]
    if case["mask"] is not None:
      keep = tf.constant(case["mask"][:, step])[:, None]
      new = [tf.where(keep, n, s_) for n, s_ in zip(new, states)]
      out = tf.where(keep, out, tf.zeros_like(out) if case["zero_out"] else prev)
    states, prev = new, out
    outs.append(out)
  outputs = tf.stack(outs, 1) if outs else tf.zeros([b, 0, units], x.dtype)
  return outputs, states


def dense_sequence_grads(case):
  """d loss / d (x_proj, states..., values) of a sequence case, by TF
  autodiff of `_dense_loop` in float64; the values' gradient is the dense
  one at the stored blocks, zero in their padding."""
  x = tf.constant(case["x"], tf.float64)
  states = [tf.constant(s_, tf.float64) for s_ in case["states"]]
  u = tf.constant(dense_matrix(case), tf.float64)
  bias = case["bias"]
  bias = None if bias is None or bias.size == 0 else tf.constant(bias, tf.float64)
  with tf.GradientTape() as tape:
    tape.watch([x, *states, u])
    out, final = _dense_loop(case, x, states, u, bias)
    loss = tf.reduce_sum(out * loss_weights(out)) + tf.add_n(
        [tf.reduce_sum(s_ * loss_weights(s_)) for s_ in final])
  grads = tape.gradient(loss, [x, *states, u],
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  du = grads[-1].numpy()
  bh, bw = case["values"].shape[1:]
  dv = np.zeros(case["values"].shape)
  for p, i, c, blk in blocks_of(case):
    r, q = blk.shape
    dv[p, :r, :q] = du[i * bh:i * bh + r, c * bw:c * bw + q]
  return [g.numpy() for g in grads[:-1]] + [dv]


def expected(case):
  """(valid, structure message or None) for a case."""
  if case["op"] == "raw_kernel_isa":
    isa = case["isa"]
    # ("" is "auto" to the dispatcher, as an empty TF_BLOCKSPARSE_ISA is.)
    return isinstance(isa, str) and isa in ISA_NAMES + ("",) and (
        isa in ("auto", "") or isa in _supported_isas()), None
  message = bsr_error(case["values"].shape, case["cols"], case["ptr"], case["shape"])
  if message is not None:
    k, n = case["shape"]
    if ("kind" in case and case["suite"] == "public" and n != GATES[case["kind"]] * k
        and not message.startswith(("block shape", "dense shape"))):
      # The public functions compare the matrix's static shape with the
      # gates while tracing, before the run-time checks of its indices.
      return False, None
    return False, message
  return not operand_error(case), None


# --- running ----------------------------------------------------------------------


def _supported_isas():
  info = tfbs.ops.kernel_info()
  return info.get("supported", []) if info.get("custom_ops") else []


def _lib():
  return _loader._load()  # pylint: disable=protected-access


def _cast(case, a):
  return None if a is None else tf.constant(a, case["dtype"]) if a.dtype.kind == "f" else tf.constant(a)


def _raw_args(case):
  values = _cast(case, case["values"])
  bsr = [values, tf.constant(case["cols"], tf.int32), tf.constant(case["ptr"], tf.int32),
         tf.constant(np.array(case["shape"], np.int64))]
  return bsr


_FUNCTIONS = {}


def _dynamic(key, fn, n):
  """A tf.function of `n` tensors of unknown shape, traced once per key."""
  f = _FUNCTIONS.get(key)
  if f is None:
    f = tf.function(fn, reduce_retracing=False, autograph=False)
    _FUNCTIONS[key] = f
  return f


def _call_raw(case):
  lib, op = _lib(), case["op"]
  if op == "raw_kernel_isa":
    try:
      if case["graph"]:
        f = _FUNCTIONS.setdefault("isa", tf.function(
            lib.tfbs_set_kernel_isa, input_signature=[tf.TensorSpec(None, tf.string)]))
        info = f(tf.constant(case["isa"], tf.string))
      else:
        info = lib.tfbs_set_kernel_isa(tf.constant(case["isa"], tf.string))
      info = json.loads(info.numpy().decode())
    finally:
      lib.tfbs_set_kernel_isa(tf.constant("auto"))
    # The answer is the ISA asked for (auto: one the CPU supports).
    isa = case["isa"]
    return [np.array(float(info["isa"] == isa or (isa in ("auto", "") and
                                                  info["isa"] in info["supported"])))]
  bsr = _raw_args(case)
  if op == "raw_matmul":
    fn, args = lib.tfbs_bsr_matmul, [_cast(case, case["x"]), *bsr]
  elif op == "raw_transposed":
    fn, args = lib.tfbs_bsr_matmul_transposed, [_cast(case, case["dy"]), *bsr]
  elif op == "raw_values_grad":
    fn, args = lib.tfbs_bsr_matmul_values_grad, [_cast(case, case["x"]),
                                                 _cast(case, case["dy"]), *bsr]
  else:
    kind = case["kind"]
    dt = case["dtype"]
    mask = (tf.zeros([0], tf.bool) if case["mask"] is None
            else tf.constant(case["mask"]))
    states = [_cast(case, s) for s in case["states"]]
    x = _cast(case, case["x"])
    attrs = dict(activation=case["activation"], go_backwards=case["go_backwards"],
                 zero_output_for_mask=case["zero_out"])
    if kind == "lstm":
      fn = lambda *a: lib.tfbs_bsr_lstm_sequence(*a, recurrent_activation="sigmoid", **attrs)
      args = [x, states[0], states[1], mask, *bsr]
    elif kind == "gru":
      bias = (tf.zeros([0], dt) if case["bias"] is None else _cast(case, case["bias"]))
      fn = lambda *a: lib.tfbs_bsr_gru_sequence(
          *a, recurrent_activation="sigmoid", reset_after=case["reset_after"], **attrs)
      args = [x, states[0], mask, bias, *bsr]
    else:
      fn = lambda *a: lib.tfbs_bsr_simple_rnn_sequence(*a, **attrs)
      args = [x, states[0], mask, *bsr]
  if case["graph"]:
    key = (op, case["dtype"], case.get("activation"), case.get("go_backwards"),
           case.get("zero_out"), case.get("reset_after"))
    specs = [tf.TensorSpec(None, a.dtype) for a in args]
    f = _FUNCTIONS.get(key)
    if f is None:
      f = tf.function(fn, input_signature=specs, autograph=False)
      _FUNCTIONS[key] = f
    out = f(*args)
  else:
    out = fn(*args)
  return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _matrix(values, cols, ptr, shape, checked):
  if checked:  # a layout changed behind our back (e.g. a layer's variables)
    return tfbs.BlockSparseMatrix._from_checked_layout(values, cols, ptr, shape)  # pylint: disable=protected-access
  return tfbs.BlockSparseMatrix(values, cols, ptr, shape)


def _call_public(case):
  op, dt = case["op"], case["dtype"]
  values = tf.constant(case["values"], dt)
  cols = tf.constant(case["cols"], tf.int32)
  ptr = tf.constant(case["ptr"], tf.int32)
  shape = case["shape"]
  vshape = case["values"].shape
  # Eager calls go through an unvalidated matrix half the time: then the
  # op's own checks (kernel or graph assertions) must catch everything.
  checked = case["seed"] % 2 == 0

  def body(values, cols, ptr, *operands):
    matrix = _matrix(values, cols, ptr, shape, checked and not case["graph"])
    if op == "bsr_matmul":
      return [tfbs.ops.bsr_matmul(operands[0], matrix)]
    if op == "bsr_matmul_grad":
      x, dy = operands
      with tf.GradientTape() as tape:
        tape.watch([x, matrix.values])
        y = tfbs.ops.bsr_matmul(x, matrix)
        loss = tf.reduce_sum(y * dy)
      return tape.gradient(loss, [x, matrix.values])
    if op == "sequence_grad":
      with tf.GradientTape() as tape:
        tape.watch([*operands, matrix.values])
        out, *final = sequence(matrix, operands)
        loss = tf.reduce_sum(out * loss_weights(out)) + tf.add_n(
            [tf.reduce_sum(s_ * loss_weights(s_)) for s_ in final])
      nstates = 2 if case["kind"] == "lstm" else 1
      return tape.gradient(loss, [*operands[:1 + nstates], matrix.values],
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return sequence(matrix, operands)

  def sequence(matrix, operands):
    kind = case["kind"]
    x, *rest = operands
    nstates = 2 if kind == "lstm" else 1
    states, rest = rest[:nstates], rest[nstates:]
    mask = rest.pop(0) if case["mask"] is not None else None
    kw = dict(mask=mask, activation=case["activation"], go_backwards=case["go_backwards"],
              zero_output_for_mask=case["zero_out"])
    if kind == "lstm":
      out, h, c = tfbs.ops.lstm_sequence(x, states[0], states[1], matrix, **kw)
      return [out, h, c]
    if kind == "gru":
      bias = rest.pop(0) if case["bias"] is not None else None
      out, h = tfbs.ops.gru_sequence(x, states[0], matrix, recurrent_bias=bias,
                                     reset_after=case["reset_after"], **kw)
      return [out, h]
    out, h = tfbs.ops.simple_rnn_sequence(x, states[0], matrix, **kw)
    return [out, h]

  if "states" in case:
    operands = [case["x"], *case["states"]]
    if case["mask"] is not None:
      operands.append(case["mask"])
    if case["bias"] is not None:
      operands.append(case["bias"])
  else:
    operands = [case["x"]] + ([case["dy"]] if op == "bsr_matmul_grad" else [])
  operands = [tf.constant(a) if a.dtype == bool else tf.constant(a, dt) for a in operands]
  args = [values, cols, ptr, *operands]
  if case["graph"]:
    # Every dimension unknown except the block shape (which must be static).
    key = ("public", op, dt, vshape[1:], shape, case.get("kind"), case.get("activation"),
           case.get("go_backwards"), case.get("zero_out"), case.get("reset_after"),
           case["mask"] is not None if "mask" in case else None,
           case.get("bias") is not None, _loader.library() is not None)
    f = _FUNCTIONS.get(key)
    if f is None:
      specs = [tf.TensorSpec([None, *vshape[1:]], dt), tf.TensorSpec([None], tf.int32),
               tf.TensorSpec([None], tf.int32)]
      specs += [tf.TensorSpec([None] * a.shape.rank, a.dtype) for a in operands]
      f = tf.function(body, input_signature=specs)
      _FUNCTIONS[key] = f
    out = f(*args)
  else:
    out = body(*args)
  return [np.asarray(o) for o in out]


def _same(got, want, dtype):
  if len(got) != len(want):
    return False
  tol = 1e-9 if dtype == "float64" else 2e-4
  for g, w in zip(got, want):
    if g.shape != w.shape:
      return False
    g = g.astype(np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(w)):
      return False
    fin = np.isfinite(w)
    if not np.array_equal(g[~fin & ~np.isnan(w)], w[~fin & ~np.isnan(w)]):
      return False
    scale = 1 + (np.abs(w[fin]).max() if fin.any() else 0)
    if fin.any() and np.abs(g[fin] - w[fin]).max() > tol * scale:
      return False
  return True


def run_case(case, path):
  """Runs `case` on `path` ("custom[:isa]" or "fallback"); returns
  (outcome, detail, message or None)."""
  valid, message = expected(case)
  raw = case["suite"] == "raw"
  try:
    with path_scope(path):
      got = _call_raw(case) if raw else _call_public(case)
  except tf.errors.InvalidArgumentError as e:
    text = core_message(e)
    if valid:
      return "refused", text[:300], text
    if message is not None and message not in e.message:
      return "message", f"want {message!r}, got {text[:300]!r}", text
    return "rejected", "", text
  except (tf.errors.ResourceExhaustedError, MemoryError) as e:
    # The cases are small: asking for gigabytes means a size was accepted
    # somewhere that should not have been (a finding).
    return "oom", str(e)[:200], None
  except (tf.errors.OpError, ValueError, TypeError, IndexError) as e:
    return "unexpected", f"{type(e).__name__}: {str(e)[:300]}", None
  if not valid:
    return "silent", f"no error; oracle says {message or 'operand shapes'}", None
  want = reference(case)
  if not _same(got, want, case["dtype"]):
    return "wrong", f"shapes {[g.shape for g in got]} vs {[w.shape for w in want]}", None
  return "ok", "", None
