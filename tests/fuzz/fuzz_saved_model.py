"""SavedModel mutations, for both export modes ("portable", "custom_op").

`prepare(base)` exports one small block-sparse model (LSTM, then a dense
layer: both the fused sequence op and the matmul) in each mode, with a fixed
input and the model's output on it. `run_mutation(base, seed)` copies one
export, applies one mutation and loads and calls it in this process (the
driver runs it in a subprocess, so a crash is caught and the seed saved):

  flip       1-4 random bytes of saved_model.pb changed
  truncate   saved_model.pb cut short
  constant   one integer constant of the graph or its functions rewritten;
             for a `Tfbs*` op's dense_shape input always to an invalid value
             (negative or beyond the int32 block grid)
  index      a col_indices or row_ptr variable of the checkpoint rewritten
             to an invalid layout (out of range, wrapping, decreasing,
             shorter)

Outcomes: load_error (any exception while loading), rejected (an error on
the call), ok (same output), changed (another output: legitimate for a
rewritten graph), silent (a layout or dense shape that the contract calls
invalid was used without an error: a finding).

  python tests/fuzz/fuzz_saved_model.py prepare DIR
"""

import os
import shutil
import sys
import tempfile

import numpy as np

MODES = ("portable", "custom_op")
_INVALID_DIMS = [-1, -2**31, 2**31, 2**40, 2**63 - 1]


def prepare(base):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_keras  # pylint: disable=import-outside-toplevel
  import tf_blocksparse as tfbs  # pylint: disable=import-outside-toplevel
  tf_keras.utils.set_random_seed(3)
  model = tf_keras.Sequential([
      tf_keras.Input((None, 6), name="frames"),
      tfbs.layers.BlockSparseLSTM(8, block_size=(4, 4), density=0.5,
                                  bias_initializer="random_normal", name="lstm"),
      tfbs.layers.BlockSparseDense(5, block_size=(4, 2), density=0.5, name="logits"),
  ])
  x = np.random.default_rng(0).standard_normal([2, 5, 6]).astype(np.float32)
  np.save(os.path.join(base, "input.npy"), x)
  np.save(os.path.join(base, "output.npy"), model(x).numpy())
  for mode in MODES:
    tfbs.export.export_saved_model(model, os.path.join(base, mode), mode=mode,
                                   step_signature=False)


def _load_and_call(path, mode, x):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_blocksparse as tfbs  # pylint: disable=import-outside-toplevel
  loaded = (tfbs.export.load_saved_model(path) if mode == "custom_op"
            else tf.saved_model.load(path))
  fn = loaded.signatures["serving_default"]
  return fn, lambda: list(fn(frames=tf.constant(x)).values())[0].numpy()


def _flip(rng, pb):
  data = bytearray(pb)
  for _ in range(int(rng.integers(1, 5))):
    data[rng.integers(len(data))] = int(rng.integers(256))
  return bytes(data)


def _graph_nodes(saved_model):
  graph = saved_model.meta_graphs[0].graph_def
  nodes = list(graph.node)
  for fn in graph.library.function:
    nodes.extend(fn.node_def)
  return nodes


