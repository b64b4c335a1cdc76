"""`export_saved_model`: a SavedModel for TF Serving with BSR weights kept sparse.

The variables are saved as they live in the layers: a block-sparse weight is
its three BSR components (block values, column indices, row pointers), so
the export is as small as the model.

Two modes:

* `"portable"` (default): the functions are traced with
  `tf_blocksparse.ops.use_custom_ops(False)`, so the graphs hold only stock
  TensorFlow ops (gather, einsum, unsorted_segment_sum, while loops, and the
  Assert ops that check the BSR structure). A stock `tensorflow_model_server`
  or any TensorFlow process loads it; `tf_blocksparse` is not needed.
* `"custom_op"`: the graphs call the compiled `Tfbs*` ops (fused RNN sequence
  kernels, faster). A Python process must register them before loading::

      import glob, os, tensorflow as tf
      import tf_blocksparse  # or, without the package installed:
      tf.load_op_library(glob.glob(os.path.join(
          os.path.dirname(tf_blocksparse.__file__),
          "ops", "_tf_blocksparse_ops*.so"))[0])
      loaded = tf.saved_model.load(path)

  (`tf_blocksparse.export.load_saved_model(path)` does both.) For TF Serving,
  link the ops into the server: add the `:tf_blocksparse_ops` target of the
  repository's `BUILD` file (an alwayslink `cc_library` of every op and CPU
  kernel) to `SUPPORTED_TENSORFLOW_OPS` in
  `tensorflow_serving/model_servers/BUILD` and rebuild
  `tensorflow_model_server`.

The graphs are small: the BSR structure is validated once per call, by one
traced function every product shares, outside the recurrent loop (whose
body holds only the products and the gate math), and the written
`saved_model.pb` is compacted (`compaction`: short node names inside its
functions, duplicate constants merged). For the char-LM LSTM(128) at 90 %
4 x 4 block sparsity, logits layer pruned too, the whole directory is
0.25x the dense export's (`benchmarks/savedmodel_size.py`).

Signatures: `serving_default` (the model's inputs and outputs by their Keras
names) and, for streamable recurrent models, `step` (one frame and the
states in, the output and the new states out; see `signatures.step_plan`).
"""

import glob
import os
import shutil
import tempfile
import warnings

import tensorflow as tf

from tf_blocksparse.export import compaction
from tf_blocksparse.export import signatures
from tf_blocksparse.export import sparse_form
from tf_blocksparse.ops import _loader

MODES = ("portable", "custom_op")


def custom_op_library_path():
  """Path of the compiled op library that `custom_op` exports need."""
  paths = sorted(glob.glob(os.path.join(_loader._HERE, "_tf_blocksparse_ops.*so")))  # pylint: disable=protected-access
  if not paths:
    raise FileNotFoundError(
        "the compiled library _tf_blocksparse_ops*.so is missing: "
        f"{_loader.load_error()}")
  return paths[0]


