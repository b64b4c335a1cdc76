"""Exports served by TensorFlow's C++ SavedModel loader, as TF Serving does.

`saved_model_runner.cc` is built against the installed TensorFlow wheel (its
headers and `libtensorflow_cc`/`libtensorflow_framework`), loads an export
with `tensorflow::LoadSavedModel` and runs a signature; the results must be
Python's. A TF Serving client's `PredictRequest` is decoded into the runner's
inputs, and its outputs into a `PredictResponse`, as the model server does.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import tf_blocksparse as tfbs
from tests.export import _models

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "saved_model_runner.cc")
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32",
           np.dtype(np.int64): "int64"}


def _compiler():
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
  """The runner binary, built once for this module."""
  cxx = _compiler()
  if cxx is None:
    pytest.skip("no C++ compiler (g++/c++ or $CXX) to build the C++ loader")
  lib_dir = tf.sysconfig.get_lib()
  binary = str(tmp_path_factory.mktemp("runner") / "saved_model_runner")
  # Without --no-as-needed the linker drops libtensorflow_cc (main calls
  # nothing in it directly), and with it the registration of the direct
  # session factory: LoadSavedModel then fails with "No session factory".
  command = [cxx, "-O1", "-w", *tf.sysconfig.get_compile_flags(), _SOURCE,
             "-o", binary, f"-L{lib_dir}", "-Wl,--no-as-needed",
             "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2",
             f"-Wl,-rpath,{lib_dir}"]
  built = subprocess.run(command, capture_output=True, text=True, check=False,
                         timeout=600)
  assert built.returncode == 0, built.stderr[-4000:]
  return binary


def _run(runner, path, signature, inputs, io_dir, op_library=None):
  """Runs `signature` of the export at `path` in the C++ runner.

  Returns (exit code, {output key: array}, stderr).
  """
  os.makedirs(io_dir, exist_ok=True)
  with open(os.path.join(io_dir, "inputs.txt"), "w") as manifest:
    for key, value in inputs.items():
      value = np.ascontiguousarray(value)
      manifest.write(" ".join([key, _DTYPES[value.dtype], str(value.ndim),
                               *map(str, value.shape)]) + "\n")
      value.astype(value.dtype.newbyteorder("<")).tofile(
          os.path.join(io_dir, key + ".bin"))
  args = [runner, path, signature, io_dir] + ([op_library] if op_library else [])
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  result = subprocess.run(args, capture_output=True, text=True, env=env,
                          check=False, timeout=300)
  outputs = {}
  if result.returncode == 0:
    with open(os.path.join(io_dir, "outputs.txt")) as manifest:
      for line in manifest:
        key, dtype, rank, *dims = line.split()
        assert len(dims) == int(rank)
        outputs[key] = np.fromfile(
            os.path.join(io_dir, key + ".out.bin"),
            np.dtype(dtype).newbyteorder("<")).reshape([int(d) for d in dims])
  return result.returncode, outputs, result.stderr


def _assert_close(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], np.asarray(value), rtol=1e-5,
                               atol=1e-6, err_msg=key)


def _python_outputs(path, signature, inputs):
  function = tfbs.export.load_saved_model(path).signatures[signature]
  return {k: v.numpy() for k, v in
          function(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _step_inputs(seed):
  rng = np.random.RandomState(seed)
  return {"frames": rng.randn(2, 6).astype(np.float32),
          **{n: rng.randn(2, 8).astype(np.float32) * 0.5
             for n in ("lstm_h", "lstm_c", "gru_h")}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """The streaming LSTM -> GRU -> Dense model exported in both modes."""
  model = _models.streaming_model()
  paths = {}
  for mode in ("portable", "custom_op"):
    paths[mode] = str(tmp_path_factory.mktemp("exports") / mode)
    tfbs.export.export_saved_model(model, paths[mode], mode=mode)
  return model, paths


def test_portable_export_runs_both_signatures_in_the_cpp_loader(
    runner, exports, tmp_path):
  model, paths = exports
  x = np.random.RandomState(0).randn(3, 5, 6).astype(np.float32)
  code, out, stderr = _run(runner, paths["portable"], "serving_default",
                           {"frames": x}, str(tmp_path / "serve"))
  assert code == 0, stderr[-3000:]
  _assert_close(out, {"logits": model(x)})
  step = _step_inputs(1)
  code, out, stderr = _run(runner, paths["portable"], "step", step,
                           str(tmp_path / "step"))
  assert code == 0, stderr[-3000:]
  _assert_close(out, _python_outputs(paths["portable"], "step", step))


def test_custom_op_export_runs_with_the_library_from_tf_load_library(
    runner, exports, tmp_path):
  model, paths = exports
  x = np.random.RandomState(2).randn(2, 4, 6).astype(np.float32)
  library = tfbs.export.custom_op_library_path()
  code, out, stderr = _run(runner, paths["custom_op"], "serving_default",
                           {"frames": x}, str(tmp_path / "serve"), library)
  assert code == 0, stderr[-3000:]
  _assert_close(out, {"logits": model(x)})
  step = _step_inputs(3)
  code, out, stderr = _run(runner, paths["custom_op"], "step", step,
                           str(tmp_path / "step"), library)
  assert code == 0, stderr[-3000:]
  _assert_close(out, _python_outputs(paths["portable"], "step", step))
  # Without the library the first run names the missing op (no crash).
  code, _, stderr = _run(runner, paths["custom_op"], "serving_default",
                         {"frames": x}, str(tmp_path / "bare"))
  assert code == 3, stderr[-3000:]
  assert "Tfbs" in stderr and "not registered" in stderr, stderr[-3000:]


@pytest.mark.parametrize("mode", ["portable", "custom_op"])
def test_tampered_export_fails_in_the_cpp_loader_with_the_reason(
    runner, tmp_path, mode):
  model, _ = _models.block_sparse_model("lstm", features=8, units=16)
  path = str(tmp_path / mode)
  tfbs.export.export_saved_model(model, path, mode=mode)
  weight = model.get_layer("rnn").cell.recurrent_kernel
  _models.rewrite_checkpoint(path, np.asarray(weight.col_indices),
                             lambda v: v + 1000)
  library = tfbs.export.custom_op_library_path() if mode == "custom_op" else None
  code, _, stderr = _run(runner, path, "serving_default",
                         {"frames": np.ones([1, 3, 8], np.float32)},
                         str(tmp_path / "io"), library)
  assert code == 3, stderr[-3000:]
  assert "INVALID_ARGUMENT" in stderr and "col_indices" in stderr, stderr[-3000:]


def _signature_def(path, name):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  (meta,) = proto.meta_graphs
  return meta.signature_def[name]


def test_a_tf_serving_predict_request_is_answered_through_the_cpp_loader(
    runner, exports, tmp_path):
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
  _, paths = exports
  step = _step_inputs(5)
  # What a client sends to the model server for the `step` signature.
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "char_lm"
  request.model_spec.signature_name = "step"
  for key, value in step.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
  # The server checks the request against the signature, then runs it.
  signature = _signature_def(paths["portable"], request.model_spec.signature_name)
  assert set(request.inputs) == set(signature.inputs)
  for key, tensor in request.inputs.items():
    assert tensor.dtype == signature.inputs[key].dtype, key
    expected_dims = [d.size for d in signature.inputs[key].tensor_shape.dim]
    got_dims = [d.size for d in tensor.tensor_shape.dim]
    assert len(got_dims) == len(expected_dims), key
    assert all(e in (-1, g) for e, g in zip(expected_dims, got_dims)), key
  feeds = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
  code, out, stderr = _run(runner, paths["portable"],
                           request.model_spec.signature_name, feeds,
                           str(tmp_path / "io"))
  assert code == 0, stderr[-3000:]
  response = predict_pb2.PredictResponse()
  response.model_spec.CopyFrom(request.model_spec)
  for key, value in out.items():
    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
  assert set(response.outputs) == set(signature.outputs)
  _assert_close({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                _python_outputs(paths["portable"], "step", step))
