"""Every layer kind tfmot prunes (and depthwise kernels, which it does
not), trained with model.fit, with the exact block structure of its zeros.

As in test_prune_layers.py: phase 1 trains with learning rate 0, so each
block mask must equal a numpy top-k over numpy block representatives of
the initial weight, in that weight's matrix view; phase 2 trains for real
and pruned blocks must stay zero, every block all zero or untouched.
"""

import numpy as np
import pytest
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks

L = tf_keras.layers
FLOAT = "float32"

# name: (input shape, input dtype, layer factory, block size,
#        [(path, gates, row_axes)] it must prune)
KINDS = {
    "conv2d": ((5, 5, 2), FLOAT, lambda: L.Conv2D(4, 3), (3, 2),
               [("kernel", 1, None)]),
    "conv3d": ((3, 3, 3, 1), FLOAT, lambda: L.Conv3D(3, 2), (2, 2),
               [("kernel", 1, None)]),
    "conv2d_transpose": ((3, 3, 2), FLOAT, lambda: L.Conv2DTranspose(3, 2),
                         (2, 1), [("kernel", 1, None)]),
    "depthwise_conv1d": ((6, 3), FLOAT,
                         lambda: L.DepthwiseConv1D(3, depth_multiplier=2),
                         (2, 1), [("depthwise_kernel", 3, -2)]),
    "depthwise_conv2d": ((5, 5, 3), FLOAT,
                         lambda: L.DepthwiseConv2D(3, depth_multiplier=2),
                         (4, 2), [("depthwise_kernel", 3, -2)]),
    "separable_conv1d": ((6, 3), FLOAT,
                         lambda: L.SeparableConv1D(4, 3, depth_multiplier=2),
                         (2, 2), [("depthwise_kernel", 3, -2),
                                  ("pointwise_kernel", 1, None)]),
    "separable_conv2d": ((5, 5, 2), FLOAT,
                         lambda: L.SeparableConv2D(4, 3, depth_multiplier=2),
                         (3, 2), [("depthwise_kernel", 2, -2),
                                  ("pointwise_kernel", 1, None)]),
    "locally_connected1d": ((6, 3), FLOAT,
                            lambda: L.LocallyConnected1D(4, 3), (3, 2),
                            [("kernel", 1, None)]),
    "locally_connected2d": ((4, 4, 2), FLOAT,
                            lambda: L.LocallyConnected2D(2, 2), (4, 2),
                            [("kernel", 1, None)]),
    "embedding": ((5,), "int32", lambda: L.Embedding(10, 6), (2, 2),
                  [("embeddings", 1, None)]),
    "multi_head_attention": (
        (4, 6), FLOAT, lambda: L.MultiHeadAttention(num_heads=2, key_dim=3),
        (2, 2), [("query_kernel", 2, 1), ("key_kernel", 2, 1),
                 ("value_kernel", 2, 1), ("output_kernel", 1, None)]),
}


def _build(kind, lr):
  in_shape, dtype, make, bs, _ = KINDS[kind]
  pruned = tfbs.prune_block_low_magnitude(
      make(), block_size=bs,
      pruning_schedule=tfbs.schedules.ConstantSparsity(0.5, 0, frequency=1))
  inp = tf_keras.Input(in_shape, dtype=dtype)
  out = pruned(inp, inp) if kind == "multi_head_attention" else pruned(inp)
  model = tf_keras.Model(inp, out)
  model.compile(helpers.sgd(lr), "mse", run_eagerly=True)
  return model, pruned, bs


def _data(model, kind, n, seed):
  rng = np.random.RandomState(seed)
  in_shape, dtype = KINDS[kind][:2]
  if dtype == "int32":
    x = rng.randint(0, 10, (n,) + in_shape).astype(np.int32)
  else:
    x = rng.randn(n, *in_shape).astype(np.float32)
  y = rng.randn(n, *model.output_shape[1:]).astype(np.float32)
  return x, y


def _fit(model, kind, steps, seed):
  x, y = _data(model, kind, 2 * steps, seed)
  model.fit(x, y, batch_size=2, shuffle=False, verbose=0,
            callbacks=[tfbs.UpdatePruningStep()])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layer_kind_with_fit(kind):
  model, pruned, bs = _build(kind, lr=0.0)
  assert [(mw.path, mw.gates, mw.row_axes)
          for mw in pruned.masked_weights] == KINDS[kind][4]
  w0 = [mw.weight.numpy() for mw in pruned.masked_weights]
  others = [w for w in pruned.layer.weights
            if all(w is not mw.weight for mw in pruned.masked_weights)]
  others0 = [w.numpy() for w in others]

  _fit(model, kind, 2, seed=0)
  assert int(pruned.pruning_step.numpy()) == 2
  for mw, init in zip(pruned.masked_weights, w0):
    view = dict(gates=mw.gates, row_axes=mw.row_axes)
    reps = np_blocks.representatives(init, bs, "max", **view)
    want = np_blocks.top_blocks(reps, 0.5)
    assert 0 < want.mean() < 1
    np.testing.assert_array_equal(
        np_blocks.block_mask_of_values(mw.weight.numpy(), bs, **view), want,
        err_msg=mw.path)
    keep = np_blocks.expand(want, init.shape, bs, **view)
    np.testing.assert_array_equal(mw.mask.numpy(), keep)
    np.testing.assert_array_equal(mw.weight.numpy(), init * keep)
  for w, w_init in zip(others, others0):   # biases are never pruned
    np.testing.assert_array_equal(w.numpy(), w_init)

  masks = [mw.mask.numpy() for mw in pruned.masked_weights]
  helpers.set_lr(model, 0.05)
  _fit(model, kind, 2, seed=1)
  moved = 0
  for mw, mask, init in zip(pruned.masked_weights, masks, w0):
    value = mw.weight.numpy()
    np.testing.assert_array_equal(mw.mask.numpy(), mask)
    assert not np.any(value[mask == 0])
    np_blocks.assert_block_structure(value, bs, mw.gates, mw.row_axes)
    moved += np.sum(value[mask == 1] != init[mask == 1])
  assert moved > 0

  # tfmot's helpers read the wrapped layer's prunable weights.
  assert [id(w) for w in pruned.layer.get_prunable_weights()] == [
      id(mw.weight) for mw in pruned.masked_weights]

  x, _ = _data(model, kind, 3, seed=5)
  before = model(x, training=False).numpy()
  stripped = tfbs.strip_block_pruning(model)
  assert type(stripped.layers[1]) is type(pruned.layer)
  np.testing.assert_allclose(stripped(x, training=False).numpy(), before,
                             rtol=1e-5, atol=1e-6)
