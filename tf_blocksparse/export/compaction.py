"""Short node names inside the functions of a written SavedModel.

A traced Keras model names every op after its layer scopes
(`sequential/rnn/bsr_lstm_sequence/strided_slice_4/stack_1`), and every
input of every node repeats such a name: in the `saved_model.pb` of a small
block-sparse model the names are a third of the file, more than the sparse
weights themselves. Inside a `FunctionDef` a node name is local to the
function, and so are its argument names (callers bind arguments and
outputs by position, the argument attributes keep the user's names), so
each function's arguments are renamed `a0`, `a1`, ... and its nodes `n0`,
`n1`, ... in place and the references to them rewritten:
node inputs (`name:output:index` and control inputs `^name`), the returned
tensors, the control returns and colocation attributes (`loc:@name`).
The `_output_shapes` of constants go too (a constant's value holds its
shape, which the loader infers from it), those of unknown rank (no
information) and the tracing-only `_has_manual_control_dependencies`; and identical stateless nodes are
kept once per function, as Grappler's common-subexpression pass would
merge them at load.

The top-level graph (the placeholders the signatures name, the saver's
ops) keeps its names. What is lost is only the layer path in the
`{{node ...}}` part of a run-time error; our own error texts name the
problem without it.
"""

import os

from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _short(i, prefix):
  """`i` in base 36 after `prefix`: n0 ... nz, n10 ..."""
  text = ""
  while True:
    i, r = divmod(i, 36)
    text = _DIGITS[r] + text
    if not i:
      return prefix + text


def compact_function(fdef, entry=True):
  """Renames the arguments and nodes of one `FunctionDef` in place;
  returns it. A function that is not an `entry` (one a loader restores as
  a concrete function: the signatures) loses its arguments' user names,
  which only tracing reads."""
  _merge_duplicates(fdef)
  if not entry:
    for attrs in fdef.arg_attr.values():
      attrs.attr.pop("_user_specified_name", None)
  names = {}
  for i, arg in enumerate(fdef.signature.input_arg):
    names[arg.name] = _short(i, "a")
    arg.name = names[arg.name]
  for i, node in enumerate(fdef.node_def):
    names[node.name] = _short(i, "n")

  for node in fdef.node_def:
    node.name = names[node.name]
    shapes = node.attr.get("_output_shapes")
    # A constant's value says its shape; an unknown rank says nothing.
    if node.op == "Const" or (shapes is not None and all(
        s.unknown_rank for s in shapes.list.shape)):
      node.attr.pop("_output_shapes", None)
    # Read only while tracing the function, never by a loader.
    node.attr.pop("_has_manual_control_dependencies", None)
    if "_class" in node.attr:
      loc = node.attr["_class"].list
      values = [b"loc:@" + names.get(v[5:].decode(), v[5:].decode()).encode()
                if v.startswith(b"loc:@") else v for v in loc.s]
      del loc.s[:]
      loc.s.extend(values)
  _rewrite_references(fdef, names)
  return fdef


def _rewrite_references(fdef, names):
  """Points every reference to a node (inputs `name:out:i` and `^name`,
  returned tensors, control returns) at `names[name]` where renamed; a
  control input that now appears twice is kept once."""
  def ref(text):
    control = text.startswith("^")
    head, sep, tail = text.lstrip("^").partition(":")
    return ("^" if control else "") + names.get(head, head) + sep + tail

  for node in fdef.node_def:
    inputs = [ref(r) for r in node.input]
    inputs = [r for i, r in enumerate(inputs)
              if not r.startswith("^") or r not in inputs[:i]]
    del node.input[:]
    node.input.extend(inputs)
  for key in list(fdef.ret):
    fdef.ret[key] = ref(fdef.ret[key])
  for key in list(fdef.control_ret):
    fdef.control_ret[key] = names.get(fdef.control_ret[key],
                                      fdef.control_ret[key])


# Calls and control flow carry functions of their own: left as they are.
_NOT_MERGED = frozenset({"If", "StatelessIf", "While", "StatelessWhile", "Case",
                         "StatelessCase", "PartitionedCall",
                         "StatefulPartitionedCall"})


def _mergeable(op):
  if op in _NOT_MERGED:
    return False
  op_def = op_def_registry.get(op)
  return op_def is not None and not op_def.is_stateful


def _merge_duplicates(fdef):
  """Keeps one of each set of identical stateless nodes (same op, inputs,
  control inputs and attributes: the same tensors at the same time) and
  points the others' consumers at it, until none is left. Every `x[i]`
  traces three small constants and `tf.shape(x)` is asked for in many
  places, so a function holds dozens of copies; Grappler's common-
  subexpression pass would merge them at load, after they were stored."""
  while True:
    kept, alias = {}, {}
    for node in fdef.node_def:
      if not _mergeable(node.op):
        continue
      attrs = tuple(sorted((k, v.SerializeToString(deterministic=True))
                           for k, v in node.attr.items()
                           if k != "_output_shapes"))
      data = tuple(r for r in node.input if not r.startswith("^"))
      control = tuple(sorted(r for r in node.input if r.startswith("^")))
      key = (node.op, attrs, data, control, node.device)
      if key in kept:
        alias[node.name] = kept[key]
      else:
        kept[key] = node.name
    if not alias:
      return
    nodes = [n for n in fdef.node_def if n.name not in alias]
    del fdef.node_def[:]
    fdef.node_def.extend(nodes)
    _rewrite_references(fdef, alias)


def compact_saved_model(export_dir):
  """Compacts the functions of `export_dir/saved_model.pb` in place and
  rewrites its fingerprint; returns `(bytes before, bytes after)`."""
  path = os.path.join(export_dir, "saved_model.pb")
  with open(path, "rb") as f:
    raw = f.read()
  saved = saved_model_pb2.SavedModel()
  saved.ParseFromString(raw)
  for meta_graph in saved.meta_graphs:
    entries = set(meta_graph.object_graph_def.concrete_functions)
    for fdef in meta_graph.graph_def.library.function:
      compact_function(fdef, entry=fdef.signature.name in entries)
  data = saved.SerializeToString(deterministic=True)
  with open(path, "wb") as f:
    f.write(data)
  _rewrite_fingerprint(export_dir)
  return len(raw), len(data)


def _rewrite_fingerprint(export_dir):
  """`fingerprint.pb` hashes `saved_model.pb`: recomputed, or removed (it is
  optional) where this TensorFlow cannot write one, never left stale."""
  path = os.path.join(export_dir, "fingerprint.pb")
  if not os.path.exists(path):
    return
  try:
    from tensorflow.python.saved_model import fingerprinting_utils  # pylint: disable=g-import-not-at-top
    os.remove(path)
    fingerprinting_utils.write_fingerprint(export_dir)
  except Exception:  # pylint: disable=broad-except
    if os.path.exists(path):
      os.remove(path)
