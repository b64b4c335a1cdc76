"""The node-name compaction of exported SavedModels (export/compaction.py)."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import function_def_to_graph
from tf_blocksparse.export import compaction


def _function_def(fn, *specs):
  concrete = tf.function(fn, autograph=False).get_concrete_function(*specs)
  return concrete.function_def


def _run(fdef, *args):
  """Runs a FunctionDef imported into a fresh graph (no capture needed)."""
  graph = function_def_to_graph.function_def_to_graph(fdef)
  with tf.compat.v1.Session(graph=graph) as sess:
    return sess.run(graph.outputs,
                    {t.name: a for t, a in zip(graph.inputs, args)})


def _references_resolve(fdef):
  known = {a.name for a in fdef.signature.input_arg}
  known |= {n.name for n in fdef.node_def}
  refs = [r.lstrip("^").split(":")[0] for n in fdef.node_def for r in n.input]
  refs += [r.split(":")[0] for r in fdef.ret.values()]
  refs += list(fdef.control_ret.values())
  return all(r in known for r in refs)


def test_compacted_function_computes_the_same_values():
  def fn(x, y):
    # x[i] traces three constants each; shape(x) twice: both get merged.
    a = x[0] * x[1] + tf.cast(tf.shape(x)[0], tf.float32)
    b = tf.reduce_sum(y) + tf.cast(tf.shape(x)[0], tf.float32)
    with tf.control_dependencies([tf.debugging.Assert(
        tf.reduce_all(y > 0), ["positive"])]):
      c = tf.identity(a + b + tf.constant(1.0))
    return c, tf.constant(1.0) * b

  specs = (tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32))
  fdef = _function_def(fn, *specs)
  before = len(fdef.node_def)
  x, y = np.array([2., 3., 5.], np.float32), np.array([1., 4.], np.float32)
  expected = _run(fdef, x, y)
  np.testing.assert_allclose(expected, [2 * 3 + 3 + 5 + 3 + 1, 5 + 3])
  compaction.compact_function(fdef)
  assert len(fdef.node_def) < before
  assert all(re.fullmatch(r"n[0-9a-z]+", n.name) for n in fdef.node_def)
  assert all(re.fullmatch(r"a[0-9a-z]+", a.name)
             for a in fdef.signature.input_arg)
  assert _references_resolve(fdef)
  got = _run(fdef, x, y)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e)
  # The assertion is kept and still guards the result.
  with pytest.raises(tf.errors.InvalidArgumentError):
    _run(fdef, x, -y)


def test_constants_under_different_control_inputs_stay_apart():
  def fn(x):
    one = tf.constant(1.0) * x
    with tf.control_dependencies([tf.debugging.Assert(
        tf.reduce_all(x > 0), ["positive"])]):
      two = tf.constant(1.0) + x
    return one + two

  fdef = _function_def(fn, tf.TensorSpec([None], tf.float32))
  compaction.compact_function(fdef)
  ones = [n for n in fdef.node_def
          if n.op == "Const" and n.attr["value"].tensor.float_val == [1.0]]
  assert sorted(len(n.input) for n in ones) == [0, 1]
  np.testing.assert_allclose(_run(fdef, np.array([2.], np.float32))[0], [5.])


def _sparse_lstm_model():
  tf_keras.utils.set_random_seed(0)
  model = tf_keras.Sequential([
      tf_keras.Input((None, 10), name="chars"),
      tfbs.layers.BlockSparseLSTM(8, block_size=(4, 4), density=0.5,
                                  return_sequences=True, name="rnn"),
      tf_keras.layers.Dense(10, name="logits")])
  return model


def test_export_is_compacted_loads_and_matches(tmp_path):
  model = _sparse_lstm_model()
  path = str(tmp_path / "m")
  tfbs.export.export_saved_model(model, path)
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  functions = saved.meta_graphs[0].graph_def.library.function
  assert functions
  for fdef in functions:
    assert all(re.fullmatch(r"n[0-9a-z]+", n.name) for n in fdef.node_def)
    assert _references_resolve(fdef)
  x = tf.one_hot(np.random.RandomState(1).randint(0, 10, (3, 6)), 10)
  loaded = tf.saved_model.load(path)
  got = loaded.signatures["serving_default"](chars=x)
  np.testing.assert_allclose(next(iter(got.values())).numpy(),
                             model(x).numpy(), rtol=1e-5, atol=1e-6)
  # The fingerprint was recomputed for the rewritten file (its checksum and
  # graph hash; the rest holds a fresh uuid).
  from tensorflow.core.protobuf import fingerprint_pb2
  from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
  fresh = fingerprint_pb2.FingerprintDef.FromString(
      fingerprinting.CreateFingerprintDef(path))
  stored = tf.saved_model.experimental.read_fingerprint(path)
  assert stored.saved_model_checksum == fresh.saved_model_checksum
  assert stored.graph_def_program_hash == fresh.graph_def_program_hash


def test_compaction_shrinks_the_graph(tmp_path):
  model = _sparse_lstm_model()
  path = str(tmp_path / "m")
  tfbs.export.export_saved_model(model, path)
  # Exported again uncompacted (the same functions, as tf.saved_model.save
  # writes them): compaction must have made it smaller.
  size = os.path.getsize(os.path.join(path, "saved_model.pb"))
  raw = str(tmp_path / "raw")
  original = compaction.compact_saved_model
  try:
    compaction.compact_saved_model = lambda export_dir: None
    tfbs.export.export_saved_model(model, raw)
  finally:
    compaction.compact_saved_model = original
  assert size < 0.8 * os.path.getsize(os.path.join(raw, "saved_model.pb"))