def _constant(rng, pb):
  """Rewrites one integer constant; returns (bytes, invalid_by_contract)."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  sm = saved_model_pb2.SavedModel()
  sm.ParseFromString(pb)
  nodes = _graph_nodes(sm)
  consts = {n.name: n for n in nodes if n.op == "Const" and
            n.attr["dtype"].type in (tf.int32.as_datatype_enum, tf.int64.as_datatype_enum)}
  # The dense_shape inputs of the compiled ops (custom_op mode).
  shape_inputs = set()
  for n in nodes:
    if n.op.startswith("Tfbs") and n.input:
      name = n.input[-1].split(":")[0].lstrip("^")
      if name in consts:
        shape_inputs.add(name)
  if shape_inputs and rng.random() < 0.6:
    name = sorted(shape_inputs)[int(rng.integers(len(shape_inputs)))]
    invalid = True
  elif consts:
    name = sorted(consts)[int(rng.integers(len(consts)))]
    invalid = False
  else:
    return _flip(rng, pb), False
  node = consts[name]
  value = tf.make_ndarray(node.attr["value"].tensor).copy()
  flat = value.reshape(-1)
  if flat.size == 0:
    return pb, False
  i = int(rng.integers(flat.size))
  if invalid:
    flat[i] = _INVALID_DIMS[int(rng.integers(len(_INVALID_DIMS)))]
  else:
    info = np.iinfo(flat.dtype)
    flat[i] = rng.choice([info.min, -1, 0, 1, info.max, int(flat[i]) + 1,
                          int(flat[i]) - 1, 2**31 - 1 if info.bits == 64 else 7])
  node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
  return sm.SerializeToString(), invalid


def _index(rng, path):
  """Rewrites one index variable of the checkpoint to an invalid layout."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  prefix = os.path.join(path, "variables", "variables")
  reader = tf.train.load_checkpoint(prefix)
  keys = sorted(reader.get_variable_to_dtype_map())
  names = _variable_names(reader)
  index_keys = sorted(k for k, name in names.items()
                      if "col_indices" in name or "row_ptr" in name)
  if not index_keys:
    raise RuntimeError(f"no index variables among {sorted(names.values())}")
  key = index_keys[int(rng.integers(len(index_keys)))]
  name = names[key]
  value = reader.get_tensor(key).copy()
  what = int(rng.integers(5))
  if "col_indices" in name:
    if value.size == 0 or what == 4:
      value = np.append(value, [0]).astype(np.int32)  # one more than blocks
    elif what in (0, 1):
      value[rng.integers(value.size)] = rng.choice([-1, 2**31 - 1, -2**31, 1000])
    else:  # out of order within a row (or a duplicate)
      if value.size > 1:
        value[1:] = value[:-1].copy()
      else:
        value[0] = -1
  else:
    if what == 0:
      value[0] = 1
    elif what == 1 and value.size >= 3:
      value[1], value[2] = 2**31 - 1, -2**31 + 1
    elif what == 2:
      value = value[:-1]
    elif what == 3:
      value[-1] = value[-1] + 1
    else:
      value = value[::-1].copy()
      value[0] = 0 if value[0] != 0 else value[0]
      if np.all(np.diff(value.astype(np.int64)) >= 0):
        value[-1] = -1
  tensors = {k: reader.get_tensor(k) for k in keys}
  tensors[key] = value
  names = list(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[k]) for k in names])
  return name


def _variable_names(reader):
  """{checkpoint key: variable name} from the checkpoint's object graph."""
  from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=import-outside-toplevel
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  return {a.checkpoint_key: a.full_name for node in graph.nodes
          for a in node.attributes if a.name == "VARIABLE_VALUE"}


def run_mutation(base, seed):
  """One mutation of one mode; returns a list of result records."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([104729, seed])
  mode = MODES[seed % 2]
  kind = ("flip", "truncate", "constant", "index")[(seed // 2) % 4]
  x = np.load(os.path.join(base, "input.npy"))
  want = np.load(os.path.join(base, "output.npy"))
  work = tempfile.mkdtemp(prefix="tfbs_sm_")
  path = os.path.join(work, mode)
  shutil.copytree(os.path.join(base, mode), path)
  pb_path = os.path.join(path, "saved_model.pb")
  invalid = False
  detail = ""
  try:
    with open(pb_path, "rb") as f:
      pb = f.read()
    if kind == "flip":
      pb = _flip(rng, pb)
    elif kind == "truncate":
      pb = pb[:int(rng.integers(len(pb)))]
    elif kind == "constant":
      pb, invalid = _constant(rng, pb)
    if kind != "index":
      with open(pb_path, "wb") as f:
        f.write(pb)
    else:
      detail = _index(rng, path)
      invalid = True
    try:
      _, call = _load_and_call(path, mode, x)
    except Exception as e:  # pylint: disable=broad-except
      return [_record(seed, mode, kind, "load_error", f"{type(e).__name__}: {str(e)[:200]}")]
    try:
      got = call()
    except (tf.errors.OpError, ValueError, TypeError, KeyError) as e:
      return [_record(seed, mode, kind, "rejected", f"{type(e).__name__}: {str(e)[-200:]}")]
    if invalid:
      return [_record(seed, mode, kind, "silent", f"invalid {kind} used: {detail}")]
    same = got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)
    return [_record(seed, mode, kind, "ok" if same else "changed", detail)]
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _record(seed, mode, kind, outcome, detail):
  return {"seed": seed, "op": kind, "path": mode, "outcome": outcome,
          "detail": detail, "mutation": kind, "graph": True}


if __name__ == "__main__":
  if sys.argv[1] == "prepare":
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    sys.path[:0] = [os.environ.get("TFBS_FUZZ_PACKAGE_ROOT", root)]
    os.makedirs(sys.argv[2], exist_ok=True)
    prepare(sys.argv[2])
