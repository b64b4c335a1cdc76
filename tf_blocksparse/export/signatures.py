"""Signature functions of an exported model: the whole model and one step.

`serving_function` wraps a model's call with named inputs and outputs.
`step_function` runs a Sequential stack of recurrent layers (plus per-frame
layers such as Dense) for one frame, the states passed in and returned, which
is how a server or a device streams audio or text through an RNN.
"""

import tensorflow as tf
import tf_keras

from tf_blocksparse.layers.block_sparse_dense import BlockSparseDense
from tf_blocksparse.layers.block_sparse_rnn import _BlockSparseRNN

# Layers applied frame by frame in a step function, as in the model.
_FRAME_LAYERS = (tf_keras.layers.Dense, BlockSparseDense,
                 tf_keras.layers.Activation, tf_keras.layers.ReLU,
                 tf_keras.layers.Softmax, tf_keras.layers.LayerNormalization)
# Identity at inference.
_INFERENCE_IDENTITY = (tf_keras.layers.Dropout, tf_keras.layers.InputLayer)
# A mask marks padding frames of a batch of sequences; a stream sends its
# real frames one at a time, so the step function has nothing to mask.
_MASK_LAYERS = (tf_keras.layers.Masking,)
_RNN_LAYERS = (tf_keras.layers.SimpleRNN, tf_keras.layers.GRU,
               tf_keras.layers.LSTM, _BlockSparseRNN)


def check_model(model):
  """Raises unless `model` is a built tf_keras model with known inputs."""
  if not isinstance(model, tf_keras.Model):
    raise TypeError("model must be a tf_keras.Model (tf_keras, not keras 3), "
                    f"got {type(model).__name__}")
  if not model.inputs:
    raise ValueError(
        f"model {model.name} has no defined inputs; build it with "
        "tf_keras.Input(...) (or give the first layer an input_shape) before "
        "exporting")


def input_names(model):
  return list(model.input_names)


def output_names(model):
  return list(model.output_names)


def serving_specs(model):
  """`{input name: TensorSpec}` of the model's inputs."""
  return {name: tf.TensorSpec(t.shape, t.dtype, name=name)
          for name, t in zip(input_names(model), model.inputs)}


def serving_function(model):
  """A `tf.function` taking the model's inputs by name, returning a dict."""
  names, outs = input_names(model), output_names(model)

  @tf.function
  def serve(**inputs):
    args = [inputs[n] for n in names]
    result = model(args if len(args) > 1 else args[0], training=False)
    result = tf.nest.flatten(result)
    return {n: tf.identity(r, name=n) for n, r in zip(outs, result)}

  return serve


def _state_names(layer):
  suffixes = ("h", "c") if _num_states(layer) == 2 else ("h",)
  return [f"{layer.name}_{s}" for s in suffixes]


def _num_states(layer):
  return len(tf.nest.flatten(layer.cell.state_size))


def has_recurrent_layer(model):
  """Whether `model` holds a recurrent layer (one that could stream)."""
  return any(isinstance(m, (tf_keras.layers.RNN, _BlockSparseRNN))
             for m in model.submodules)


