"""Tests of `tf_blocksparse.export.export_tflite` in the LiteRT interpreter."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import OpResolverType

import tf_blocksparse as tfbs
from tf_blocksparse.export import tflite
from tests.export import _models

STEPS = 50


def _run_sequence(path, x):
  runner = Interpreter(model_path=path).get_signature_runner("sequence")
  return runner(frames=x)["logits"]


def _run_steps(path, model, x, interpreter=None):
  runner = (interpreter or Interpreter(model_path=path)).get_signature_runner(
      "step")
  states = {}
  for name in tfbs.export.state_names(model):
    layer = model.get_layer(name.rsplit("_", 1)[0])
    states[name] = np.zeros([1, layer.cell.units], np.float32)
  outputs = []
  for t in range(x.shape[1]):
    result = runner(frames=x[:, t], **states)
    outputs.append(result["logits"])
    states = {n: result[n] for n in states}
  return np.stack(outputs, axis=1)


@pytest.mark.parametrize("rnn,block_size", [
    ("lstm", (4, 1)), ("gru", (4, 1)), ("simple", (4, 4))])
def test_step_and_sequence_models_match_keras_over_50_steps(
    tmp_path, rnn, block_size):
  sparse, dense = _models.block_sparse_model(
      rnn, features=8, units=16, outputs=3, block_size=block_size,
      sparsity=0.75, return_sequences=True)
  files = tfbs.export.export_tflite(sparse, str(tmp_path / rnn),
                                    sequence_length=STEPS)
  x = np.random.RandomState(0).randn(1, STEPS, 8).astype(np.float32)
  expected = dense(x).numpy()   # the tf_keras model before conversion
  np.testing.assert_allclose(_run_sequence(files["sequence"], x), expected,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(_run_steps(files["step"], sparse, x), expected,
                             atol=1e-4, rtol=0)


def test_last_output_only_model(tmp_path):
  sparse, dense = _models.block_sparse_model(
      "lstm", features=8, units=16, block_size=(4, 1), sparsity=0.75)
  files = tfbs.export.export_tflite(sparse, str(tmp_path / "m"),
                                    sequence_length=STEPS)
  x = np.random.RandomState(1).randn(1, STEPS, 8).astype(np.float32)
  np.testing.assert_allclose(_run_sequence(files["sequence"], x),
                             dense(x).numpy(), atol=1e-4, rtol=0)


def test_gru_without_reset_after(tmp_path):
  tf_keras.utils.set_random_seed(3)
  model = tf_keras.Sequential([
      tf_keras.Input((None, 5), name="frames"),
      tf_keras.layers.GRU(6, reset_after=False, return_sequences=True,
                          bias_initializer="random_normal", name="rnn"),
      tf_keras.layers.Dense(2, name="logits")])
  files = tfbs.export.export_tflite(model, str(tmp_path / "g"),
                                    sequence_length=7)
  x = np.random.RandomState(3).randn(1, 7, 5).astype(np.float32)
  np.testing.assert_allclose(_run_sequence(files["sequence"], x),
                             model(x).numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(_run_steps(files["step"], model, x),
                             model(x).numpy(), atol=1e-4, rtol=0)


def test_report_lists_sparse_weights_and_sparse_kernels(tmp_path):
  # (4, 1) Keras blocks are TFLite's 1x4 [out, in] blocks: sparse kernel.
  sparse, _ = _models.block_sparse_model(
      "lstm", features=16, units=16, block_size=(4, 1), sparsity=0.9)
  report = tfbs.export.export_tflite(
      sparse, str(tmp_path / "a"), sequence_length=3)["report"]
  # Kernel [16, 64], recurrent [16, 64], Dense [16, 3]: all three pruned.
  shapes = sorted(t["shape"] for t in report["sparse_tensors"])
  assert shapes == [[3, 16], [64, 16], [64, 16]]
  assert len(report["sparse_fully_connected"]) == 3
  assert report["dense_fully_connected"] == [] and report["densified"] == []
  assert report["ops"]["FULLY_CONNECTED"] == 3
  assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in report["ops"]


def test_a_stripped_pruned_model_is_converted_by_the_export(tmp_path):
  # The pruned tf_keras model itself (zeros in place, not converted): the
  # export converts it and writes what the converted model writes.
  sparse, dense = _models.block_sparse_model(
      "lstm", features=16, units=16, block_size=(4, 1), sparsity=0.9)
  files = tfbs.export.export_tflite(dense, str(tmp_path / "auto"),
                                    sequence_length=3)
  assert files["conversion"] == {"converted": ["rnn", "logits"], "note": None}
  ref = tfbs.export.export_tflite(sparse, str(tmp_path / "ref"),
                                  sequence_length=3)
  assert ref["conversion"] == {"converted": [], "note": None}
  assert files["report"]["sparse_tensors"] == ref["report"]["sparse_tensors"]
  assert len(files["report"]["sparse_fully_connected"]) == 3
  assert os.path.getsize(files["step"]) == os.path.getsize(ref["step"])
  x = np.random.RandomState(3).randn(1, 3, 16).astype(np.float32)
  np.testing.assert_allclose(_run_sequence(files["sequence"], x),
                             dense(x).numpy(), atol=1e-4, rtol=0)


def test_report_shows_densify_for_blocks_the_sparse_kernel_lacks(tmp_path):
  # (1, 4) Keras blocks are 4x1 in TFLite's layout: no float sparse kernel,
  # so the weights are stored sparse and expanded by DENSIFY.
  sparse, dense = _models.block_sparse_model(
      "lstm", features=16, units=16, block_size=(1, 4), sparsity=0.9)
  files = tfbs.export.export_tflite(sparse, str(tmp_path / "b"),
                                    sequence_length=5)
  report = files["report"]
  assert len(report["sparse_tensors"]) == 3
  assert report["sparse_fully_connected"] == []
  assert len(report["densified"]) == 3 and report["ops"]["DENSIFY"] == 3
  x = np.random.RandomState(4).randn(1, 5, 16).astype(np.float32)
  np.testing.assert_allclose(_run_sequence(files["sequence"], x),
                             dense(x).numpy(), atol=1e-4, rtol=0)


def test_report_of_a_dense_export_has_no_sparse_tensor(tmp_path):
  _, dense = _models.block_sparse_model("gru", features=8, units=8,
                                        block_size=(4, 1))
  report = tfbs.export.export_tflite(dense, str(tmp_path / "d"),
                                     sequence_length=3,
                                     sparsity=False)["report"]
  assert report["sparse_tensors"] == [] and report["sparse_fully_connected"] == []
  assert len(report["dense_fully_connected"]) == 3


def test_files_are_a_quarter_of_the_stock_converters_dense_file(tmp_path):
  sparse, dense = _models.block_sparse_model(
      "lstm", features=128, units=256, outputs=128, block_size=(4, 1),
      sparsity=0.9, return_sequences=True)
  files = tfbs.export.export_tflite(sparse, str(tmp_path / "s"),
                                    sequence_length=STEPS)
  stock_model = tf_keras.Sequential(
      [tf_keras.Input((STEPS, 128), batch_size=1)] + dense.layers)
  stock = tf.lite.TFLiteConverter.from_keras_model(stock_model).convert()
  dense_floats = sum(int(np.prod(w.shape)) for w in dense.weights)
  assert len(stock) >= 4 * dense_floats     # dense storage of every weight
  assert os.path.getsize(files["step"]) <= 0.25 * len(stock)
  assert os.path.getsize(files["sequence"]) <= 0.25 * len(stock)
  # Same numbers as the stock model on a short check.
  x = np.random.RandomState(2).randn(1, STEPS, 128).astype(np.float32)
  interpreter = Interpreter(model_content=stock)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
  interpreter.invoke()
  stock_out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
  np.testing.assert_allclose(_run_sequence(files["sequence"], x), stock_out,
                             atol=1e-4, rtol=0)


def test_unsupported_layers_and_existing_files_are_reported(tmp_path):
  conv = tf_keras.Sequential([
      tf_keras.Input((None, 4)), tf_keras.layers.Conv1D(4, 3, name="conv"),
      tf_keras.layers.LSTM(4)])
  with pytest.raises(ValueError, match="conv.*Conv1D"):
    tfbs.export.export_tflite(conv, str(tmp_path / "c"))
  sparse, _ = _models.block_sparse_model("simple", features=4, units=4,
                                         block_size=(4, 1), sparsity=0.5)
  files = tfbs.export.export_tflite(sparse, str(tmp_path / "m.tflite"),
                                    sequence_length=2)
  assert files["step"] == str(tmp_path / "m_step.tflite")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    tfbs.export.export_tflite(sparse, str(tmp_path / "m"), sequence_length=2)
  with pytest.raises(ValueError, match="sequence_length"):
    tfbs.export.export_tflite(sparse, str(tmp_path / "n"), sequence_length=0)


# --- quantized files ------------------------------------------------------------


def _builtin_steps(path, model, x):
  """`_run_steps` with LiteRT's builtin kernels (see `report["xnnpack"]`)."""
  interpreter = Interpreter(
      model_path=path, experimental_op_resolver_type=(
          OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
  return _run_steps(path, model, x, interpreter)


@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_quantized_step_file_stores_int8_weights_sparse_and_tracks_keras(
    tmp_path, quantize):
  # Dynamic-range quantization leaves weights under 1024 elements float.
  sparse, dense = _models.block_sparse_model(
      "lstm", features=32, units=32, outputs=32, block_size=(4, 4),
      sparsity=0.5, return_sequences=True)
  rng = np.random.RandomState(5)
  data = [rng.randn(4, 20, 32).astype(np.float32) for _ in range(4)]
  kwargs = {"representative_dataset": data} if quantize == "int8" else {}
  files = tfbs.export.export_tflite(sparse, str(tmp_path / quantize),
                                    sequence_length=20, quantize=quantize,
                                    **kwargs)
  report = files["report"]
  # Every FULLY_CONNECTED weight is int8 and stored sparse; the 4x4 blocks
  # are expanded by DENSIFY at prepare (no int8 sparse kernel takes them).
  assert len(report["int8_weights"]) == 3
  assert sorted(report["int8_weights"]) == sorted(
      t["name"] for t in report["sparse_tensors"])
  assert sorted(report["densified"]) == sorted(report["int8_weights"])
  assert report["xnnpack"] is False
  x = rng.randn(1, 20, 32).astype(np.float32)
  expected = dense(x).numpy()
  got = _builtin_steps(files["step"], sparse, x)
  rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
  # int8 activations over 20 recurrent steps of a random model: 12 % of
  # the output's RMS measured (the trained char-LM loses 0.24 % bpc).
  bound = {"dynamic": 0.02, "int8": 0.2}[quantize]
  assert rms(got - expected) <= bound * rms(expected), (
      rms(got - expected), rms(expected))
  # The float file of the same model is exact and larger.
  float_files = tfbs.export.export_tflite(sparse, str(tmp_path / "float"),
                                          sequence_length=20)
  assert os.path.getsize(files["step"]) < os.path.getsize(float_files["step"])


def test_the_report_tells_when_the_default_delegate_cannot_run_a_file(
    tmp_path):
  sparse, _ = _models.block_sparse_model(
      "lstm", features=8, units=16, block_size=(4, 4), sparsity=0.5)
  quantized = tfbs.export.export_tflite(sparse, str(tmp_path / "q"),
                                        sequence_length=5, quantize="dynamic")
  plain = tfbs.export.export_tflite(sparse, str(tmp_path / "f"),
                                    sequence_length=5)
  assert plain["report"]["xnnpack"] is True
  Interpreter(model_path=plain["step"]).allocate_tensors()
  assert quantized["report"]["xnnpack"] is False
  with pytest.raises(RuntimeError, match="XNNPack|delegate"):
    Interpreter(model_path=quantized["step"]).allocate_tensors()


def test_int8_calibrates_the_step_file_on_the_float_models_states(tmp_path):
  sparse, _ = _models.block_sparse_model(
      "lstm", features=8, units=16, block_size=(4, 4), sparsity=0.5)
  rng = np.random.RandomState(6)
  data = [rng.randn(2, 30, 8).astype(np.float32) * 3]
  step_samples, sequence_samples = tflite._calibration(sparse, data, 10)
  assert len(step_samples) == 60 and len(sequence_samples) == 6
  # The states of sample t+1 are what the float step gives after frame t.
  step = tflite.step_function(sparse)
  out = step(**{k: tf.constant(v) for k, v in step_samples[0].items()})
  np.testing.assert_allclose(step_samples[1]["rnn_h"], out["rnn_h"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(step_samples[0]["rnn_c"], 0)
  # The cell state's samples are clipped at its 90th percentile of |c|.
  c = np.concatenate([s["rnn_c"] for s in step_samples])
  assert np.abs(c).max() <= np.percentile(
      np.abs(_unclipped_cell_states(sparse, data)), 90) + 1e-6
  np.testing.assert_array_equal(sequence_samples[1]["frames"],
                                data[0][:1, 10:20])


def _unclipped_cell_states(model, data):
  step = tflite.step_function(model)
  values = []
  for row in data[0]:
    h = c = tf.zeros([1, 16])
    for frame in row:
      values.append(c.numpy())
      out = step(frames=tf.constant(frame[None]), rnn_h=h, rnn_c=c)
      h, c = out["rnn_h"], out["rnn_c"]
  return np.concatenate(values)


def test_quantize_arguments_are_checked(tmp_path):
  sparse, _ = _models.block_sparse_model("lstm", features=8, units=16)
  path = str(tmp_path / "m")
  with pytest.raises(ValueError, match="quantize must be one of"):
    tfbs.export.export_tflite(sparse, path, quantize="int4")
  with pytest.raises(ValueError, match="needs representative_dataset"):
    tfbs.export.export_tflite(sparse, path, quantize="int8")
  with pytest.raises(ValueError, match="only with quantize='int8'"):
    tfbs.export.export_tflite(sparse, path, quantize="dynamic",
                              representative_dataset=[np.zeros([1, 5, 8])])
  with pytest.raises(ValueError, match=r"\[batch, time, 8\]"):
    tfbs.export.export_tflite(sparse, path, quantize="int8",
                              representative_dataset=[np.zeros([1, 5, 7])])
  with pytest.raises(ValueError, match="fewer than one sequence_length"):
    tfbs.export.export_tflite(sparse, path, quantize="int8", sequence_length=50,
                              representative_dataset=[np.zeros([1, 5, 8])])
