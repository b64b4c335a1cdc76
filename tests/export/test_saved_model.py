"""Tests of `tf_blocksparse.export.export_saved_model`."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.core.protobuf import saved_model_pb2

import tf_blocksparse as tfbs
from tests.export import _models

MODES = ["portable", "custom_op"]


def _graph_op_types(path):
  """Every op type in the saved graph and its function library."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  types = set()
  for meta in proto.meta_graphs:
    types |= {n.op for n in meta.graph_def.node}
    for fn in meta.graph_def.library.function:
      types |= {n.op for n in fn.node_def}
  return types


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def _run_python(code, *args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                        capture_output=True, text=True, env=env, timeout=120,
                        check=False)


@pytest.fixture(scope="module")
def lstm_models():
  return _models.block_sparse_model("lstm", features=8, units=16)


def test_portable_export_runs_in_a_process_without_tf_blocksparse(
    tmp_path, lstm_models):
  sparse, dense = lstm_models
  path = str(tmp_path / "portable")
  names = tfbs.export.export_saved_model(sparse, path)
  assert names == ["serving_default", "step"]
  x = np.random.RandomState(1).randn(3, 7, 8).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  types = sorted(_graph_op_types(path))
  assert not [t for t in types if t.lower().startswith("tfbs")]
  result = _run_python("""
      import sys, json, numpy as np, tensorflow as tf
      from tensorflow.python.framework import op_def_registry
      path, x_path, types = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
      unknown = [t for t in types if op_def_registry.get(t) is None]
      loaded = tf.saved_model.load(path)
      out = loaded.signatures["serving_default"](frames=tf.constant(np.load(x_path)))
      np.save(x_path + ".out.npy", out["logits"].numpy())
      print(json.dumps({"unknown": unknown,
                        "tfbs": "tf_blocksparse" in sys.modules}))
      """, path, str(tmp_path / "x.npy"), ",".join(types))
  assert result.returncode == 0, result.stderr[-3000:]
  report = result.stdout.strip().splitlines()[-1]
  assert report == '{"unknown": [], "tfbs": false}'
  got = np.load(str(tmp_path / "x.npy") + ".out.npy")
  # Against the dense tf_keras model the block-sparse one was converted from.
  np.testing.assert_allclose(got, dense(x).numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, sparse(x).numpy(), rtol=1e-5, atol=1e-6)


def test_custom_op_export_uses_the_fused_ops(tmp_path, lstm_models):
  sparse, dense = lstm_models
  path = str(tmp_path / "fused")
  tfbs.export.export_saved_model(sparse, path, mode="custom_op")
  types = _graph_op_types(path)
  assert "TfbsBsrLstmSequence" in types
  loaded = tfbs.export.load_saved_model(path)
  x = np.random.RandomState(2).randn(2, 5, 8).astype(np.float32)
  out = loaded.signatures["serving_default"](frames=tf.constant(x))
  assert sorted(out) == ["logits"]
  np.testing.assert_allclose(out["logits"], dense(x), rtol=1e-5, atol=1e-6)


def test_custom_op_export_loads_with_load_op_library_only(tmp_path,
                                                         lstm_models):
  sparse, dense = lstm_models
  path = str(tmp_path / "fused")
  tfbs.export.export_saved_model(sparse, path, mode="custom_op")
  x = np.random.RandomState(3).randn(2, 4, 8).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  result = _run_python("""
      import sys, numpy as np, tensorflow as tf
      tf.load_op_library(sys.argv[3])
      loaded = tf.saved_model.load(sys.argv[1])
      out = loaded.signatures["serving_default"](frames=tf.constant(np.load(sys.argv[2])))
      np.save(sys.argv[2] + ".out.npy", out["logits"].numpy())
      assert "tf_blocksparse" not in sys.modules
      """, path, str(tmp_path / "x.npy"), tfbs.export.custom_op_library_path())
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_allclose(np.load(str(tmp_path / "x.npy") + ".out.npy"),
                             dense(x).numpy(), rtol=1e-5, atol=1e-6)


