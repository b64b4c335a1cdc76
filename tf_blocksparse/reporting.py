"""How sparse is a model, per weight: a table and a picture of block masks.

A weight's blocks follow the pruning layout (gate slices, partial edge
blocks, see `pruning.block_masks`); a block counts as non-zero when any of
its elements is. For a pruned (wrapped) layer the weight is read as
`weight * mask`, i.e. what `strip_block_pruning` will leave.
"""

import numpy as np
import tensorflow as tf
import tf_keras

from tf_blocksparse.pruning import block_masks
from tf_blocksparse.pruning import registry
from tf_blocksparse.pruning import wrapper as wrapper_lib

COLUMNS = ("layer", "weight", "shape", "block_size", "block_sparsity",
           "element_sparsity", "nonzero_blocks", "total_blocks", "dense_bytes",
           "bsr_bytes")


class SparsityReport(list):
  """A list of row dicts (keys `COLUMNS`) that prints as a table."""

  def __str__(self):
    header = ("layer", "weight", "shape", "block", "block sp.", "elem sp.",
              "nnz blocks", "dense B", "BSR B")
    lines = []
    for r in self:
      lines.append((r["layer"], r["weight"], "x".join(map(str, r["shape"])),
                    "x".join(map(str, r["block_size"])),
                    f"{r['block_sparsity']:.1%}",
                    f"{r['element_sparsity']:.1%}",
                    f"{r['nonzero_blocks']}/{r['total_blocks']}",
                    str(r["dense_bytes"]), str(r["bsr_bytes"])))
    widths = [max(len(str(row[i])) for row in [header] + lines)
              for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*l) for l in lines])


def _layers_of(model):
  if isinstance(model, tf_keras.Model):
    for layer in model.layers:
      yield from _layers_of(layer)
  else:
    yield model


def _weights_of(model, block_size):
  """Yields `(layer name, weight path, numpy value, gates, block size)`."""
  if isinstance(model, (list, tuple)):
    layers = [l for m in model for l in _layers_of(m)]
  else:
    layers = list(_layers_of(model))
  for layer in layers:
    if not layer.built:
      continue
    if isinstance(layer, wrapper_lib.PruneBlockLowMagnitude):
      for mw in layer.masked_weights:
        value = _view(mw.weight.numpy() * mw.mask.numpy(), mw.row_axes)
        yield layer.name, mw.path, value, mw.gates, layer.block_size
    elif (not registry.is_left_dense(layer) and registry.is_supported(layer)
          and layer.weights):
      if block_size is None:
        raise ValueError(
            f"Layer '{layer.name}' is not wrapped for pruning, so its block "
            f"size is unknown: pass block_size=(bh, bw).")
      for w in registry.prunable_weights(layer):
        value = _view(w.variable.numpy(), w.row_axes)
        yield layer.name, w.path, value, w.gates, block_size


def _view(value, row_axes):
  # Weights with their own matrix view (depthwise, attention) are reported
  # in that view, so their blocks are the pruned ones.
  if row_axes is None:
    return value
  return value.reshape(block_masks.matrix_shape(value.shape, row_axes))


def _block_mask(value, gates, block_size):
  shape = block_masks.matrix_shape(value.shape)
  matrix = tf.constant(value.reshape(shape))
  return block_masks.representatives(matrix, block_size, "max",
                                     gates).numpy() > 0


def sparsity_report(model, block_size=None, print_fn=print):
  """Per-weight sparsity of a model, returned and printed as a table.

  Args:
    model: a tf_keras model, layer or list of layers, pruned (wrapped) or
      plain (e.g. after `strip_block_pruning`).
    block_size: block shape for layers that are not wrapped (required when
      there are any); wrapped layers use their own.
    print_fn: called with the table text; `None` prints nothing.

  Returns:
    A `SparsityReport` (list of dicts) with, per weight: `layer`, `weight`,
    `shape`, `block_size`, `block_sparsity` (fraction of blocks all zero),
    `element_sparsity`, `nonzero_blocks`, `total_blocks`, `dense_bytes` and
    `bsr_bytes` (storing each gate slice as a `BlockSparseMatrix`: values,
    int32 column indices and row pointers).

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> dense = tf_keras.layers.Dense(4); _ = dense(np.ones((1, 4), np.float32))
  >>> _ = dense.kernel.assign(np.diag([1., 0., 0., 0.]).astype(np.float32))
  >>> rows = tfbs.sparsity_report(dense, block_size=(2, 2), print_fn=None)
  >>> rows[0]["nonzero_blocks"], rows[0]["block_sparsity"]
  (1, 0.75)
  """
  if block_size is not None:
    block_size = block_masks.check_block_size(block_size)
  report = SparsityReport()
  for layer_name, path, value, gates, bs in _weights_of(model, block_size):
    blocks = _block_mask(value, gates, bs)
    nnzb, total = int(blocks.sum()), int(blocks.size)
    nbr = blocks.shape[1]
    itemsize = value.dtype.itemsize
    report.append({
        "layer": layer_name,
        "weight": path,
        "shape": tuple(value.shape),
        "block_size": tuple(bs),
        "block_sparsity": 1.0 - nnzb / total,
        "element_sparsity": float(np.mean(value == 0)),
        "nonzero_blocks": nnzb,
        "total_blocks": total,
        "dense_bytes": int(value.size * itemsize),
        "bsr_bytes": int(nnzb * (bs[0] * bs[1] * itemsize + 4) +
                         gates * 4 * (nbr + 1)),
    })
  if print_fn is not None:
    print_fn(str(report))
  return report


def plot_block_masks(model, path, block_size=None):
  """Writes a PNG with one panel per pruned weight showing its block mask.

  Dark cells are kept blocks, white cells pruned ones; gate slices are
  drawn side by side, separated by red lines. Needs matplotlib
  (`pip install matplotlib`).

  Args:
    model: as for `sparsity_report`.
    path: file to write (PNG).
    block_size: as for `sparsity_report`.

  Returns:
    `{"<layer>/<weight>": bool array [block rows, gates * block cols]}`, the
    masks drawn.

  Example:

  >>> import os, tempfile, numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> dense = tf_keras.layers.Dense(4, name="d")
  >>> _ = dense(np.ones((1, 6), np.float32))
  >>> out = os.path.join(tempfile.mkdtemp(), "masks.png")
  >>> tfbs.plot_block_masks(dense, out, block_size=2)["d/kernel"].shape
  (3, 2)
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("plot_block_masks needs matplotlib: pip install "
                      "matplotlib") from e
  if block_size is not None:
    block_size = block_masks.check_block_size(block_size)
  masks = {}
  gates_of = {}
  for layer_name, wpath, value, gates, bs in _weights_of(model, block_size):
    blocks = _block_mask(value, gates, bs)
    masks[f"{layer_name}/{wpath}"] = np.concatenate(list(blocks), axis=1)
    gates_of[f"{layer_name}/{wpath}"] = (gates, blocks.shape[2])
  if not masks:
    raise ValueError("The model has no prunable weights to plot.")
  fig, axes = plt.subplots(len(masks), 1, squeeze=False,
                           figsize=(6, 2.5 * len(masks)))
  for ax, (name, mask) in zip(axes[:, 0], masks.items()):
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              aspect="auto")
    gates, nbc = gates_of[name]
    for g in range(1, gates):
      ax.axvline(g * nbc - 0.5, color="red", linewidth=1)
    ax.set_title(f"{name}: {1 - mask.mean():.0%} of blocks pruned",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)
  return masks
