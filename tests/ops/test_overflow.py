"""Inputs whose size arithmetic used to overflow in the kernels (and abort
the process on a TensorShape CHECK, or index with a negative length): each
must now fail with an InvalidArgumentError that names the problem. Raw ops,
so that nothing in Python checks them first; every CPU ISA."""

import pytest
import tensorflow as tf

from bsr_testing import PATHS
from bsr_testing import core_message
from bsr_testing import path_scope
from tf_blocksparse.ops import _loader

CUSTOM = [p for p in PATHS if p.startswith("custom")]


def _lib():
  return _loader._load()  # pylint: disable=protected-access


def _bsr(values_shape, row_ptr, dense_shape, cols=()):
  return [tf.zeros(values_shape), tf.constant(list(cols), tf.int32),
          tf.constant(row_ptr, tf.int32), tf.constant(dense_shape, tf.int64)]


def _matmul(x_shape, *bsr):
  return lambda: _lib().tfbs_bsr_matmul(tf.zeros(x_shape), *_bsr(*bsr))


def _transposed(dy_shape, *bsr):
  return lambda: _lib().tfbs_bsr_matmul_transposed(tf.zeros(dy_shape), *_bsr(*bsr))


def _simple(x_shape, h_shape, *bsr):
  return lambda: _lib().tfbs_bsr_simple_rnn_sequence(
      tf.zeros(x_shape), tf.zeros(h_shape), tf.zeros([0], tf.bool), *_bsr(*bsr))


CASES = {
    # nnzb = 0 and a block height that passed the row_ptr length check
    "huge block height": (
        _matmul([1, 1], [0, 2**40, 1], [0, 0], [1, 2**40]),
        "dense shape must be at most 1073741824 per dimension (int32 indices), "
        "got [1, 1099511627776]"),
    "huge block, dense shape in range": (
        _matmul([1, 1], [0, 2**40, 1], [0, 1], [1, 1]),
        "block shape must be at most 1073741824 per dimension, got (1099511627776, 1)"),
    # (n + bw - 1) / bw overflowed to -1 block columns
    "int64 max dense shape": (
        _matmul([1, 1], [0, 1, 2], [0, 1], [1, 2**63 - 1]),
        "dense shape must be at most 1073741824 per dimension (int32 indices), "
        "got [1, 9223372036854775807]"),
    "2^62 columns": (
        _matmul([1, 1], [0, 1, 1], [0, 1], [1, 2**62]),
        "dense shape must be at most 1073741824 per dimension (int32 indices), "
        "got [1, 4611686018427387904]"),
    # rows x columns of the output beyond int64 (TensorShape aborted)
    "output elements overflow": (
        _matmul([2**40, 0], [0, 1, 1], [0], [0, 2**30]),
        "y [1099511627776, 1073741824] would have more than 2^63 - 1 elements"),
    "transposed output overflow": (
        _transposed([2**40, 0], [0, 2**20, 1], [0] * (2**10 + 1), [2**30, 0]),
        "dx [1099511627776, 1073741824] would have more than 2^63 - 1 elements"),
    "sequence with a huge trailing block dimension": (
        _simple([0, 1, 1], [0, 1], [0, 1, 2**62], [0, 0], [1, 1]),
        "block shape must be at most 1073741824 per dimension, got (1, 4611686018427387904)"),
    "sequence with huge units": (
        _simple([0, 1, 1], [0, 2**62], [0, 1, 1], [0, 0], [1, 1]),
        "initial state h0 has 4611686018427387904 units, more than the 1073741824 "
        "supported"),
    "negative dense shape": (
        _matmul([1, 1], [0, 1, 1], [0], [-2**63, 1]),
        "dense shape must be non-negative, got [-9223372036854775808, 1]"),
}


@pytest.mark.parametrize("path", CUSTOM)
@pytest.mark.parametrize("name", sorted(CASES))
def test_fails_cleanly(path, name):
  fn, message = CASES[name]
  with path_scope(path):
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
      fn()
  assert core_message(raised.value) == message