def test_sparse_variables_are_at_most_a_fifth_of_the_dense_export(tmp_path):
  sparse, dense = _models.block_sparse_model(
      "lstm", features=64, units=128, outputs=32, sparsity=0.9)
  tfbs.export.export_saved_model(sparse, str(tmp_path / "sparse"))
  tfbs.export.export_saved_model(dense, str(tmp_path / "dense"),
                                 block_sparse=False)
  sparse_bytes = _dir_bytes(str(tmp_path / "sparse" / "variables"))
  dense_bytes = _dir_bytes(str(tmp_path / "dense" / "variables"))
  # The dense export holds every float of the model.
  n_floats = sum(int(np.prod(w.shape)) for w in dense.weights)
  assert dense_bytes >= 4 * n_floats
  assert sparse_bytes <= 0.2 * dense_bytes, (sparse_bytes, dense_bytes)
  # The same pruned (stripped) tf_keras model exported as it is: the export
  # converts it, stores it as small as the converted model's, and computes
  # what it computes.
  written = tfbs.export.export_saved_model(dense, str(tmp_path / "auto"))
  assert written.conversion == {"converted": ["rnn", "logits"], "note": None}
  auto_bytes = _dir_bytes(str(tmp_path / "auto" / "variables"))
  assert auto_bytes <= 1.05 * sparse_bytes, (auto_bytes, sparse_bytes)
  x = np.random.RandomState(2).randn(2, 5, 64).astype(np.float32)
  served = tf.saved_model.load(str(tmp_path / "auto")).signatures[
      "serving_default"](frames=tf.constant(x))["logits"]
  np.testing.assert_allclose(served, dense(x), rtol=1e-4, atol=1e-5)


