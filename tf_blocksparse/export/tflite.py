"""`export_tflite`: TFLite models whose recurrent weights are stored sparse.

The stock converter turns a Keras LSTM into `UNIDIRECTIONAL_SEQUENCE_LSTM`,
which has no sparse weight format, so a pruned model stays dense. Here every
gate matmul of every step is a `FULLY_CONNECTED` op with a constant weight
(the input and the recurrent product of each recurrent layer, and each Dense
layer), and the converter runs with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`,
which stores the zero-block-pruned constant weights in TFLite's sparse
format. TFLite's float sparse kernel takes 1x4 blocks of its `[out, in]`
weight layout, i.e. `(4, 1)` blocks of Keras's `[in, out]`: such weights run
sparse; other block shapes are stored sparse and expanded by a DENSIFY op
when the interpreter prepares the model (`sparsity_report` says which).

Two models are written: a streaming step model (one frame and the states in,
the output and the new states out, batch 1), which is how recurrent models
run on devices, and an unrolled fixed-length sequence model (input
`[1, sequence_length, features]`).
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.export import signatures
from tf_blocksparse.export import sparse_form
from tf_blocksparse.layers.block_sparse_dense import BlockSparseDense
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseGRU
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseLSTM
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseSimpleRNN

_LSTM = (tf_keras.layers.LSTM, BlockSparseLSTM)
_GRU = (tf_keras.layers.GRU, BlockSparseGRU)
_SIMPLE = (tf_keras.layers.SimpleRNN, BlockSparseSimpleRNN)
_DENSE = (tf_keras.layers.Dense, BlockSparseDense)


def _numpy(x):
  return np.asarray(x.numpy() if hasattr(x, "numpy") else x, np.float32)


def _rnn_weights(layer):
  """Dense `(kernel, recurrent kernel, bias or None)` numpy arrays."""
  cell = layer.cell
  if hasattr(cell, "dense_kernel"):
    kernel, recurrent = cell.dense_kernel(), cell.dense_recurrent_kernel()
  else:
    kernel, recurrent = cell.kernel, cell.recurrent_kernel
  bias = None if cell.bias is None else _numpy(cell.bias)
  return _numpy(kernel), _numpy(recurrent), bias


def _dense_weights(layer):
  kernel = layer.dense_kernel() if hasattr(layer, "dense_kernel") else layer.kernel
  bias = None if layer.bias is None else _numpy(layer.bias)
  return _numpy(kernel), bias


class _Program:
  """The model's layers as numpy weights and per-frame step functions."""

  def __init__(self, model):
    plan = signatures.step_plan(model)
    self.features = int(model.inputs[0].shape[-1])
    self.layers = []
    for kind, layer in plan:
      if kind == "mask":
        # The unrolled sequence model runs every frame: it cannot skip the
        # masked ones the way the Keras model does.
        raise ValueError(
            f"layer {layer.name} (Masking) is not supported by export_tflite: "
            "the unrolled sequence model would run the masked frames as real "
            "ones; export a copy of the model without the Masking layer (a "
            "streaming client sends only real frames), or use "
            "export_saved_model, whose step signature supports it")
      if kind == "rnn":
        if not isinstance(layer, _LSTM + _GRU + _SIMPLE):
          raise ValueError(f"layer {layer.name} ({type(layer).__name__}) is "
                           "not supported by export_tflite")
        self.layers.append(("rnn", layer, _rnn_weights(layer)))
      elif isinstance(layer, _DENSE):
        self.layers.append(("dense", layer, _dense_weights(layer)))
      elif isinstance(layer, tf_keras.layers.Activation):
        self.layers.append(("activation", layer, None))
      else:
        raise ValueError(f"layer {layer.name} ({type(layer).__name__}) is not "
                         "supported by export_tflite; supported: Dense, "
                         "SimpleRNN, GRU, LSTM (tf_keras or BlockSparse*), "
                         "TimeDistributed(Dense), Activation, Dropout")
    self.state_specs = []      # (name, units) in step-model order
    self.cell_states = []      # the LSTM cell states' names (unbounded)
    for kind, layer, _ in self.layers:
      if kind == "rnn":
        n = len(tf.nest.flatten(layer.cell.state_size))
        for s in ("h", "c")[:n]:
          self.state_specs.append((f"{layer.name}_{s}", layer.cell.units))
        if isinstance(layer, _LSTM):
          self.cell_states.append(f"{layer.name}_c")
    self.returns_sequences = all(
        layer.return_sequences for kind, layer, _ in self.layers
        if kind == "rnn")

  def constants(self):
    """The weights as TF constants, created once per traced function."""
    return [None if w is None else tuple(
        None if a is None else tf.constant(a) for a in w)
            for _, _, w in self.layers]

  @staticmethod
  def _fc(x, w, b=None):
    # tf.matmul with a constant right operand converts to FULLY_CONNECTED.
    y = tf.matmul(x, w)
    return y if b is None else y + b

  def rnn_step(self, layer, weights, x_proj, states):
    """One step from the projected input `x @ kernel (+ input bias)`."""
    cell = layer.cell
    _, recurrent, bias = weights
    act, rec_act = cell.activation, getattr(cell, "recurrent_activation", None)
    if isinstance(layer, _LSTM):
      h, c = states
      z = x_proj + self._fc(h, recurrent)
      z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
      c = rec_act(z_f) * c + rec_act(z_i) * act(z_c)
      h = rec_act(z_o) * act(c)
      return h, [h, c]
    if isinstance(layer, _GRU):
      (h,) = states
      units = cell.units
      reset_after = cell.reset_after
      rec_bias = bias[1] if (bias is not None and reset_after) else None
      x_z, x_r, x_h = tf.split(x_proj, 3, axis=1)
      if reset_after:
        inner = self._fc(h, recurrent, rec_bias)
        r_z, r_r, r_h = tf.split(inner, 3, axis=1)
      else:
        inner = self._fc(h, recurrent[:, :2 * units])
        r_z, r_r = tf.split(inner, 2, axis=1)
      z = rec_act(x_z + r_z)
      r = rec_act(x_r + r_r)
      if reset_after:
        hh = act(x_h + r * r_h)
      else:
        hh = act(x_h + self._fc(r * h, recurrent[:, 2 * units:]))
      h = z * h + (1 - z) * hh
      return h, [h]
    (h,) = states
    h = act(x_proj + self._fc(h, recurrent))
    return h, [h]

  def input_bias(self, layer, bias):
    if bias is None:
      return None
    if isinstance(layer, _GRU) and layer.cell.reset_after:
      return bias[0]
    return bias

  def frame_layer(self, kind, layer, weights, x):
    if kind == "dense":
      kernel, bias = weights
      return layer.activation(self._fc(x, kernel, bias))
    return layer.activation(x)

  def step(self, frame, states):
    """Frame `[1, features]` and the state list -> output, new states."""
    x, i, new_states = frame, 0, []
    for (kind, layer, _), consts in zip(self.layers, self.constants()):
      if kind != "rnn":
        x = self.frame_layer(kind, layer, consts, x)
        continue
      n = len(tf.nest.flatten(layer.cell.state_size))
      kernel, _, bias = consts
      x_proj = self._fc(x, kernel, self.input_bias(layer, bias))
      x, updated = self.rnn_step(layer, consts, x_proj, states[i:i + n])
      new_states += updated
      i += n
    return x, new_states

  def sequence(self, inputs, length):
    """Unrolled run of `inputs [1, length, features]` from zero states."""
    x = tf.reshape(inputs, [length, self.features])   # the T frames as rows
    for (kind, layer, _), consts in zip(self.layers, self.constants()):
      if kind != "rnn":
        x = self.frame_layer(kind, layer, consts, x)
        continue
      kernel, _, bias = consts
      # All T input projections in one FULLY_CONNECTED (M = T).
      x_proj = self._fc(x, kernel, self.input_bias(layer, bias))
      n = len(tf.nest.flatten(layer.cell.state_size))
      states = [tf.zeros([1, layer.cell.units])] * n
      outputs = []
      # One SPLIT for all steps rather than a slice op per step.
      for x_t in tf.split(x_proj, length, axis=0):
        out, states = self.rnn_step(layer, consts, x_t, states)
        outputs.append(out)
      x = tf.concat(outputs, axis=0) if layer.return_sequences else outputs[-1]
    if self.returns_sequences:
      return tf.reshape(x, [1, length, -1])
    return x


