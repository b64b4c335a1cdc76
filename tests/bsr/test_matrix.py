"""BlockSparseMatrix: construction, conversion, validation, and travel
through tf.function, SavedModel and Keras layer weights."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from bsr_testing import numpy_bsr
from bsr_testing import random_block_sparse

SHAPES = [((64, 48), (16, 16)), ((50, 37), (16, 16)), ((33, 21), (4, 1)),
          ((30, 20), (3, 5)), ((1, 1), (4, 4)), ((8, 8), (32, 32))]


@pytest.mark.parametrize("shape,block", SHAPES)
def test_from_dense_matches_loop_reference(shape, block):
  rng = np.random.default_rng(1)
  dense, mask = random_block_sparse(rng, *shape, block)
  m = tfbs.BlockSparseMatrix.from_dense(dense, block)
  values, cols, row_ptr = numpy_bsr(dense, mask, block)
  np.testing.assert_array_equal(m.values.numpy(), values)
  np.testing.assert_array_equal(m.col_indices.numpy(), cols)
  np.testing.assert_array_equal(m.row_ptr.numpy(), row_ptr)
  assert m.shape == shape and m.block_size == block
  np.testing.assert_array_equal(m.to_dense().numpy(), dense)


def test_components_constructor_and_properties():
  # 2 x 3 grid of 4x4 blocks, two stored: (0, 2) and (1, 0); true shape 7 x 10.
  values = np.arange(32, dtype=np.float32).reshape([2, 4, 4])
  m = tfbs.BlockSparseMatrix(values, np.int32([2, 0]), np.int32([0, 1, 2]), (7, 10))
  expected = np.zeros([8, 12], np.float32)
  expected[0:4, 8:12] = values[0]
  expected[4:8, 0:4] = values[1]
  np.testing.assert_array_equal(m.to_dense().numpy(), expected[:7, :10])
  assert m.block_grid == (2, 3)
  assert int(m.num_blocks) == 2
  assert float(m.density) == pytest.approx(2 / 6)
  # 2 blocks * (16 floats * 4 bytes + 4 bytes col index) + 3 row pointers * 4.
  assert int(m.nbytes) == 2 * (64 + 4) + 12


def test_from_mask_keeps_zero_blocks_of_the_mask():
  dense = np.zeros([8, 8], np.float32)
  dense[0, 0] = 1.0
  mask = np.array([[True, True], [False, False]])
  m = tfbs.BlockSparseMatrix.from_mask(dense, mask, (4, 4))
  assert int(m.num_blocks) == 2
  np.testing.assert_array_equal(m.col_indices.numpy(), [0, 1])
  np.testing.assert_array_equal(m.to_dense().numpy(), dense)


def test_nan_block_is_kept_by_from_dense():
  dense = np.zeros([4, 8], np.float32)
  dense[1, 5] = np.nan
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  assert int(m.num_blocks) == 1 and m.col_indices.numpy().tolist() == [1]


def test_from_dense_inside_tf_function():
  rng = np.random.default_rng(2)
  dense, _ = random_block_sparse(rng, 20, 24, (4, 4))

  @tf.function
  def roundtrip(d):
    return tfbs.BlockSparseMatrix.from_dense(d, 4).to_dense()

  np.testing.assert_array_equal(roundtrip(tf.constant(dense)).numpy(), dense)


BAD_COMPONENTS = [
    # (values shape, col_indices, row_ptr, shape, message fragment)
    ([2, 4, 4], [0, 1], [0, 2, 1], (8, 8), "non-decreasing"),
    ([2, 4, 4], [0, 1], [0, 1, 1], (8, 8), "must end at the number of blocks"),
    ([2, 4, 4], [0, 1], [1, 1, 2], (8, 8), "row_ptr[0] must be 0"),
    ([2, 4, 4], [0, 2], [0, 1, 2], (8, 8), "out of range"),
    ([2, 4, 4], [0, -1], [0, 1, 2], (8, 8), "out of range"),
    ([2, 4, 4], [1, 0], [0, 2, 2], (8, 8), "strictly increasing"),
    ([2, 4, 4], [1, 1], [0, 2, 2], (8, 8), "strictly increasing"),
    ([2, 4, 4], [0], [0, 1, 2], (8, 8), "col_indices has 1 entries"),
    ([2, 4, 4], [0, 1], [0, 2], (8, 8), "row_ptr must have"),
    ([2, 0, 4], [0, 1], [0, 1, 2], (8, 8), "block shape must be positive"),
    ([2, 4, 4], [0, 1], [0, 1, 2], (-8, 8), "non-negative"),
    ([2, 16], [0, 1], [0, 1, 2], (8, 8), "rank 3"),
]


@pytest.mark.parametrize("values_shape,cols,row_ptr,shape,message", BAD_COMPONENTS)
def test_malformed_components_are_rejected(values_shape, cols, row_ptr, shape, message):
  with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")):
    tfbs.BlockSparseMatrix(np.ones(values_shape, np.float32), np.int32(cols),
                           np.int32(row_ptr), shape)


def test_bad_block_size_and_dtypes_are_rejected():
  with pytest.raises(tf.errors.InvalidArgumentError, match="positive"):
    tfbs.BlockSparseMatrix.from_dense(np.ones([4, 4], np.float32), (0, 4))
  with pytest.raises(tf.errors.InvalidArgumentError, match="positive"):
    tfbs.BlockSparseMatrix.from_dense(np.ones([4, 4], np.float32), -2)
  with pytest.raises(tf.errors.InvalidArgumentError, match="int32"):
    tfbs.BlockSparseMatrix(np.ones([1, 4, 4], np.float32), np.int64([0]),
                           np.int32([0, 1]), (4, 4))
  with pytest.raises(tf.errors.InvalidArgumentError, match="floating"):
    tfbs.BlockSparseMatrix(np.ones([1, 4, 4], np.int32), np.int32([0]),
                           np.int32([0, 1]), (4, 4))


def test_empty_matrix():
  m = tfbs.BlockSparseMatrix.from_dense(np.zeros([12, 8], np.float32), 4)
  assert int(m.num_blocks) == 0 and float(m.density) == 0.0
  np.testing.assert_array_equal(m.row_ptr.numpy(), [0, 0, 0, 0])
  np.testing.assert_array_equal(m.to_dense().numpy(), np.zeros([12, 8]))


def test_travels_through_tf_function_and_saved_model(tmp_path):
  rng = np.random.default_rng(3)
  dense, _ = random_block_sparse(rng, 40, 24, (8, 8))
  m = tfbs.BlockSparseMatrix.from_dense(dense, 8)

  @tf.function
  def apply(matrix, x):
    return tfbs.ops.bsr_matmul(x, matrix)

  x = rng.standard_normal([3, 40]).astype(np.float32)
  np.testing.assert_allclose(apply(m, x).numpy(), x @ dense, rtol=1e-5, atol=1e-5)

  module = tf.Module()
  module.matrix_fn = tf.function(lambda mat: mat.to_dense(),
                                 input_signature=[tf.type_spec_from_value(m)])
  module.values = tf.Variable(m.values)
  module.cols = tf.Variable(m.col_indices, trainable=False)
  module.row_ptr = tf.Variable(m.row_ptr, trainable=False)
  module.apply = tf.function(
      lambda x: tfbs.ops.bsr_matmul(x, tfbs.BlockSparseMatrix(
          module.values, module.cols, module.row_ptr, (40, 24))),
      input_signature=[tf.TensorSpec([None, 40], tf.float32)])
  path = os.path.join(tmp_path, "sm")
  tf.saved_model.save(module, path)
  loaded = tf.saved_model.load(path)
  np.testing.assert_allclose(loaded.apply(x).numpy(), x @ dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loaded.matrix_fn(m).numpy(), dense)


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse_tests")
class _BsrWeightLayer(tf_keras.layers.Layer):
  """Holds BSR components as layer weights, as the block-sparse layers do."""

  def __init__(self, shape, block, nnzb, **kwargs):
    super().__init__(**kwargs)
    self.dense_shape, self.block, self.nnzb = tuple(shape), tuple(block), nnzb
    nbr = -(-shape[0] // block[0])
    self.values = self.add_weight("values", [nnzb, *block], initializer="zeros")
    self.cols = self.add_weight("cols", [nnzb], dtype=tf.int32,
                                initializer="zeros", trainable=False)
    self.row_ptr = self.add_weight("row_ptr", [nbr + 1], dtype=tf.int32,
                                   initializer="zeros", trainable=False)

  def call(self, x):
    return tfbs.ops.bsr_matmul(x, tfbs.BlockSparseMatrix(
        self.values, self.cols, self.row_ptr, self.dense_shape))

  def get_config(self):
    return {**super().get_config(), "shape": self.dense_shape,
            "block": self.block, "nnzb": self.nnzb}


def test_travels_as_keras_layer_weights(tmp_path):
  rng = np.random.default_rng(4)
  dense, _ = random_block_sparse(rng, 20, 12, (4, 4), density=0.5)
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  layer = _BsrWeightLayer((20, 12), (4, 4), int(m.num_blocks))
  model = tf_keras.Sequential([tf_keras.Input([20]), layer])
  layer.set_weights([m.values.numpy(), m.col_indices.numpy(), m.row_ptr.numpy()])
  x = rng.standard_normal([5, 20]).astype(np.float32)
  np.testing.assert_allclose(model(x).numpy(), x @ dense, rtol=1e-5, atol=1e-5)
  path = os.path.join(tmp_path, "model.keras")
  model.save(path)
  restored = tf_keras.models.load_model(path)
  np.testing.assert_allclose(restored(x).numpy(), x @ dense, rtol=1e-5, atol=1e-5)
  # Fine-tuning moves the values and keeps the layout.
  model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
  model.fit(x, np.zeros([5, 12], np.float32), epochs=2, verbose=0)
  cols_after = layer.cols.numpy()
  np.testing.assert_array_equal(cols_after, m.col_indices.numpy())
  assert not np.allclose(layer.values.numpy(), m.values.numpy())


def test_checked_layout_constructor_builds_the_same_value():
  """The internal constructor that skips `__validate__` (for layouts checked
  before) gives what `__init__` gives: fields, spec, nest, tf.function."""
  rng = np.random.default_rng(6)
  dense, _ = random_block_sparse(rng, 20, 12, (4, 4), density=0.5)
  m = tfbs.BlockSparseMatrix.from_dense(dense, 4)
  values = tf.Variable(m.values)
  fast = tfbs.BlockSparseMatrix._from_checked_layout(  # pylint: disable=protected-access
      values, m.col_indices, m.row_ptr, [20, 12])
  slow = tfbs.BlockSparseMatrix(values, m.col_indices, m.row_ptr, (20, 12))
  assert fast.shape == (20, 12) and isinstance(fast.values, tf.Tensor)
  assert tf.type_spec_from_value(fast) == tf.type_spec_from_value(slow)
  for a, b in zip(tf.nest.flatten(fast, expand_composites=True),
                  tf.nest.flatten(slow, expand_composites=True)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(tf.function(lambda mat: mat.to_dense())(fast), dense)


@pytest.mark.parametrize("custom", [True, False])
@pytest.mark.parametrize("values_shape,cols,row_ptr,shape,message", BAD_COMPONENTS[:7])
def test_malformed_components_are_rejected_inside_tf_function(
    custom, values_shape, cols, row_ptr, shape, message):
  """Inside a graph the index checks run with the product, in both paths."""
  @tf.function
  def apply(values, cols, row_ptr):
    m = tfbs.BlockSparseMatrix(values, cols, row_ptr, shape)
    return tfbs.ops.bsr_matmul(tf.ones([2, shape[0]]), m)

  # The path is fixed when tracing, so each test traces its own function.
  with tfbs.ops.use_custom_ops(custom), pytest.raises(tf.errors.InvalidArgumentError):
    apply(tf.ones(values_shape), tf.constant(cols, tf.int32),
          tf.constant(row_ptr, tf.int32))