def step_plan(model):
  """The layers of a streamable model, or a ValueError naming the culprit.

  Streamable: a `Sequential` (or a linear functional model with one input
  and one output) of recurrent layers (tf_keras SimpleRNN/GRU/LSTM or the
  block-sparse ones, forward only, not stateful) and per-frame layers
  (Dense, BlockSparseDense, TimeDistributed of those, activations, Dropout).
  A `Masking` layer is kept in the plan as `("mask", layer)`: the step
  function treats every frame it is given as a real one (a frame equal to
  the mask value is not skipped), which is what streaming needs, since a
  client sends only real frames; a whole-sequence export must honour it.
  """
  check_model(model)
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise ValueError(f"a step function needs one input and one output; "
                     f"model {model.name} has {len(model.inputs)} and "
                     f"{len(model.outputs)}")
  if model.inputs[0].shape.rank != 3:
    raise ValueError("a step function needs a [batch, time, features] input, "
                     f"got shape {model.inputs[0].shape}")
  layers = [l for l in model.layers
            if not isinstance(l, tf_keras.layers.InputLayer)]
  if not isinstance(model, tf_keras.Sequential):
    for prev, layer in zip([None] + layers[:-1], layers):
      inbound = [n.inbound_layers for n in layer._inbound_nodes]  # pylint: disable=protected-access
      flat = tf.nest.flatten(inbound)
      if prev is not None and flat != [prev]:
        raise ValueError(f"layer {layer.name} of model {model.name} is not in "
                         "a linear chain; step functions support Sequential-"
                         "like models only")
  plan, seen_rnn, sequence_out = [], False, True
  for layer in layers:
    inner = layer.layer if isinstance(layer, tf_keras.layers.TimeDistributed) else layer
    if isinstance(inner, _INFERENCE_IDENTITY):
      continue
    if isinstance(inner, _MASK_LAYERS) and inner is layer:
      plan.append(("mask", layer))
      continue
    if isinstance(inner, _RNN_LAYERS) and inner is layer:
      if not sequence_out:
        raise ValueError(f"layer {layer.name} follows a recurrent layer with "
                         "return_sequences=False; cannot stream it")
      if layer.go_backwards or layer.stateful or getattr(layer, "return_state", False):
        raise ValueError(
            f"layer {layer.name}: go_backwards, stateful and return_state "
            "recurrent layers cannot be streamed")
      sequence_out = layer.return_sequences
      plan.append(("rnn", layer))
      seen_rnn = True
    elif isinstance(inner, _FRAME_LAYERS):
      plan.append(("frame", inner))
    else:
      raise ValueError(
          f"layer {layer.name} ({type(layer).__name__}) is not supported in a "
          "step function; supported: SimpleRNN, GRU, LSTM, their "
          "BlockSparse* versions, Dense, BlockSparseDense, TimeDistributed of "
          "those, activations, Dropout and Masking")
  if not seen_rnn:
    raise ValueError(f"model {model.name} has no recurrent layer to stream")
  return plan


def step_specs(model, plan=None):
  """`{name: TensorSpec}` of a step function's frame and state inputs."""
  plan = step_plan(model) if plan is None else plan
  frame = model.inputs[0]
  specs = {input_names(model)[0]: tf.TensorSpec(
      [None, frame.shape[-1]], frame.dtype, name=input_names(model)[0])}
  for kind, layer in plan:
    if kind == "rnn":
      for name in _state_names(layer):
        if name in specs or name in output_names(model):
          raise ValueError(
              f"the step signature names the states of layer {layer.name} "
              f"{name!r}, which is already the name of an input or output; "
              "rename the layer")
        specs[name] = tf.TensorSpec([None, layer.cell.units], frame.dtype,
                                    name=name)
  return specs


def state_names(model):
  """Names of the state inputs (and outputs) of the step function, in order."""
  return [n for kind, layer in step_plan(model) if kind == "rnn"
          for n in _state_names(layer)]


def step_callable(model, plan=None):
  """A plain Python function `(frame, states dict) -> (output, states dict)`."""
  plan = step_plan(model) if plan is None else plan

  def step(frame, states):
    x, new_states = frame, {}
    for kind, layer in plan:
      if kind == "mask":
        continue
      if kind == "frame":
        x = layer(x)
        continue
      names = _state_names(layer)
      old = [states[n] for n in names]
      x, updated = layer.cell(x, old, training=False)
      new_states.update(zip(names, tf.nest.flatten(updated)))
    return x, new_states

  return step


def step_function(model):
  """A `tf.function` running one frame: inputs and returns by name."""
  plan = step_plan(model)
  step = step_callable(model, plan)
  frame_name, out_name = input_names(model)[0], output_names(model)[0]

  @tf.function
  def serve_step(**inputs):
    x, states = step(inputs[frame_name], inputs)
    result = {out_name: tf.identity(x, name=out_name)}
    result.update({n: tf.identity(s, name=n) for n, s in states.items()})
    return result

  return serve_step
