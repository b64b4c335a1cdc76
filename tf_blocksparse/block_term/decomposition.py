"""Block-term (BT) decomposition of a weight matrix, as plain TF functions.

A matrix `W` of shape `[I, J]` with `I = I_1 * ... * I_d` and
`J = J_1 * ... * J_d` is written as a sum of `N` Tucker blocks (Ye et al.,
"Learning Compact Recurrent Neural Networks with Block-Term Tensor
Decomposition", CVPR 2018):

    W[(i_1..i_d), (j_1..j_d)] =
        sum_n sum_{r_1..r_d} G_n[r_1..r_d] * prod_k A_n^(k)[i_k, j_k, r_k]

Row and column indices are flattened row-major, so `x @ W` equals reshaping
`x` to `[..., I_1, ..., I_d]`, contracting mode by mode, and reshaping the
result to `[..., J]`. Storage: `factors[k]` has shape `[N, I_k, J_k, R_k]` and
`core` has shape `[N, R_1, ..., R_d]`, so the parameter count is
`N * (sum_k I_k * J_k * R_k + prod_k R_k)`.

Nothing here builds `W` except `block_term_to_dense`, which exists for
checking and for conversion to dense layers.
"""

import functools
import math
import string

import numpy as np
import tensorflow as tf

# einsum letters: 'b' (batch rows) and 'n' (block) are reserved; each mode
# needs three more (input, output, rank).
_RESERVED = "bn"
_LETTERS = [c for c in string.ascii_letters if c not in _RESERVED]
MAX_MODES = len(_LETTERS) // 3