QUANTIZE_MODES = (None, "dynamic", "int8")
# Calibration samples per file: enough frames for the ranges to settle,
# bounded so that a long representative dataset does not slow the export.
_MAX_STEP_SAMPLES = 1000
_MAX_SEQUENCE_SAMPLES = 100
# The LSTM cell state is unbounded and long-tailed: min/max calibration
# spends the int8 range on rare outliers (the char-LM's |c| reaches 44 where
# its 90th percentile is 6). Its calibration samples are clipped at this
# percentile of |c|; beyond it the state saturates, where tanh(c) already
# has. Char-LM test bpc over the float file: +2.09 % unclipped; +0.69 %,
# +0.24 % and +0.18 % clipped at the 98th, 90th and 80th percentile.
_CELL_STATE_PERCENTILE = 90


def _convert(concrete_function, signature, sparsity, quantize=None,
             samples=None, per_channel=True):
  # Through a SavedModel so that the .tflite keeps a named signature
  # (inputs and outputs by name for the signature runner).
  with tempfile.TemporaryDirectory() as tmp:
    tf.saved_model.save(tf.Module(), tmp,
                        signatures={signature: concrete_function})
    converter = tf.lite.TFLiteConverter.from_saved_model(
        tmp, signature_keys=[signature])
    optimizations = []
    if quantize is not None:
      optimizations.append(tf.lite.Optimize.DEFAULT)
    if sparsity:
      optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if quantize == "int8":
      converter.representative_dataset = lambda: iter(samples)
      # Every op in int8 (the converter fails rather than leave one in
      # float); the inputs and outputs stay float32, as in the float files.
      converter.target_spec.supported_ops = [
          tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if quantize is not None and not per_channel:
      # Per-tensor scales: a sparse weight's per-channel scales and int64
      # zero points are stored twice (the sparse constant and its DENSIFY
      # output), which in a 90 % sparse model outweighs the int8 values.
      converter._experimental_disable_per_channel = True  # pylint: disable=protected-access
    return converter.convert()


def _representative_inputs(dataset, features):
  """The model inputs `[batch, time, features]` of `dataset`, as float32.

  `dataset`: an iterable (or a function returning one, as TF's converter
  takes) of arrays or of tuples/dicts whose first element is the input.
  """
  items = dataset() if callable(dataset) else dataset
  for item in items:
    if isinstance(item, dict):
      item = next(iter(item.values()))
    elif isinstance(item, (tuple, list)):
      item = item[0]
    x = np.asarray(item.numpy() if hasattr(item, "numpy") else item,
                   np.float32)
    if x.ndim == 2:
      x = x[None]
    if x.ndim != 3 or x.shape[-1] != features:
      raise ValueError(
          "representative_dataset must yield model inputs of shape [batch, "
          f"time, {features}] (or [time, {features}]), got {x.shape}")
    yield x


def _calibration(model, dataset, sequence_length):
  """Calibration samples for the step and the sequence file.

  The step file's states are calibrated on the states the float model
  reaches on the representative sequences (run frame by frame from zero
  states), not on made-up ones; the sequence file gets windows of
  `sequence_length` frames cut from the same sequences joined end to end.
  """
  program = _Program(model)
  frame_name = model.input_names[0]
  step = step_function(model)
  state_names = [n for n, _ in program.state_specs]
  step_samples, frames = [], []
  for x in _representative_inputs(dataset, program.features):
    for row in x:
      frames.append(row)
      if len(step_samples) >= _MAX_STEP_SAMPLES:
        continue
      states = {n: tf.zeros([1, u]) for n, u in program.state_specs}
      for frame in row:
        inputs = {frame_name: tf.constant(frame[None]), **states}
        step_samples.append({k: v.numpy() if hasattr(v, "numpy") else v
                             for k, v in inputs.items()})
        out = step(**inputs)
        states = {n: out[n] for n in state_names}
        if len(step_samples) >= _MAX_STEP_SAMPLES:
          break
  if not step_samples:
    raise ValueError("representative_dataset yielded no frames")
  for name in program.cell_states:
    limit = np.percentile(np.abs(np.concatenate(
        [s[name] for s in step_samples])), _CELL_STATE_PERCENTILE)
    for sample in step_samples:
      sample[name] = np.clip(sample[name], -limit, limit)
  stream = np.concatenate(frames, axis=0)
  windows = len(stream) // sequence_length
  if windows == 0:
    raise ValueError(
        f"representative_dataset has {len(stream)} frames in all, fewer than "
        f"one sequence_length ({sequence_length}); give longer or more "
        "sequences")
  sequence_samples = [
      {frame_name: stream[None, i * sequence_length:(i + 1) * sequence_length]}
      for i in range(min(windows, _MAX_SEQUENCE_SAMPLES))]
  return step_samples, sequence_samples


def step_function(model):
  """The step computation as a concrete function (batch 1, named tensors)."""
  program = _Program(model)
  frame_name, out_name = model.input_names[0], model.output_names[0]
  specs = {frame_name: tf.TensorSpec([1, program.features], tf.float32,
                                     name=frame_name)}
  specs.update({n: tf.TensorSpec([1, u], tf.float32, name=n)
                for n, u in program.state_specs})

  @tf.function(autograph=False)
  def step(**inputs):
    out, new_states = program.step(
        inputs[frame_name], [inputs[n] for n, _ in program.state_specs])
    result = {out_name: out}
    result.update({n: s for (n, _), s in zip(program.state_specs, new_states)})
    return result

  return step.get_concrete_function(**specs)


def sequence_function(model, sequence_length):
  """The unrolled sequence computation as a concrete function (batch 1)."""
  program = _Program(model)
  in_name, out_name = model.input_names[0], model.output_names[0]

  @tf.function(autograph=False)
  def run(**inputs):
    return {out_name: program.sequence(inputs[in_name], sequence_length)}

  return run.get_concrete_function(**{in_name: tf.TensorSpec(
      [1, sequence_length, program.features], tf.float32, name=in_name)})


def export_tflite(model, path, sequence_length=50, overwrite=False,
                  sparsity=True, block_sparse="auto", min_sparsity=0.5,
                  quantize=None, representative_dataset=None,
                  per_channel=False):
  """Writes the streaming step model and an unrolled sequence model.

  Args:
    model: a `Sequential`-like tf_keras model of Dense / SimpleRNN / GRU /
      LSTM layers, dense, pruned (stripped) or `tf_blocksparse` layers, with a
      `[batch, time, features]` input. See `signatures.step_plan`.
    path: output prefix; writes `<path>_step.tflite` and
      `<path>_sequence.tflite` (a trailing `.tflite` is dropped first).
    sequence_length: time steps of the unrolled sequence model.
    overwrite: replace existing files; otherwise an existing file is an error.
    sparsity: convert with `EXPERIMENTAL_SPARSITY` (False: dense storage,
      for comparisons).
    block_sparse: `"auto"` converts pruned weights (a wrapped or stripped
      model's, at least `min_sparsity` zeros in whole blocks) to block-sparse
      layers before writing, as `to_block_sparse` does, and warns when the
      model has nothing block sparse; False writes the model as given.
    min_sparsity: see `block_sparse`.
    quantize: None (float32), `"dynamic"` (int8 weights, float activations:
      the converter's dynamic-range quantization) or `"int8"` (int8 weights
      and activations, calibrated on `representative_dataset`; the files'
      inputs and outputs stay float32). Weights keep their sparse storage.
      TFLite's int8 kernels run sparse weights only in 1x16 blocks of its
      `[out, in]` layout, so a block-sparse weight is stored sparse and
      expanded once by a DENSIFY op when the interpreter prepares the model
      (`report["densified"]`). LiteRT's default XNNPACK delegate cannot
      prepare an int8 FULLY_CONNECTED fed by DENSIFY: run such files with
      the builtin kernels (`Interpreter(...,
      experimental_op_resolver_type=OpResolverType.
      BUILTIN_WITHOUT_DEFAULT_DELEGATES)`; on Android, XNNPACK off);
      `report["xnnpack"]` says whether a file needs that.
    representative_dataset: for `quantize="int8"`: an iterable (or a
      function returning one) of model inputs `[batch, time, features]`
      (arrays, or `(x, y)` tuples as a `tf.data` dataset yields), e.g. a few
      hundred sequences of training data. The step file is calibrated on the
      frames and on the states the float model reaches on them (an LSTM's
      cell state clipped at its 90th percentile of |c|: see
      `_CELL_STATE_PERCENTILE`); the sequence file on windows of
      `sequence_length` frames, min/max over all its activations.
    per_channel: with `quantize`, one scale per output channel of each
      weight (the converter's default) rather than one per weight. Off by
      default: per-channel parameters are stored twice for a sparse weight
      and cost more than its int8 values at 90 % sparsity; per-tensor
      scales kept the char-LM's test bpc within 1 % of the float file
      (`benchmarks/tflite_quantized.py`).

  Returns:
    `{"step": step file, "sequence": sequence file, "report": sparsity
    report of the step model (see `sparsity_report`)}`. Each file has one
    signature (`"step"`, `"sequence"`) for LiteRT's signature runner. The
    step model takes the frame `[1, features]` under the model's input name
    and the states `[1, units]` under `state_names(model)` (zeros at the
    start of a sequence); it returns the output under the model's output
    name and the new states under the same state names. The sequence model
    maps `[1, sequence_length, features]` to the model's output.
    `"conversion"`: `{"converted": layers converted by the export, "note":
    why the model was written as given, or None}`.

  Example:

  >>> import os, tempfile, tf_keras, tf_blocksparse as tfbs
  >>> model = tf_keras.Sequential([tf_keras.Input((None, 8)),
  ...                              tf_keras.layers.LSTM(16),
  ...                              tf_keras.layers.Dense(4)])
  >>> files = tfbs.export.export_tflite(
  ...     model, os.path.join(tempfile.mkdtemp(), "m"), sequence_length=5,
  ...     block_sparse=False)
  >>> sorted(files)
  ['conversion', 'report', 'sequence', 'step']
  """
  signatures.check_model(model)
  if isinstance(sequence_length, bool) or not isinstance(
      sequence_length, (int, np.integer)) or sequence_length <= 0:
    raise ValueError(f"sequence_length must be a positive int, got "
                     f"{sequence_length!r}")
  if quantize not in QUANTIZE_MODES:
    raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got "
                     f"{quantize!r}")
  if quantize == "int8" and representative_dataset is None:
    raise ValueError("quantize='int8' needs representative_dataset (model "
                     "inputs [batch, time, features] to calibrate the "
                     "activation ranges on, e.g. some training sequences); "
                     "or use quantize='dynamic', which needs none")
  if quantize != "int8" and representative_dataset is not None:
    raise ValueError("representative_dataset is used only with "
                     f"quantize='int8', got quantize={quantize!r}")
  if model.inputs[0].dtype != tf.float32:
    raise ValueError("export_tflite supports float32 models, got inputs of "
                     f"{model.inputs[0].dtype.name}")
  prefix = os.fspath(path)
  if prefix.endswith(".tflite"):
    prefix = prefix[:-len(".tflite")]
  files = {"step": prefix + "_step.tflite",
           "sequence": prefix + "_sequence.tflite"}
  for f in files.values():
    if os.path.exists(f) and not overwrite:
      raise FileExistsError(f"{f} already exists; pass overwrite=True to "
                            "replace it or choose another path")
  # After the cheap checks: the conversion rebuilds the model.
  model, conversion_report = sparse_form.block_sparse_form(
      model, block_sparse, min_sparsity, caller="export_tflite")
  signatures.step_specs(model)   # names are unique (else a ValueError)
  step_samples = sequence_samples = None
  if quantize == "int8":
    step_samples, sequence_samples = _calibration(
        model, representative_dataset, int(sequence_length))
  quantization = dict(quantize=quantize, per_channel=per_channel)
  contents = {
      "step": _convert(step_function(model), "step", sparsity,
                       samples=step_samples, **quantization),
      "sequence": _convert(sequence_function(model, int(sequence_length)),
                           "sequence", sparsity, samples=sequence_samples,
                           **quantization)}
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  for key, content in contents.items():
    with open(files[key], "wb") as f:
      f.write(content)
  result = dict(files)
  result["report"] = sparsity_report(contents["step"])
  result["conversion"] = conversion_report
  return result


