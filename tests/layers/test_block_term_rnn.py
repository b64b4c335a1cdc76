"""Tests of `BlockTermLSTM`/`BlockTermGRU` against tf_keras `LSTM`/`GRU`."""

import doctest
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse.layers import block_term_rnn

I_MODES, RANK, UNITS, STEPS = (3, 4), 2, 6, 5
INPUT_DIM = 12


def _bt(kind, dtype="float64", **kwargs):
  cls = {"lstm": tfbs.layers.BlockTermLSTM, "gru": tfbs.layers.BlockTermGRU}[kind]
  args = dict(units=UNITS, input_modes=I_MODES, rank=RANK, num_blocks=2,
              bias_initializer="random_normal")
  args.update(kwargs)
  return cls(dtype=dtype, **args)


def _reference(kind, bt_layer, **kwargs):
  """A tf_keras LSTM/GRU holding the BT layer's weights in dense form."""
  cls = {"lstm": tf_keras.layers.LSTM, "gru": tf_keras.layers.GRU}[kind]
  if kind == "gru":
    kwargs["reset_after"] = bt_layer.cell.reset_after
  ref = cls(UNITS, dtype=bt_layer.dtype, use_bias=bt_layer.cell.use_bias,
            activation=bt_layer.cell.activation,
            recurrent_activation=bt_layer.cell.recurrent_activation, **kwargs)
  return ref


def _copy_to_reference(bt_layer, ref):
  weights = [bt_layer.dense_kernel().numpy(),
             bt_layer.recurrent_dense_kernel().numpy()]
  if bt_layer.cell.use_bias:
    weights.append(bt_layer.cell.bias.numpy())
  ref.set_weights(weights)


def _sequences(seed, batch=3, steps=STEPS, dim=INPUT_DIM, pad=True):
  x = np.random.default_rng(seed).normal(size=[batch, steps, dim])
  if pad:
    x[1, -2:] = 0.0  # masked tail
    x[2, -1:] = 0.0
  return x


def _trainable_size(layer):
  return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


VARIANTS = [
    ("lstm", {}), ("lstm", dict(recurrent_block_size=2, recurrent_density=0.5)),
    ("lstm", dict(recurrent_block_size=(3, 4), recurrent_density=0.4,
                  use_bias=False, activation="relu")),
    ("gru", {}), ("gru", dict(recurrent_block_size=3, recurrent_density=0.6)),
    ("gru", dict(reset_after=False)),
]


