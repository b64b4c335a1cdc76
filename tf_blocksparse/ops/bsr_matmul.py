"""`bsr_matmul(x, matrix)`: dense `x @ W` for a block-sparse `W`."""

import math

import tensorflow as tf

from tf_blocksparse.bsr import validation
from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.ops import _loader
from tf_blocksparse.ops import fallback

# The kernels compute in float32/float64; half types are widened around them.
# (Sets: a tuple's `in` runs DType.__eq__, a cost on every eager call.)
_KERNEL_DTYPES = frozenset({tf.float32, tf.float64})
_WIDENED_DTYPES = frozenset({tf.float16, tf.bfloat16})


def bsr_matmul(x, matrix, name=None):
  """Computes `x @ W` for dense `x` of shape `[..., K]` and BSR `W` `[K, N]`.

  This is the orientation of Keras `Dense` and RNN kernels. Runs the
  compiled kernel when `custom_ops_available()`, else an equivalent pure-TF
  graph. Differentiable with respect to `x` and to `matrix.values` (the
  layout is fixed). float16/bfloat16 are computed in float32.

  Contract (the compiled kernels and the pure-TF fallback give the same
  result, or fail with the same message, eagerly and inside `tf.function`,
  also when shapes are only known at run time):

  * Structure: `K`, `N`, `bh`, `bw` at most 2^30 (so that the padded
    shape fits int32 indices); `row_ptr` has `ceil(K / bh) + 1` entries, starts at 0,
    never decreases and ends at the number of blocks; each `col_indices`
    entry is in `[0, ceil(N / bw))`, strictly increasing within a block
    row. Anything else raises `InvalidArgumentError` naming the rule and
    the values, before anything is read or allocated from them.
  * Padding: the entries of the edge blocks beyond row `K` or column `N`
    are ignored. Whatever they hold (NaN and Inf included) never reaches
    the result or the gradient with respect to `x`; their gradient is zero.
  * Blocks that are not stored are structural zeros: they contribute
    nothing, even where `x` holds NaN or Inf. Stored entries follow IEEE
    arithmetic (a stored 0 times Inf is NaN), as in a dense product.
  * Empty dimensions: no rows (any leading dimension 0) gives an empty
    result `[..., N]`; `K = 0` or no stored block gives zeros; `N = 0`
    gives `[..., 0]`.
  * `x`'s last dimension must be `K`; when it is unknown while tracing it
    is checked at run time (`x has 12 columns but the sparse matrix has
    K = 8`).

  Args:
    x: dense tensor `[..., K]` of the matrix's dtype.
    matrix: a `BlockSparseMatrix` of shape `[K, N]`.
    name: optional name scope.

  Returns:
    Tensor `[..., N]`.

  Raises:
    tf.errors.InvalidArgumentError: wrong ranks or inner dimension,
      mismatched dtypes, or a malformed block structure.

  Example:

  >>> import numpy as np, tensorflow as tf, tf_blocksparse as tfbs
  >>> w = np.kron(np.eye(2), np.ones([4, 4])).astype(np.float32)
  >>> m = tfbs.BlockSparseMatrix.from_dense(w, block_size=4)
  >>> x = tf.ones([3, 8])
  >>> np.allclose(tfbs.ops.bsr_matmul(x, m), x @ w)
  True
  """
  if not isinstance(matrix, BlockSparseMatrix):
    raise TypeError(f"matrix must be a BlockSparseMatrix, got {type(matrix).__name__}")
  if tf.executing_eagerly():  # a name scope names nothing eagerly
    return _bsr_matmul(x, matrix)
  with tf.name_scope(name or "bsr_matmul"):
    return _bsr_matmul(x, matrix)


def _bsr_matmul(x, matrix):
  if not isinstance(x, tf.Tensor):
    x = tf.convert_to_tensor(x)
  shape = x.shape
  _check_operand(x.dtype, shape, matrix)
  if x.dtype in _WIDENED_DTYPES:
    # Same layout, so no need to check it again for the widened values.
    wide = BlockSparseMatrix._from_checked_layout(  # pylint: disable=protected-access
        tf.cast(matrix.values, tf.float32), matrix.col_indices,
        matrix.row_ptr, matrix.shape)
    return tf.cast(_bsr_matmul(tf.cast(x, tf.float32), wide), x.dtype)
  if x.dtype not in _KERNEL_DTYPES:
    raise validation.invalid(f"unsupported dtype {x.dtype.name}")
  if shape.rank != 2:
    return _matmul_nd(x, matrix)
  y = _matmul_2d(x, matrix)
  if not tf.executing_eagerly():
    y.set_shape([shape[0], matrix.shape[1]])  # the op's shape fn loses M
  return y


