"""Tests of `BlockTermDense`."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse.layers import block_term_dense


def _layer(dtype="float64", **kwargs):
  args = dict(input_modes=[3, 4, 2], output_modes=[2, 3, 2], rank=[2, 3, 2],
              num_blocks=2)
  args.update(kwargs)
  return tfbs.layers.BlockTermDense(dtype=dtype, **args)


def _op_types(saved_dir):
  """Op types in every graph of a SavedModel."""
  from tensorflow.core.protobuf import saved_model_pb2
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  types, functions = set(), set()
  for meta in proto.meta_graphs:
    types.update(node.op for node in meta.graph_def.node)
    for fn in meta.graph_def.library.function:
      functions.add(fn.signature.name)
      types.update(node.op for node in fn.node_def)
  # A node may call a function of the library by its name.
  return types - functions


def test_public_names():
  assert tfbs.layers.BlockTermDense is block_term_dense.BlockTermDense
  assert tfbs.block_term.factorize_shape(64, 2) == (8, 8)


@pytest.mark.parametrize("use_bias", [True, False])
def test_parameter_count_matches_formula(use_bias):
  layer = _layer(use_bias=use_bias)
  layer.build([None, 24])
  # N * (sum_k I_k J_k R_k + prod_k R_k) + J with N=2, I=(3,4,2), J=(2,3,2),
  # R=(2,3,2): 2 * (3*2*2 + 4*3*3 + 2*2*2 + 2*3*2) + 12 = 2 * 68 + 12.
  assert layer.count_params() == 136 + (12 if use_bias else 0)
  assert layer.compression_ratio == pytest.approx(24 * 12 / 136)


@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-12, 1e-12),
                                             ("float32", 1e-5, 1e-6)])
def test_forward_equals_dense_kernel(dtype, rtol, atol):
  layer = _layer(dtype=dtype, bias_initializer="random_normal",
                 activation="tanh")
  x = np.random.default_rng(0).normal(size=[5, 7, 24]).astype(dtype)
  y = layer(x)
  w = layer.dense_kernel().numpy().astype(np.float64)
  expected = np.tanh(x.astype(np.float64) @ w + layer.bias.numpy())
  assert y.shape == (5, 7, 12)
  # float32: the contraction order differs from one dense matmul, so allow
  # float32 rounding (rtol 1e-5) relative to the output scale.
  np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)


def test_dense_kernel_is_reconstruction_of_weights():
  layer = _layer()
  layer.build([None, 24])
  factors = [f.numpy() for f in layer.factors]
  core = layer.core.numpy()
  # Tucker mode products written out for d = 3 with numpy.
  w = np.einsum("nabp,ncdq,nefs,npqs->acebdf", *factors, core).reshape(24, 12)
  np.testing.assert_allclose(layer.dense_kernel(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("modes", [([8, 8, 8], [4, 8, 8], 3, 2),
                                   ([32, 32], [16, 32], 4, 1)])
def test_initial_kernel_has_glorot_scale(modes):
  ins, outs, rank, n = modes
  layer = tfbs.layers.BlockTermDense(ins, outs, rank, n)
  layer.build([None, math.prod(ins)])
  target = math.sqrt(2.0 / (math.prod(ins) + math.prod(outs)))
  ratio = float(np.std(layer.dense_kernel())) / target
  assert 0.5 < ratio < 2.0


def test_gradients_match_numeric():
  layer = _layer(activation="tanh", bias_initializer="random_normal")
  x = np.random.default_rng(1).normal(size=[2, 24])
  theoretical, numerical = tf.test.compute_gradient(layer, [x], delta=1e-6)
  np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-8)
  for var in layer.trainable_variables:
    with tf.GradientTape() as tape:
      y = layer(x)
    analytic = tape.jacobian(y, var).numpy().reshape(y.shape.num_elements(), -1)
    start = var.numpy()

    def set_and_call(v, var=var):
      var.assign(v)
      return layer(x)
    _, numeric = tf.test.compute_gradient(set_and_call, [start], delta=1e-6)
    var.assign(start)
    np.testing.assert_allclose(analytic, numeric[0], rtol=1e-6, atol=1e-8,
                               err_msg=var.name)


def test_fit_learns_a_block_term_target():
  rng = np.random.default_rng(2)
  teacher = _layer(dtype="float32")
  x = rng.normal(size=[256, 24]).astype(np.float32)
  y = teacher(x).numpy()
  model = tf_keras.Sequential([tf_keras.Input([24]), _layer(dtype="float32")])
  model.compile(tf_keras.optimizers.Adam(0.05), "mse")
  before = model.evaluate(x, y, verbose=0)
  model.fit(x, y, epochs=30, batch_size=64, verbose=0)
  after = model.evaluate(x, y, verbose=0)
  assert after < 0.2 * before


def test_config_round_trip():
  layer = _layer(activation="relu", factor_initializer="he_normal",
                 factor_regularizer=tf_keras.regularizers.L2(1e-3),
                 name="bt")
  config = layer.get_config()
  clone = tfbs.layers.BlockTermDense.from_config(config)
  assert clone.get_config() == config
  assert (clone.input_modes, clone.output_modes, clone.ranks,
          clone.num_blocks) == ((3, 4, 2), (2, 3, 2), (2, 3, 2), 2)
  x = np.random.default_rng(3).normal(size=[3, 24])
  layer(x)
  clone(x)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(clone(x), layer(x), rtol=1e-12)
  # Registered with Keras: serialize/deserialize by name.
  assert config["name"] == "bt"
  restored = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
  assert isinstance(restored, tfbs.layers.BlockTermDense)


def _model():
  inputs = tf_keras.Input([24])
  hidden = tfbs.layers.BlockTermDense([3, 4, 2], [4, 2, 2], 2, 2,
                                      activation="relu")(inputs)
  outputs = tf_keras.layers.Dense(3)(hidden)
  return tf_keras.Model(inputs, outputs)


@pytest.mark.parametrize("fmt", ["keras", "tf"])
def test_model_save_round_trip(tmp_path, fmt):
  model = _model()
  x = np.random.default_rng(4).normal(size=[4, 24]).astype(np.float32)
  expected = model(x).numpy()
  path = str(tmp_path / ("m.keras" if fmt == "keras" else "m_tf"))
  model.save(path, save_format=fmt)
  loaded = tf_keras.models.load_model(path)
  assert isinstance(loaded.layers[1], tfbs.layers.BlockTermDense)
  np.testing.assert_allclose(loaded(x), expected, rtol=1e-6)


def test_tf_saved_model_uses_stock_ops(tmp_path):
  model = _model()
  x = np.random.default_rng(5).normal(size=[4, 24]).astype(np.float32)
  expected = model(x).numpy()
  serve = tf.function(model.call, input_signature=[tf.TensorSpec([None, 24])])
  path = str(tmp_path / "sm")
  tf.saved_model.save(model, path, signatures=serve)
  loaded = tf.saved_model.load(path)
  got = loaded.signatures["serving_default"](tf.constant(x))
  np.testing.assert_allclose(list(got.values())[0], expected, rtol=1e-6)
  op_types = _op_types(path)
  assert "Einsum" in op_types  # the mode-by-mode contraction is in the graph
  assert not {t for t in op_types if not hasattr(tf.raw_ops, t)}


def test_wrong_input_size_names_the_modes():
  layer = tfbs.layers.BlockTermDense([4, 8], [2, 2], 2)
  with pytest.raises(ValueError, match=r"input has 30 features but input_modes \(4, 8\) multiply to 32"):
    layer(np.ones([2, 30], np.float32))


@pytest.mark.parametrize("args,err,match", [
    (([4, 8], [2, 2, 2], 2), ValueError, "has 2 modes but output_modes"),
    (([4, 8], [2, 2], 0), ValueError, "rank must be positive"),
    (([4, 8], [2, 2], [1, -2]), ValueError, r"rank\[1\] must be positive"),
    (([4, 8], [2, 0], 2), ValueError, r"output_modes\[1\] must be positive"),
])
def test_bad_arguments(args, err, match):
  with pytest.raises(err, match=match):
    tfbs.layers.BlockTermDense(*args)


def test_docstring_example():
  import doctest
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner()
  for test in finder.find(block_term_dense.BlockTermDense):
    runner.run(test)
  assert runner.summarize(verbose=False).failed == 0
  assert runner.summarize(verbose=False).attempted >= 4


def test_forward_never_forms_the_dense_kernel():
  layer = _layer()
  layer.build([None, 24])
  graph = tf.function(layer).get_concrete_function(
      tf.TensorSpec([5, 24], tf.float64)).graph
  shapes = {tuple(t.shape.as_list()) for op in graph.get_operations()
            for t in op.outputs if t.shape.rank is not None}
  assert (5, 12) in shapes  # the output is there ...
  assert (24, 12) not in shapes and (12, 24) not in shapes  # ... W is not
  # Sanity check of the check: the reconstruction does form it.
  rebuilt = tf.function(layer.dense_kernel).get_concrete_function().graph
  assert any(tuple(t.shape.as_list()) == (24, 12)
             for op in rebuilt.get_operations() for t in op.outputs
             if t.shape.rank is not None)