def export_saved_model(model, path, mode="portable", overwrite=False,
                       step_signature="auto", block_sparse="auto",
                       min_sparsity=0.5):
  """Writes `model` as a SavedModel with named signatures.

  Args:
    model: a built tf_keras model with defined inputs (dense, pruned-and-
      stripped or with `tf_blocksparse.layers` layers).
    path: directory to write.
    mode: `"portable"` (stock TensorFlow ops only) or `"custom_op"` (the
      compiled `Tfbs*` ops; see the module docstring for loading).
    overwrite: replace an existing `path`; without it an existing path is an
      error.
    step_signature: `"auto"` adds the streaming `step` signature when the
      model is streamable, True requires it (ValueError naming the
      unsupported layer otherwise), False leaves it out.
    block_sparse: `"auto"` converts pruned weights (a wrapped or stripped
      model's, at least `min_sparsity` zeros in whole blocks) to block-sparse
      layers before exporting, as `to_block_sparse` does, so they are stored
      and run block sparse; a model with nothing block sparse is exported
      dense with a warning. False exports the model as given.
    min_sparsity: see `block_sparse`.

  Returns:
    The list of signature names written (an `ExportedSignatures`, a list
    whose `skipped` dict gives, for a signature left out, the reason: with
    `step_signature="auto"` a model that cannot stream gets no `step`, and
    `skipped["step"]` says which layer prevents it; a warning says so too;
    and whose `conversion` is `{"converted": layers converted by the
    export, "note": why the model was exported as given, or None}`).

  Example:

  >>> import tempfile, os, numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> model = tf_keras.Sequential([
  ...     tf_keras.Input((None, 8)),
  ...     tfbs.layers.BlockSparseLSTM(16, block_size=4, density=0.25),
  ...     tf_keras.layers.Dense(2)])
  >>> path = os.path.join(tempfile.mkdtemp(), "model")
  >>> tfbs.export.export_saved_model(model, path)
  ['serving_default', 'step']
  """
  signatures.check_model(model)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if step_signature not in ("auto", True, False):
    raise ValueError("step_signature must be 'auto', True or False, got "
                     f"{step_signature!r}")
  path = os.fspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True to "
                          "replace it or choose another path")
  if mode == "custom_op" and not _loader.custom_ops_available():
    raise RuntimeError("mode='custom_op' needs the compiled ops, which are "
                       f"not loaded ({_loader.load_error()}); use "
                       "mode='portable'")
  # After the cheap checks: the conversion rebuilds the model.
  model, conversion_report = sparse_form.block_sparse_form(
      model, block_sparse, min_sparsity, caller="export_saved_model")

  with _loader.use_custom_ops(mode == "custom_op"):
    functions = {"serving_default": signatures.serving_function(model)
                 .get_concrete_function(**signatures.serving_specs(model))}
    specs = None
    skipped = {}
    if step_signature:
      try:
        specs = signatures.step_specs(model)
      except ValueError as e:
        # "auto": a model that cannot stream gets serving_default only,
        # and the caller is told why.
        if step_signature is True:
          raise
        skipped["step"] = str(e)
        if signatures.has_recurrent_layer(model):
          warnings.warn(f"export_saved_model: no 'step' signature for "
                        f"model {model.name}: {e}", stacklevel=2)
    if specs is not None:
      functions["step"] = signatures.step_function(model).get_concrete_function(
          **specs)

  # Only the variables are tracked (not the Keras objects), so the export
  # holds exactly the traced signature graphs and nothing Keras re-traces
  # (possibly with the custom ops) while saving.
  root = tf.Module()
  root.model_variables = list(model.variables)
  options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # Write next to the target and move it in place, so a failed export never
  # leaves half a model at `path` or destroys the previous one.
  staging = tempfile.mkdtemp(prefix=".tfbs_export_", dir=parent)
  try:
    tf.saved_model.save(root, staging, signatures=functions, options=options)
    compaction.compact_saved_model(staging)
    if os.path.exists(path):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    os.replace(staging, path)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return ExportedSignatures(functions, skipped, conversion_report)


class ExportedSignatures(list):
  """The signature names an export wrote; `skipped`: {name: why not};
  `conversion`: what the export converted to block-sparse form."""

  def __init__(self, names, skipped=None, conversion=None):
    super().__init__(names)
    self.skipped = dict(skipped or {})
    self.conversion = dict(conversion or {"converted": [], "note": None})


def load_saved_model(path):
  """Loads an export of either mode, registering the custom ops first.

  Raises:
    ValueError: the files are truncated or fail their checksums.

  Example:

  >>> import tempfile, os, numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> model = tf_keras.Sequential([tf_keras.Input((4,), name="x"),
  ...                              tfbs.layers.BlockSparseDense(4, block_size=2)])
  >>> path = os.path.join(tempfile.mkdtemp(), "m")
  >>> _ = tfbs.export.export_saved_model(model, path, mode="custom_op")
  >>> loaded = tfbs.export.load_saved_model(path)
  >>> out = loaded.signatures["serving_default"](x=np.ones([1, 4], np.float32))
  >>> sorted(out) == model.output_names
  True
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no SavedModel directory at {path}")
  if _loader.library() is None:
    tf.load_op_library(custom_op_library_path())
  try:
    return tf.saved_model.load(path)
  except (tf.errors.OpError, IndexError, ValueError, OSError) as e:
    # The checkpoint reader reports a truncated file as an IndexError and a
    # bad checksum as DataLossError; say what it means for the user.
    raise ValueError(
        f"could not load the SavedModel at {path}: its files are damaged or "
        f"incomplete ({type(e).__name__}: {e}); export the model again") from e
