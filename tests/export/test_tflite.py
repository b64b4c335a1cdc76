"""Tests of `tf_blocksparse.export.export_tflite` in the LiteRT interpreter."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from ai_edge_litert.interpreter import Interpreter

import tf_blocksparse as tfbs
from tests.export import _models

STEPS = 50


def _run_sequence(path, x):
  runner = Interpreter(model_path=path).get_signature_runner("sequence")
  return runner(frames=x)["logits"]


def _run_steps(path, model, x):
  runner = Interpreter(model_path=path).get_signature_runner("step")
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