def positive_int(value, what):
  """`value` as an int if it is a positive int, else a TypeError/ValueError
  naming `what`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{what} must be a positive int, got {value!r}")
  if value <= 0:
    raise ValueError(f"{what} must be positive, got {value}")
  return int(value)


def _modes(modes, what):
  if isinstance(modes, (int, np.integer)) and not isinstance(modes, bool):
    modes = (modes,)
  try:
    modes = tuple(modes)
  except TypeError:
    raise TypeError(f"{what} must be a sequence of positive ints, got {modes!r}")
  if not modes:
    raise ValueError(f"{what} must hold at least one mode, got ()")
  return tuple(positive_int(m, f"{what}[{k}]") for k, m in enumerate(modes))


def check_shapes(input_modes, output_modes, rank, num_blocks=1):
  """Validates and normalises a block-term shape description.

  Args:
    input_modes: sequence of `d` positive ints `I_k` (`I = prod I_k`).
    output_modes: sequence of `d` positive ints `J_k` (`J = prod J_k`).
    rank: a positive int (the same Tucker rank in every mode) or a sequence
      of `d` positive ints `R_k`.
    num_blocks: positive int `N`, the number of Tucker blocks summed.

  Returns:
    `(input_modes, output_modes, ranks, num_blocks)` as tuples of ints / int.

  Raises:
    ValueError, TypeError: naming the argument that is wrong.

  Example:

  >>> check_shapes([4, 8], [2, 3], 2, num_blocks=3)
  ((4, 8), (2, 3), (2, 2), 3)
  """
  input_modes = _modes(input_modes, "input_modes")
  output_modes = _modes(output_modes, "output_modes")
  d = len(input_modes)
  if len(output_modes) != d:
    raise ValueError(
        f"input_modes {input_modes} has {d} modes but output_modes "
        f"{output_modes} has {len(output_modes)}; both need the same number "
        "of modes (pad with 1s or use factorize_shape(n, d))")
  if d > MAX_MODES:
    raise ValueError(f"at most {MAX_MODES} modes are supported, got {d}")
  if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
    ranks = (positive_int(rank, "rank"),) * d
  else:
    ranks = _modes(rank, "rank")
    if len(ranks) != d:
      raise ValueError(
          f"rank {ranks} has {len(ranks)} entries but there are {d} modes; "
          "give one rank per mode or a single int")
  num_blocks = positive_int(num_blocks, "num_blocks")
  return input_modes, output_modes, ranks, num_blocks


def parameter_count(input_modes, output_modes, rank, num_blocks=1):
  """Weights in a block-term matrix: `N * (sum_k I_k J_k R_k + prod_k R_k)`.

  Example:

  >>> parameter_count([4, 8], [2, 3], 2, num_blocks=3)  # 3 * (16 + 48 + 4)
  204
  """
  ins, outs, ranks, n = check_shapes(input_modes, output_modes, rank, num_blocks)
  return n * (sum(i * j * r for i, j, r in zip(ins, outs, ranks)) +
              math.prod(ranks))


def compression_ratio(input_modes, output_modes, rank, num_blocks=1):
  """How many times fewer weights than the dense `[I, J]` matrix (no bias).

  Example:

  >>> compression_ratio([4, 8], [2, 3], 2, num_blocks=3)  # 32 * 6 / 204
  0.9411764705882353
  >>> round(compression_ratio([16, 16, 16], [8, 8, 16], 2), 1)  # 4096 * 1024 / 1032
  4064.2
  """
  ins, outs, ranks, n = check_shapes(input_modes, output_modes, rank, num_blocks)
  dense = math.prod(ins) * math.prod(outs)
  return dense / parameter_count(ins, outs, ranks, n)


def factorize_shape(n, d):
  """Proposes `d` factors of `n`, as balanced as possible, largest first.

  Among all ways of writing `n` as a product of `d` positive ints it returns
  the one whose sorted (non-increasing) factors are lexicographically
  smallest: the largest factor is as small as possible, then the next, and
  so on. Balanced modes minimise `sum_k I_k J_k R_k` for a given product.
  A prime `n` (or too few prime factors) gives trailing 1s.

  Args:
    n: positive int to factorise.
    d: positive int, number of modes.

  Returns:
    A tuple of `d` ints whose product is `n`.

  Example:

  >>> factorize_shape(4096, 3)
  (16, 16, 16)
  >>> factorize_shape(1000, 2)
  (40, 25)
  >>> factorize_shape(7, 2)
  (7, 1)
  """
  n = positive_int(n, "n")
  d = positive_int(d, "d")
  return _smallest_factorization(n, d, n)


@functools.lru_cache(maxsize=4096)
def _divisors(n):
  small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
  return sorted(set(small + [n // k for k in small]))


@functools.lru_cache(maxsize=65536)
def _feasible(m, k, cap):
  """Can `m` be written as a product of `k` factors, each `<= cap`?"""
  if k == 1:
    return m <= cap
  return any(_feasible(m // f, k - 1, f)
             for f in _divisors(m) if f <= cap and f ** k >= m)


def _smallest_factorization(m, k, cap):
  if k == 1:
    return (m,)
  # The largest factor is at least the k-th root; take the smallest divisor
  # that leaves a feasible remainder.
  for f in _divisors(m):
    if f > cap or f ** k < m:
      continue
    if _feasible(m // f, k - 1, f):
      return (f,) + _smallest_factorization(m // f, k - 1, f)
  raise AssertionError(f"no factorization of {m} into {k} factors <= {cap}")


def _check_parameters(factors, core):
  factors = [tf.convert_to_tensor(f) for f in factors]
  core = tf.convert_to_tensor(core)
  d = len(factors)
  if d == 0 or d > MAX_MODES:
    raise ValueError(f"need between 1 and {MAX_MODES} factors, got {d}")
  for k, f in enumerate(factors):
    if f.shape.rank != 4:
      raise ValueError(
          f"factors[{k}] must have shape [N, I_k, J_k, R_k], got {f.shape}")
  if core.shape.rank != d + 1:
    raise ValueError(
        f"core must have shape [N, R_1, ..., R_{d}] (rank {d + 1}) for {d} "
        f"factors, got {core.shape}")
  for k, f in enumerate(factors):
    if f.shape[0] != core.shape[0]:
      raise ValueError(
          f"factors[{k}] has {f.shape[0]} blocks but core has {core.shape[0]}")
    if f.shape[3] != core.shape[k + 1]:
      raise ValueError(
          f"factors[{k}] has rank {f.shape[3]} but core mode {k + 1} has "
          f"{core.shape[k + 1]}")
    if f.dtype != core.dtype:
      raise ValueError(
          f"factors[{k}] has dtype {f.dtype.name} but core {core.dtype.name}")
  return factors, core


def block_term_matmul(x, factors, core):
  """`x @ W` for a block-term `W`, contracted mode by mode without forming W.

  Order of contraction: the core is first merged into the mode-1 factor (a
  parameter-sized product), then the input is contracted with one factor
  per mode. After mode `k` the intermediate holds the axes
  `rows, N, I_{k+1}..I_d, J_1..J_k, R_{k+1}..R_d` (kept in the order a
  batched matmul emits them; one final transpose orders `J_1..J_d`): ranks
  are summed as soon as their mode is done, so no tensor holds all of `J`
  and all ranks at once, and the block sum happens in the last product.
  The largest intermediate has `rows * N * (I / I_1) * J_1 * prod_{k>1} R_k`
  entries; with high ranks it, not the weights, bounds speed and memory
  (on CPU the transposes make this slower than a dense matmul of the same
  shape even when it needs fewer FLOPs; the gain is in weights).

  Args:
    x: tensor `[..., I]`, `I = prod_k factors[k].shape[1]`.
    factors: list of `d` tensors `[N, I_k, J_k, R_k]`.
    core: tensor `[N, R_1, ..., R_d]`.

  Returns:
    Tensor `[..., J]`, `J = prod_k factors[k].shape[2]`.

  Example:

  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> factors = [rng.normal(size=[2, 3, 4, 2]), rng.normal(size=[2, 5, 2, 2])]
  >>> core = rng.normal(size=[2, 2, 2])
  >>> x = rng.normal(size=[7, 15])
  >>> w = block_term_to_dense(factors, core)
  >>> np.allclose(block_term_matmul(x, factors, core), x @ w)
  True
  """
  factors, core = _check_parameters(factors, core)
  x = tf.convert_to_tensor(x, dtype=core.dtype)
  d = len(factors)
  ins = [int(f.shape[1]) for f in factors]
  outs = [int(f.shape[2]) for f in factors]
  total_in, total_out = math.prod(ins), math.prod(outs)
  if x.shape.rank is not None and x.shape.rank < 1:
    raise ValueError(f"x must have rank >= 1, got shape {x.shape}")
  if x.shape[-1] is not None and x.shape[-1] != total_in:
    raise ValueError(
        f"x has {x.shape[-1]} features but the input modes {tuple(ins)} "
        f"multiply to {total_in}")
  i_l = _LETTERS[0:d]
  j_l = _LETTERS[d:2 * d]
  r_l = _LETTERS[2 * d:3 * d]

  batch_shape = tf.shape(x)[:-1]
  state = tf.reshape(x, [-1] + ins)
  # Core merged into the first factor: [N, I_1, J_1, R_2..R_d].
  first_axes = "n" + i_l[0] + j_l[0] + "".join(r_l[1:])
  first = tf.einsum(f"n{i_l[0]}{j_l[0]}{r_l[0]},n{''.join(r_l)}->{first_axes}",
                    factors[0], core)
  # Each output is written in the order a batched matmul produces it
  # ([block, state axes kept, new output mode]), so einsum transposes only
  # its state input, never its (larger) output.
  axes = "b" + "".join(i_l)
  for k in range(d):
    if k == 0:
      factor, factor_axes = first, first_axes
      kept = [a for a in axes if a != i_l[0]]
      out_axes = "".join(kept) + "n" + j_l[0] + "".join(r_l[1:])
    else:
      factor, factor_axes = factors[k], f"n{i_l[k]}{j_l[k]}{r_l[k]}"
      kept = [a for a in axes if a not in ("n", i_l[k], r_l[k])]
      block = "n" if k < d - 1 else ""  # the block sum is in the last product
      out_axes = block + "".join(kept) + j_l[k]
    state = tf.einsum(f"{axes},{factor_axes}->{out_axes}", state, factor)
    axes = out_axes
  state = tf.einsum(f"{axes}->b{''.join(j_l)}", state)
  y = tf.reshape(state, tf.concat([batch_shape, [total_out]], axis=0))
  if x.shape.rank is not None:
    y.set_shape(x.shape[:-1].concatenate([total_out]))
  return y


def block_term_to_dense(factors, core):
  """Rebuilds the dense `[I, J]` matrix of a block-term decomposition.

  Example:

  >>> import numpy as np
  >>> factors = [np.ones([1, 2, 3, 1]), np.ones([1, 2, 1, 1])]
  >>> block_term_to_dense(factors, 2.0 * np.ones([1, 1, 1])).shape
  TensorShape([4, 3])
  """
  factors, core = _check_parameters(factors, core)
  d = len(factors)
  i_l, j_l, r_l = _LETTERS[0:d], _LETTERS[d:2 * d], _LETTERS[2 * d:3 * d]
  # Mode by mode: [N, I_1..I_k, J_1..J_k, R_{k+1}..R_d].
  dense = core
  axes = "n" + "".join(r_l)
  for k in range(d):
    out_axes = ("n" + "".join(i_l[:k + 1]) + "".join(j_l[:k + 1]) +
                "".join(r_l[k + 1:]))
    dense = tf.einsum(f"{axes},n{i_l[k]}{j_l[k]}{r_l[k]}->{out_axes}",
                      dense, factors[k])
    axes = out_axes
  dense = tf.reduce_sum(dense, axis=0)
  total_in = math.prod(int(f.shape[1]) for f in factors)
  total_out = math.prod(int(f.shape[2]) for f in factors)
  return tf.reshape(dense, [total_in, total_out])


def glorot_stddevs(input_modes, output_modes, rank, num_blocks=1,
                   fan_in=None, fan_out=None):
  """Standard deviations `(factor_stds, core_std)` for Glorot-scaled W.

  With independent zero-mean entries, every entry of `W` is a sum of
  `N * prod_k R_k` uncorrelated products of one core entry and `d` factor
  entries, so `Var(W) = N * prod_k R_k * s_G^2 * prod_k s_k^2`. Taking
  `s_k^2 = 1 / R_k` keeps each mode-`k` contraction variance-neutral (the
  sum over `R_k` terms is divided by `R_k`), and `s_G^2 = 2 / ((I + J) N)`
  then gives `Var(W) = 2 / (I + J)`, the Glorot variance of a `[I, J]`
  kernel (the variance `glorot_uniform` has, which Keras Dense/LSTM use).

  `fan_in`/`fan_out` override `I`/`J` (e.g. for gate-stacked RNN kernels the
  defaults are already right: `J = 4H`).

  Example:

  >>> stds, core_std = glorot_stddevs([4, 4], [2, 8], 2)
  >>> [round(s, 4) for s in stds], round(core_std, 4)
  ([0.7071, 0.7071], 0.25)
  """
  ins, outs, ranks, n = check_shapes(input_modes, output_modes, rank, num_blocks)
  fan_in = math.prod(ins) if fan_in is None else fan_in
  fan_out = math.prod(outs) if fan_out is None else fan_out
  factor_stds = [1.0 / math.sqrt(r) for r in ranks]
  core_std = math.sqrt(2.0 / ((fan_in + fan_out) * n))
  return factor_stds, core_std