def state_names(model):
  """Names of the step model's state inputs/outputs, in order."""
  return [n for n, _ in _Program(model).state_specs]


def sparsity_report(tflite_model):
  """Which tensors of a `.tflite` model are stored sparse, which ops run sparse.

  Args:
    tflite_model: the flatbuffer bytes or a file path.

  Returns:
    A dict: `sparse_tensors` (name, shape, block map of each tensor stored in
    TFLite's sparse format), `sparse_fully_connected` (FULLY_CONNECTED ops
    reading a sparse weight directly, i.e. run by the sparse kernel),
    `densified` (tensors expanded by a DENSIFY op at prepare time),
    `dense_fully_connected` (FULLY_CONNECTED ops on dense weights),
    `int8_weights` (FULLY_CONNECTED weights stored as int8, by the stored
    tensor's name), `xnnpack` (False when LiteRT's default XNNPACK delegate
    cannot prepare the file: an int8 FULLY_CONNECTED fed by DENSIFY; run it
    with the builtin kernels) and the `ops` histogram.
  """
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
  if isinstance(tflite_model, (str, os.PathLike)):
    with open(tflite_model, "rb") as f:
      tflite_model = f.read()
  model = schema.Model.GetRootAsModel(bytearray(tflite_model), 0)
  names = {v: k for k, v in vars(schema.BuiltinOperator).items()
           if not k.startswith("_")}
  report = {"sparse_tensors": [], "sparse_fully_connected": [],
            "dense_fully_connected": [], "densified": [], "int8_weights": [],
            "xnnpack": True, "ops": {}}
  int8 = schema.TensorType.INT8
  for g in range(model.SubgraphsLength()):
    graph = model.Subgraphs(g)
    tensor_name = lambda i: graph.Tensors(i).Name().decode()  # pylint: disable=cell-var-from-loop
    sparse = set()
    for i in range(graph.TensorsLength()):
      tensor = graph.Tensors(i)
      sp = tensor.Sparsity()
      if sp is not None:
        sparse.add(i)
        report["sparse_tensors"].append({
            "name": tensor_name(i),
            "shape": [int(d) for d in tensor.ShapeAsNumpy()],
            "block_map": [int(b) for b in sp.BlockMapAsNumpy()]
                         if sp.BlockMapLength() else []})
    densify_source = {}     # DENSIFY output -> the sparse tensor it expands
    fully_connected = []
    for o in range(graph.OperatorsLength()):
      op = graph.Operators(o)
      code = model.OperatorCodes(op.OpcodeIndex())
      builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
      name = names.get(builtin, str(builtin))
      report["ops"][name] = report["ops"].get(name, 0) + 1
      inputs = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
      if name == "DENSIFY":
        report["densified"].append(tensor_name(inputs[0]))
        densify_source[int(op.OutputsAsNumpy()[0])] = inputs[0]
      elif name == "FULLY_CONNECTED" and len(inputs) > 1:
        fully_connected.append(inputs[1])
    for weight in fully_connected:
      target = ("sparse_fully_connected" if weight in sparse
                else "dense_fully_connected")
      report[target].append(tensor_name(weight))
      stored = densify_source.get(weight, weight)
      if graph.Tensors(stored).Type() == int8:
        report["int8_weights"].append(tensor_name(stored))
        if weight in densify_source:
          report["xnnpack"] = False
  return report