@pytest.mark.parametrize("kind,kwargs", VARIANTS)
@pytest.mark.parametrize("go_backwards", [False, True])
def test_matches_keras_layer_with_dense_kernels(kind, kwargs, go_backwards):
  x = _sequences(0)
  bt = _bt(kind, return_sequences=True, return_state=True,
           go_backwards=go_backwards, **kwargs)
  masked = tf_keras.layers.Masking(0.0, dtype="float64")
  got = bt(masked(x))
  ref = _reference(kind, bt, return_sequences=True, return_state=True,
                   go_backwards=go_backwards)
  ref(masked(x))
  _copy_to_reference(bt, ref)
  expected = ref(masked(x))
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
  if "recurrent_block_size" in kwargs:
    # The recurrent kernel really is block sparse with the requested count.
    cell = bt.cell
    grid = math.prod(cell.recurrent_mask.shape)
    assert cell.recurrent_values.shape[0] == round(
        kwargs["recurrent_density"] * grid)
    dense = bt.recurrent_dense_kernel().numpy()
    bh, bw = cell.recurrent_block_size
    for (r, c), keep in np.ndenumerate(cell.recurrent_mask):
      if not keep:
        assert not dense[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw].any()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_matches_within_float32_tolerance(kind):
  x = _sequences(1).astype(np.float32)
  bt = _bt(kind, dtype="float32", recurrent_block_size=2,
           recurrent_density=0.5, return_sequences=True)
  got = bt(x)
  ref = _reference(kind, bt, return_sequences=True)
  ref(x)
  _copy_to_reference(bt, ref)
  np.testing.assert_allclose(got, ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_state_matches_keras(kind):
  x = _sequences(11, pad=False)
  rng = np.random.default_rng(12)
  states = [tf.constant(rng.normal(size=[3, UNITS]))
            for _ in range(2 if kind == "lstm" else 1)]
  bt = _bt(kind, recurrent_block_size=3, recurrent_density=0.5)
  got = bt(x, initial_state=states)
  ref = _reference(kind, bt)
  ref(x)
  _copy_to_reference(bt, ref)
  np.testing.assert_allclose(got, ref(x, initial_state=states), rtol=1e-10,
                             atol=1e-12)
  # Keras tensors as initial states go through the functional API.
  inputs = tf_keras.Input([STEPS, INPUT_DIM], dtype="float64")
  state_inputs = [tf_keras.Input([UNITS], dtype="float64") for _ in states]
  model = tf_keras.Model([inputs] + state_inputs,
                         bt(inputs, initial_state=state_inputs))
  np.testing.assert_allclose(model([x] + states), got, rtol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional_matches_keras(kind):
  x = _sequences(2)
  bidi = tf_keras.layers.Bidirectional(
      _bt(kind, return_sequences=True, recurrent_block_size=2,
          recurrent_density=0.5), dtype="float64")
  masked = tf_keras.layers.Masking(0.0, dtype="float64")
  got = bidi(masked(x))
  assert bidi.backward_layer.go_backwards
  ref = tf_keras.layers.Bidirectional(
      _reference(kind, bidi.forward_layer, return_sequences=True),
      dtype="float64")
  ref(masked(x))
  _copy_to_reference(bidi.forward_layer, ref.forward_layer)
  _copy_to_reference(bidi.backward_layer, ref.backward_layer)
  np.testing.assert_allclose(got, ref(masked(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stateful_continues_across_calls(kind):
  x = _sequences(3, batch=2, steps=6, pad=False)
  stateful = _bt(kind, stateful=True, return_sequences=True,
                 recurrent_block_size=2, recurrent_density=0.5)
  model = tf_keras.Sequential([tf_keras.Input(batch_shape=(2, 3, INPUT_DIM),
                                              dtype="float64"), stateful])
  first = model(x[:, :3]).numpy()
  second = model(x[:, 3:]).numpy()
  whole = _bt(kind, return_sequences=True, recurrent_block_size=2,
              recurrent_density=0.5)
  whole(x)
  whole.set_weights(stateful.get_weights())
  np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole(x),
                             rtol=1e-10, atol=1e-12)
  stateful.reset_states()
  np.testing.assert_allclose(model(x[:, :3]), first, rtol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_alone_in_keras_rnn_equals_layer(kind):
  x = _sequences(4, pad=False)
  layer = _bt(kind, return_sequences=True)
  got = layer(x)
  cell_cls = type(layer.cell)
  rnn = tf_keras.layers.RNN(cell_cls.from_config(layer.cell.get_config()),
                            return_sequences=True, dtype="float64")
  rnn(x)
  rnn.set_weights(layer.get_weights())
  np.testing.assert_allclose(rnn(x), got, rtol=1e-10, atol=1e-12)


def test_ragged_input_matches_masked_padding():
  x = _sequences(5, pad=False)
  lengths = [5, 3, 4]
  ragged = tf.RaggedTensor.from_tensor(tf.constant(x), lengths=lengths)
  layer = _bt("lstm")
  got = layer(ragged)
  padded = np.array(x)
  for row, n in enumerate(lengths):
    padded[row, n:] = 0.0
  expected = layer(tf_keras.layers.Masking(0.0, dtype="float64")(padded))
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,gates", [("lstm", 4), ("gru", 3)])
def test_parameter_count(kind, gates):
  dense = _bt(kind)
  dense.build((None, None, INPUT_DIM))
  out_modes = dense.cell.output_modes
  assert math.prod(out_modes) == gates * UNITS
  # N * (sum_k I_k J_k R_k + prod_k R_k), then recurrent H x gH, then bias.
  bt = 2 * (3 * out_modes[0] * 2 + 4 * out_modes[1] * 2 + 2 * 2)
  bias = gates * UNITS * (2 if kind == "gru" else 1)
  recurrent = UNITS * gates * UNITS
  assert _trainable_size(dense) == bt + recurrent + bias
  assert dense.count_params() == bt + recurrent + bias
  sparse = _bt(kind, recurrent_block_size=(2, 3), recurrent_density=0.25)
  sparse.build((None, None, INPUT_DIM))
  blocks = round(0.25 * (UNITS // 2) * (gates * UNITS // 3))
  assert _trainable_size(sparse) == bt + blocks * 2 * 3 + bias
  assert dense.compression_ratio == pytest.approx(
      INPUT_DIM * gates * UNITS / bt)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_input_kernel_has_glorot_scale(kind):
  gates = 4 if kind == "lstm" else 3
  layer = {"lstm": tfbs.layers.BlockTermLSTM,
           "gru": tfbs.layers.BlockTermGRU}[kind](32, [8, 8, 8], 3, 2)
  layer.build((None, None, 512))
  target = math.sqrt(2.0 / (512 + gates * 32))
  assert 0.5 < float(np.std(layer.dense_kernel())) / target < 2.0


@pytest.mark.parametrize("kind,kwargs", [
    ("lstm", dict(recurrent_block_size=2, recurrent_density=0.5)),
    ("gru", {})])
def test_gradients_match_numeric(kind, kwargs):
  layer = _bt(kind, units=3, input_modes=(2, 3), output_modes=None, **kwargs)
  x = _sequences(6, batch=2, steps=3, dim=6, pad=False)
  # Traced once: the numeric Jacobian calls the layer twice per entry.
  call = tf.function(layer)
  theoretical, numerical = tf.test.compute_gradient(call, [x], delta=1e-6)
  np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-8)
  # All weights at once: analytic Jacobian from the tape, numeric one by
  # central differences over a flat parameter vector written into them.
  variables = layer.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    y = call(x)
    outputs = tf.unstack(tf.reshape(y, [-1]))
  # One backward pass per output (tape.jacobian's pfor is slow on RNNs).
  analytic = np.stack([
      np.concatenate([g.numpy().ravel() for g in tape.gradient(out, variables)])
      for out in outputs])
  start = np.concatenate([v.numpy().ravel() for v in variables])
  sizes = [int(np.prod(v.shape)) for v in variables]

  def set_and_call(theta):
    for v, part in zip(variables, tf.split(theta, sizes)):
      v.assign(tf.reshape(part, v.shape))
    return call(x)
  _, numeric = tf.test.compute_gradient(set_and_call, [start], delta=1e-6)
  set_and_call(tf.constant(start))
  assert analytic.shape == numeric[0].shape
  np.testing.assert_allclose(analytic, numeric[0], rtol=1e-6, atol=1e-8)


def test_fit_reduces_loss():
  tf_keras.utils.set_random_seed(7)
  rng = np.random.default_rng(7)
  x = rng.normal(size=[64, 4, INPUT_DIM]).astype(np.float32)
  y = (x[:, 0, :3] > 0).astype(np.float32)  # remember the first frame
  model = tf_keras.Sequential([
      tf_keras.Input([4, INPUT_DIM]),
      tfbs.layers.BlockTermGRU(8, I_MODES, 2, recurrent_block_size=4,
                               recurrent_density=0.5),
      tf_keras.layers.Dense(3)])
  model.compile(tf_keras.optimizers.Adam(0.03),
                tf_keras.losses.BinaryCrossentropy(from_logits=True))
  before = model.evaluate(x, y, verbose=0)
  values_before = model.layers[0].cell.recurrent_values.numpy()
  model.fit(x, y, epochs=40, batch_size=32, verbose=0)
  assert model.evaluate(x, y, verbose=0) < 0.5 * before
  assert not np.allclose(model.layers[0].cell.recurrent_values, values_before)


@pytest.mark.parametrize("kind,kwargs", VARIANTS[:2] + VARIANTS[4:6])
def test_config_round_trip(kind, kwargs):
  layer = _bt(kind, return_sequences=True, go_backwards=True, name="btr",
              factor_regularizer="l2", **kwargs)
  config = layer.get_config()
  clone = type(layer).from_config(config)
  assert clone.get_config() == config
  x = _sequences(8)
  layer(x)
  clone(x)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(clone(x), layer(x), rtol=1e-12)
  cell_config = layer.cell.get_config()
  assert type(layer.cell).from_config(cell_config).get_config() == cell_config
  bidi = tf_keras.layers.Bidirectional(layer)
  restored = tf_keras.layers.deserialize(tf_keras.layers.serialize(bidi))
  assert isinstance(restored.forward_layer, type(layer))
  assert restored.backward_layer.go_backwards != restored.forward_layer.go_backwards


def _model(sparse):
  kwargs = dict(recurrent_block_size=2, recurrent_density=0.5) if sparse else {}
  inputs = tf_keras.Input([STEPS, INPUT_DIM])
  h = tf_keras.layers.Masking(0.0)(inputs)
  h = tf_keras.layers.Bidirectional(tfbs.layers.BlockTermLSTM(
      UNITS, I_MODES, RANK, return_sequences=True, **kwargs))(h)
  h = tfbs.layers.BlockTermGRU(4, (3, 4), 2, **kwargs)(h)
  return tf_keras.Model(inputs, tf_keras.layers.Dense(2)(h))


@pytest.mark.parametrize("fmt,sparse", [("keras", False), ("keras", True),
                                        ("tf", True)])
def test_model_save_round_trip(tmp_path, fmt, sparse):
  model = _model(sparse)
  x = _sequences(9).astype(np.float32)
  expected = model(x).numpy()
  path = str(tmp_path / ("m.keras" if fmt == "keras" else "m_tf"))
  model.save(path, save_format=fmt)
  loaded = tf_keras.models.load_model(path)
  np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
  assert isinstance(loaded.layers[3], tfbs.layers.BlockTermGRU)


def _op_types(saved_dir):
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
  return types - functions


@pytest.mark.parametrize("sparse", [False, True])
def test_tf_saved_model_with_stock_ops(tmp_path, sparse):
  # One layer per case: tracing for tf.saved_model.save is slow with the
  # pure-TF BSR product.
  inputs = tf_keras.Input([STEPS, INPUT_DIM])
  h = tf_keras.layers.Masking(0.0)(inputs)
  if sparse:
    h = tfbs.layers.BlockTermLSTM(UNITS, I_MODES, RANK, recurrent_block_size=2,
                                  recurrent_density=0.5)(h)
  else:
    h = tfbs.layers.BlockTermGRU(UNITS, I_MODES, RANK)(h)
  model = tf_keras.Model(inputs, h)
  x = _sequences(10).astype(np.float32)
  expected = model(x).numpy()
  path = str(tmp_path / "sm")
  # Traced with the pure-TF BSR product: the graph then needs no custom op.
  with tfbs.ops.use_custom_ops(False):
    serve = tf.function(model.call,
                        input_signature=[tf.TensorSpec([None, STEPS, INPUT_DIM])])
    tf.saved_model.save(model, path, signatures=serve.get_concrete_function())
  op_types = _op_types(path)
  assert "Einsum" in op_types
  assert not {t for t in op_types if t.startswith("Tfbs")}
  assert not {t for t in op_types if not hasattr(tf.raw_ops, t)}
  loaded = tf.saved_model.load(path)
  got = list(loaded.signatures["serving_default"](tf.constant(x)).values())[0]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(output_modes=(4, 5)), ValueError,
     r"output_modes \(4, 5\) multiply to 20 but the 4 gates need 4 \* units = 24"),
    (dict(rank=0), ValueError, "rank must be positive"),
    (dict(input_modes=(3, 4), rank=(2, 2, 2)), ValueError, "has 3 entries"),
    (dict(units=0), ValueError, "units must be positive"),
    (dict(recurrent_density=0.5), ValueError, "need recurrent_block_size"),
    (dict(recurrent_block_size=2, recurrent_density=1.5), ValueError,
     r"recurrent_density must be in \(0, 1\]"),
    (dict(recurrent_block_size=2, recurrent_mask=np.ones([2, 2])), ValueError,
     r"recurrent_mask has shape \(2, 2\) but a \[6, 24\] recurrent kernel in "
     r"2x2 blocks has a \[3, 12\] block grid"),
    (dict(recurrent_block_size=2, recurrent_mask=np.zeros([3, 12])), ValueError,
     "keeps no block"),
    (dict(recurrent_block_size=0), ValueError, "must be positive"),
])
def test_bad_arguments(kwargs, err, match):
  args = dict(units=UNITS, input_modes=I_MODES, rank=RANK)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    tfbs.layers.BlockTermLSTM(**args)


def test_gru_reset_before_needs_dense_recurrent():
  with pytest.raises(ValueError, match="reset_after=False .* dense"):
    tfbs.layers.BlockTermGRU(4, I_MODES, 2, reset_after=False,
                             recurrent_block_size=2)


def test_wrong_frame_size_names_the_modes():
  layer = tfbs.layers.BlockTermLSTM(4, (3, 4), 2)
  with pytest.raises(ValueError, match=r"input has 10 features but input_modes \(3, 4\) multiply to 12"):
    layer(np.ones([2, 3, 10], np.float32))


def test_explicit_mask_is_kept():
  mask = np.zeros([3, 12], bool)
  mask[0, 0] = mask[2, 11] = mask[1, 5] = True
  layer = _bt("lstm", recurrent_block_size=2, recurrent_mask=mask)
  layer.build((None, None, INPUT_DIM))
  np.testing.assert_array_equal(layer.cell.recurrent_mask, mask)
  dense = layer.recurrent_dense_kernel().numpy()
  blocks = np.abs(dense).reshape(3, 2, 12, 2).sum(axis=(1, 3)) > 0
  np.testing.assert_array_equal(blocks, mask)


def test_docstring_examples():
  finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
  for obj in (block_term_rnn.BlockTermLSTM, block_term_rnn.BlockTermGRU,
              block_term_rnn.BlockTermLSTMCell, block_term_rnn.BlockTermGRUCell):
    for test in finder.find(obj):
      runner.run(test)
  summary = runner.summarize(verbose=False)
  assert summary.failed == 0 and summary.attempted >= 8