def _check_operand(dtype, shape, matrix):
  # The layout's dimensions first, as the kernels order their checks (a
  # matrix built from checked layout variables skipped `__validate__`).
  validation.check_dims(matrix.shape, matrix.block_size)
  if dtype != matrix.values.dtype:
    raise validation.invalid(
        f"x has dtype {dtype.name} but the matrix holds {matrix.dtype.name}")
  if shape.rank is None:
    return
  if shape.rank < 1:
    raise validation.invalid(f"x must have rank >= 1, got shape {shape}")
  k = matrix.shape[0]
  if shape[-1] is not None and shape[-1] != k:
    # A broken layout is reported first, as the kernels do (only on this
    # error path: the static checks cost time on every call).
    validation.check_matrix(matrix)
    raise validation.invalid(
        f"x has {shape[-1]} columns but the sparse matrix has K = {k}")


def _matmul_2d(x, matrix):
  lib = _loader.library()
  if lib is None:
    return fallback.bsr_matmul_2d(x, matrix)
  return lib.tfbs_bsr_matmul(x, matrix.values, matrix.col_indices,
                             matrix.row_ptr, _dense_shape(matrix.shape))


def _matmul_nd(x, matrix):
  """`x [..., K]` of any other rank, through a 2-D `[rows, K]` view.

  The view keeps x's own last dimension, so that a wrong one still fails
  in the product (a `[-1, K]` view would reinterpret the data), and counts
  its rows explicitly (`-1` makes one row out of none when K = 0).
  """
  k, n = matrix.shape
  batch = x.shape[:-1]
  if batch.is_fully_defined() and x.shape[-1] is not None:
    # Static shape: plain reshapes, no shape ops to run per call.
    rows = math.prod(batch.as_list())
    y2 = _matmul_2d(tf.reshape(x, [rows, k]), matrix)
    return tf.reshape(y2, batch.as_list() + [n])
  if x.shape[-1] == k and k > 0:
    # K checked while tracing: a [-1, K] view is exact (and traces to a few
    # nodes, which matters in exported graphs).
    y2 = _matmul_2d(tf.reshape(x, [-1, k]), matrix)
    y = tf.reshape(y2, tf.concat([tf.shape(x)[:-1], [n]], axis=0))
    y.set_shape(batch.concatenate([n]))
    return y
  if x.shape.rank is None:
    rank = tf.rank(x)
    with tf.control_dependencies([validation.check(
        rank >= 1, lambda: validation.fmt("x must have rank >= 1, got rank {}",
                                          rank))]):
      x = tf.identity(x)
  shape = tf.shape(x)
  batch_shape = shape[:-1]
  y2 = _matmul_2d(tf.reshape(x, tf.stack([tf.reduce_prod(batch_shape),
                                          shape[-1]])), matrix)
  y = tf.reshape(y2, tf.concat([batch_shape, [n]], axis=0))
  if x.shape.rank is not None:
    y.set_shape(batch.concatenate([n]))
  return y


def custom_ops_available():
  """True when the compiled kernels are loaded; else `bsr_matmul` runs pure TF."""
  return _loader.custom_ops_available()


# One host tensor per dense shape for eager calls, instead of a new constant
# every call. A graph builds its own constant once, while tracing (a cached
# eager tensor would become an extra captured input of the function).
_EAGER_DENSE_SHAPES = {}


def _dense_shape(shape):
  if not tf.executing_eagerly():
    return tf.constant(shape, tf.int64)
  cached = _EAGER_DENSE_SHAPES.get(shape)
  if cached is None:
    with tf.device("/cpu:0"):  # a HostMemory input of the GPU kernels
      cached = tf.constant(shape, tf.int64)
    _EAGER_DENSE_SHAPES[shape] = cached
  return cached


def _bsr_inputs(op, first):
  return op.inputs[first:first + 4]


# Gradients of the compiled ops, in terms of each other: each op is bilinear
# in its dense operand and the block values, so the family is closed under
# differentiation (second derivatives work too).
@tf.RegisterGradient("TfbsBsrMatmul")
def _bsr_matmul_grad(op, dy):
  lib = _loader._load()
  x = op.inputs[0]
  bsr = _bsr_inputs(op, 1)
  dx = lib.tfbs_bsr_matmul_transposed(dy, *bsr)
  dvalues = lib.tfbs_bsr_matmul_values_grad(x, dy, *bsr)
  return [dx, dvalues, None, None, None]


@tf.RegisterGradient("TfbsBsrMatmulTransposed")
def _bsr_matmul_transposed_grad(op, ddx):
  lib = _loader._load()
  dy = op.inputs[0]
  bsr = _bsr_inputs(op, 1)
  d_dy = lib.tfbs_bsr_matmul(ddx, *bsr)
  dvalues = lib.tfbs_bsr_matmul_values_grad(ddx, dy, *bsr)
  return [d_dy, dvalues, None, None, None]


@tf.RegisterGradient("TfbsBsrMatmulValuesGrad")
def _bsr_matmul_values_grad_grad(op, dg):
  lib = _loader._load()
  x, dy = op.inputs[0], op.inputs[1]
  values, col_indices, row_ptr, dense_shape = _bsr_inputs(op, 2)
  bsr = (dg, col_indices, row_ptr, dense_shape)
  return [lib.tfbs_bsr_matmul_transposed(dy, *bsr),
          lib.tfbs_bsr_matmul(x, *bsr), None, None, None, None]