def test_a_still_wrapped_pruned_model_exports_its_masked_weights_sparse(tmp_path):
  model = tf_keras.Sequential([tf_keras.Input((None, 8), name="frames"),
                               tf_keras.layers.LSTM(16, return_sequences=True,
                                                    name="rnn"),
                               tf_keras.layers.Dense(4, name="logits")])
  pruned = tfbs.prune_block_low_magnitude(model, block_size=(4, 4))
  rng = np.random.default_rng(1)
  stripped = tf_keras.Sequential([tf_keras.Input((None, 8)),
                                  tf_keras.layers.LSTM(16, return_sequences=True),
                                  tf_keras.layers.Dense(4)])
  for layer, wrapped in zip(stripped.layers, pruned.layers):
    masked = {}
    for weight, mask, *_ in wrapped.pruning_vars:
      k, n = mask.shape
      keep = rng.random([k // 4, n // 4]) > 0.8
      mask.assign(np.kron(keep, np.ones([4, 4])).astype(mask.dtype.as_numpy_dtype))
      masked[id(weight)] = weight.numpy() * mask.numpy()
    layer.set_weights([masked.get(id(w), w.numpy()) for w in wrapped.layer.weights])
  written = tfbs.export.export_saved_model(pruned, str(tmp_path / "w"))
  assert written.conversion["converted"], written.conversion
  x = np.random.RandomState(3).randn(2, 4, 8).astype(np.float32)
  served = tf.saved_model.load(str(tmp_path / "w")).signatures[
      "serving_default"](frames=tf.constant(x))
  np.testing.assert_allclose(list(served.values())[0], stripped(x),
                             rtol=1e-4, atol=1e-5)


def test_a_model_with_nothing_block_sparse_exports_dense_with_a_note(tmp_path):
  model = tf_keras.Sequential([tf_keras.Input((None, 4), name="frames"),
                               tf_keras.layers.LSTM(4, name="rnn")])
  with pytest.warns(UserWarning, match="no weight has block-structured zeros"):
    written = tfbs.export.export_saved_model(model, str(tmp_path / "a"))
  assert written.conversion["converted"] == []
  assert "exported dense" in written.conversion["note"]
  # On purpose: no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    written = tfbs.export.export_saved_model(model, str(tmp_path / "b"),
                                             block_sparse=False)
  assert written.conversion["converted"] == []
  with pytest.raises(ValueError, match="block_sparse must be 'auto' or False"):
    tfbs.export.export_saved_model(model, str(tmp_path / "c"), block_sparse=True)


def test_existing_path_is_not_overwritten_silently(tmp_path, lstm_models):
  sparse, _ = lstm_models
  path = tmp_path / "model"
  path.mkdir()
  (path / "keep.txt").write_text("previous")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    tfbs.export.export_saved_model(sparse, str(path))
  assert (path / "keep.txt").read_text() == "previous"
  tfbs.export.export_saved_model(sparse, str(path), overwrite=True)
  assert not (path / "keep.txt").exists()
  assert (path / "saved_model.pb").exists()
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tfbs_export_")]
  assert leftovers == []


def test_saved_model_cli_lists_the_signatures(tmp_path, lstm_models):
  sparse, _ = lstm_models
  path = str(tmp_path / "model")
  tfbs.export.export_saved_model(sparse, path)
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  if not os.path.exists(cli):
    cli = "saved_model_cli"
  result = subprocess.run([cli, "show", "--dir", path, "--all"],
                          capture_output=True, text=True, timeout=120,
                          check=False,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  assert "signature_def['serving_default']" in text
  assert "signature_def['step']" in text
  for name in ("inputs['frames']", "outputs['logits']", "inputs['rnn_h']",
               "inputs['rnn_c']", "outputs['rnn_c']"):
    assert name in text, name


def test_bad_arguments_are_reported(tmp_path, lstm_models):
  sparse, _ = lstm_models
  with pytest.raises(ValueError, match="mode must be one of"):
    tfbs.export.export_saved_model(sparse, str(tmp_path / "a"), mode="fast")
  with pytest.raises(TypeError, match="tf_keras.Model"):
    tfbs.export.export_saved_model(object(), str(tmp_path / "b"))
  bidirectional = tf_keras.Sequential([
      tf_keras.Input((None, 4)),
      tf_keras.layers.Bidirectional(tf_keras.layers.LSTM(4))])
  with pytest.raises(ValueError, match="bidirectional.*not supported"):
    tfbs.export.export_saved_model(bidirectional, str(tmp_path / "c"),
                                   step_signature=True)
  # With "auto" it exports serving_default only, and says why not step.
  with pytest.warns(UserWarning, match="no 'step' signature.*bidirectional"):
    written = tfbs.export.export_saved_model(bidirectional, str(tmp_path / "c"))
  assert written == ["serving_default"]
  assert "bidirectional" in written.skipped["step"]
  assert "not supported" in written.skipped["step"]


# --- the streaming step signature ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_step_signature_matches_running_the_sequence(tmp_path, mode):
  model = _models.streaming_model()
  path = str(tmp_path / mode)
  tfbs.export.export_saved_model(model, path, mode=mode)
  loaded = tfbs.export.load_saved_model(path)
  step = loaded.signatures["step"]
  x = np.random.RandomState(4).randn(2, 6, 6).astype(np.float32)
  expected = model(x).numpy()            # [batch, time, 3], the whole sequence
  states = {n: tf.zeros([2, 8]) for n in ("lstm_h", "lstm_c", "gru_h")}
  for t in range(x.shape[1]):
    out = step(frames=tf.constant(x[:, t]), **states)
    np.testing.assert_allclose(out["logits"], expected[:, t], rtol=1e-5,
                               atol=1e-6)
    states = {n: out[n] for n in states}
  # The final LSTM state is the dense tf_keras LSTM's on the same weights.
  lstm = model.get_layer("lstm")
  ref = tf_keras.layers.LSTM(8, return_state=True)
  ref.build((None, None, 6))
  ref.set_weights([lstm.cell.dense_kernel().numpy(),
                   lstm.cell.dense_recurrent_kernel().numpy(),
                   lstm.cell.bias.numpy()])
  _, h, c = ref(x)
  np.testing.assert_allclose(states["lstm_h"], h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(states["lstm_c"], c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rnn", ["simple", "gru"])
def test_step_signature_of_stock_keras_layers(tmp_path, rnn):
  model = _models.pruned_dense_model(rnn, features=5, units=6,
                                     return_sequences=True, sparsity=0.5)
  path = str(tmp_path / rnn)
  tfbs.export.export_saved_model(model, path)
  step = tf.saved_model.load(path).signatures["step"]
  x = np.random.RandomState(5).randn(2, 4, 5).astype(np.float32)
  expected = model(x).numpy()
  h = tf.zeros([2, 6])
  for t in range(4):
    out = step(frames=tf.constant(x[:, t]), rnn_h=h)
    np.testing.assert_allclose(out["logits"], expected[:, t], rtol=1e-5,
                               atol=1e-6)
    h = out["rnn_h"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rnn", ["block_sparse", "stock"])
def test_masked_model_streams_its_real_frames(tmp_path, mode, rnn):
  # Masking -> LSTM(return_sequences) -> Dense, the second sequence padded
  # after 3 of 5 frames. serving_default takes the whole padded batch; the
  # step signature, fed the real frames only, gives the model's outputs at
  # those frames.
  if rnn == "block_sparse":
    layer = tfbs.layers.BlockSparseLSTM(8, block_size=4, density=0.5,
                                        return_sequences=True, name="lstm")
  else:
    layer = tf_keras.layers.LSTM(8, return_sequences=True, name="lstm")
  model = tf_keras.Sequential([
      tf_keras.Input((None, 6), name="frames"),
      tf_keras.layers.Masking(0.0),
      layer,
      tf_keras.layers.Dense(3, name="logits")])
  x = np.random.RandomState(7).randn(2, 5, 6).astype(np.float32)
  x[1, 3:] = 0.0
  expected = model(x).numpy()
  path = str(tmp_path / f"{rnn}_{mode}")
  written = tfbs.export.export_saved_model(model, path, mode=mode,
                                           step_signature=True)
  assert written == ["serving_default", "step"] and written.skipped == {}
  loaded = tfbs.export.load_saved_model(path)
  served = loaded.signatures["serving_default"](frames=tf.constant(x))["logits"]
  np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
  step = loaded.signatures["step"]
  for b, length in ((0, 5), (1, 3)):
    states = {"lstm_h": tf.zeros([1, 8]), "lstm_c": tf.zeros([1, 8])}
    for t in range(length):
      out = step(frames=tf.constant(x[b:b + 1, t]), **states)
      np.testing.assert_allclose(out["logits"][0], expected[b, t], rtol=1e-5,
                                 atol=1e-6, err_msg=f"sequence {b} frame {t}")
      states = {n: out[n] for n in states}


def test_tflite_refuses_a_masked_model_with_the_reason(tmp_path):
  model = tf_keras.Sequential([
      tf_keras.Input((None, 4), name="frames"),
      tf_keras.layers.Masking(0.0),
      tf_keras.layers.LSTM(4, return_sequences=True)])
  with pytest.raises(ValueError, match="Masking.*masked frames"):
    tfbs.export.export_tflite(model, str(tmp_path / "m"))


# --- damaged exports -------------------------------------------------------------


def _bsr_variable(loaded, suffix):
  found = [v for v in loaded.model_variables if v.name.endswith(suffix + ":0")]
  assert found, [v.name for v in loaded.model_variables]
  return found[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,bad,message", [
    ("recurrent_kernel_col_indices", lambda v: v + 1000, "col_indices"),
    ("recurrent_kernel_row_ptr", lambda v: v[::-1], "row_ptr"),
    ("kernel_col_indices", lambda v: -v - 1, "col_indices"),
])
def test_tampered_bsr_structure_fails_at_call(tmp_path, lstm_models, mode,
                                              target, bad, message):
  sparse, _ = lstm_models
  path = str(tmp_path / "model")
  tfbs.export.export_saved_model(sparse, path, mode=mode)
  loaded = tfbs.export.load_saved_model(path)
  var = _bsr_variable(loaded, "rnn/cell/" + target)
  var.assign(bad(var.numpy()))
  x = tf.constant(np.ones([1, 3, 8], np.float32))
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    loaded.signatures["serving_default"](frames=x)


def _data_file(path):
  folder = os.path.join(path, "variables")
  (name,) = [f for f in os.listdir(folder) if f.startswith("variables.data")]
  return os.path.join(folder, name)


@pytest.mark.parametrize("mode", MODES)
def test_truncated_variables_fail_at_load(tmp_path, lstm_models, mode):
  sparse, _ = lstm_models
  path = str(tmp_path / "model")
  tfbs.export.export_saved_model(sparse, path, mode=mode)
  data = _data_file(path)
  with open(data, "rb") as f:
    content = f.read()
  with open(data, "wb") as f:
    f.write(content[: len(content) // 2])
  with pytest.raises(ValueError, match="damaged or incomplete"):
    tfbs.export.load_saved_model(path)
  _assert_stock_load_raises(path, mode)


def _assert_stock_load_raises(path, mode):
  """Plain tf.saved_model.load raises a Python exception (no crash)."""
  result = _run_python("""
      import sys, tensorflow as tf
      if sys.argv[2] == "custom_op":
        tf.load_op_library(sys.argv[3])
      try:
        tf.saved_model.load(sys.argv[1])
      except Exception as e:
        print("raised", type(e).__name__)
      """, path, mode, tfbs.export.custom_op_library_path())
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("raised"), result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_rewritten_col_indices_bytes_fail_at_load(tmp_path, lstm_models, mode):
  sparse, _ = lstm_models
  path = str(tmp_path / "model")
  tfbs.export.export_saved_model(sparse, path, mode=mode)
  layer = sparse.get_layer("rnn")
  cols = np.asarray(layer.cell.recurrent_kernel.col_indices).astype("<i4")
  data = _data_file(path)
  with open(data, "rb") as f:
    content = f.read()
  start = content.find(cols.tobytes())
  assert start >= 0
  tampered = (cols + 1000).astype("<i4").tobytes()
  with open(data, "wb") as f:
    f.write(content[:start] + tampered + content[start + len(tampered):])
  # The checkpoint's checksums catch the edit before any op sees the values.
  with pytest.raises(ValueError, match="(?i)damaged.*checksum"):
    tfbs.export.load_saved_model(path)
  _assert_stock_load_raises(path, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("component,tamper,message", [
    ("col_indices", lambda v: v + 1000, "col_indices"),
    ("row_ptr", lambda v: v[::-1].copy(), "row_ptr"),
])
def test_rewritten_bsr_files_load_then_fail_at_call(tmp_path, lstm_models,
                                                    mode, component, tamper,
                                                    message):
  sparse, _ = lstm_models
  path = str(tmp_path / "model")
  tfbs.export.export_saved_model(sparse, path, mode=mode)
  weight = sparse.get_layer("rnn").cell.recurrent_kernel
  _models.rewrite_checkpoint(path, np.asarray(getattr(weight, component)),
                            tamper)
  loaded = tfbs.export.load_saved_model(path)
  x = tf.constant(np.ones([1, 3, 8], np.float32))
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    loaded.signatures["serving_default"](frames=x)
  if mode == "portable":
    # Stock TensorFlow alone reports it too (the Assert ops in the graph).
    result = _run_python("""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load(sys.argv[1])
        try:
          loaded.signatures["serving_default"](frames=tf.ones([1, 3, 8]))
        except tf.errors.InvalidArgumentError as e:
          print("InvalidArgumentError", " ".join(e.message.split()))
        """, path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("InvalidArgumentError"), result.stdout
    assert message in result.stdout
