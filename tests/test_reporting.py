"""sparsity_report and plot_block_masks against numpy and BlockSparseMatrix."""

import numpy as np
import pytest
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import np_blocks

L = tf_keras.layers


def _pruned_gru_model():
  layer = tfbs.prune_block_low_magnitude(
      L.GRU(5), block_size=(2, 2),
      pruning_schedule=tfbs.schedules.ConstantSparsity(0.6, 0, frequency=1))
  dense = L.Dense(3, name="head")
  model = tf_keras.Sequential([tf_keras.Input((2, 3)), layer, dense])
  model.compile("sgd", "mse", run_eagerly=True)
  model.fit(np.ones((2, 2, 3)), np.ones((2, 3)), verbose=0,
            callbacks=[tfbs.UpdatePruningStep()])
  return model, layer


def _bsr_bytes(value, gates, bs):
  """Reference: the gate slices stored as the lead's BlockSparseMatrix."""
  m = value.reshape(-1, value.shape[-1])
  u = m.shape[1] // gates
  return sum(int(tfbs.BlockSparseMatrix.from_dense(
      m[:, g * u:(g + 1) * u], bs).nbytes) for g in range(gates))


def test_report_rows_match_numpy():
  model, layer = _pruned_gru_model()
  head = np.zeros([5, 3], np.float32)
  head[0, 0], head[4, 2] = 1.0, 2.0
  model.layers[1].kernel.assign(head)
  printed = []
  rows = tfbs.sparsity_report(model, block_size=(2, 2),
                              print_fn=printed.append)
  assert [(r["layer"], r["weight"]) for r in rows] == [
      (layer.name, "cell_kernel"), (layer.name, "cell_recurrent_kernel"),
      ("head", "kernel")]
  values = [mw.weight.numpy() * mw.mask.numpy() for mw in layer.masked_weights]
  values.append(head)
  for row, value, gates in zip(rows, values, [3, 3, 1]):
    blocks = np_blocks.block_mask_of_values(value, (2, 2), gates)
    assert row["shape"] == value.shape
    assert row["block_size"] == (2, 2)
    assert row["nonzero_blocks"] == blocks.sum()
    assert row["total_blocks"] == blocks.size
    assert row["block_sparsity"] == pytest.approx(1 - blocks.mean())
    assert row["element_sparsity"] == pytest.approx(np.mean(value == 0))
    assert row["dense_bytes"] == value.size * 4
    assert row["bsr_bytes"] == _bsr_bytes(value, gates, (2, 2))
  # GRU kernel [3, 15]: 3 gates x 2 x 3 blocks = 18, 60% pruned -> 7 kept
  assert rows[0]["total_blocks"] == 18 and rows[0]["nonzero_blocks"] == 7
  # [5, 3] in 2x2 blocks (3 x 2, partial edges): (0, 0) and (2, 1) non-zero
  assert rows[2]["nonzero_blocks"] == 2
  assert "cell_recurrent_kernel" in printed[0] and "BSR" in printed[0]


def test_report_needs_block_size_for_plain_layers():
  model, _ = _pruned_gru_model()
  with pytest.raises(ValueError, match="'head'.*block_size"):
    tfbs.sparsity_report(model, print_fn=None)
  stripped = tfbs.strip_block_pruning(model)
  rows = tfbs.sparsity_report(stripped, block_size=(2, 2), print_fn=None)
  assert rows[0]["block_sparsity"] == pytest.approx(11 / 18)


def test_plot_block_masks(tmp_path):
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  model, layer = _pruned_gru_model()
  path = str(tmp_path / "masks.png")
  masks = tfbs.plot_block_masks(model, path, block_size=(2, 2))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert image.imread(path).ndim == 3
  mw = layer.masked_weights[0]
  blocks = np_blocks.block_mask_of_values(mw.weight.numpy(), (2, 2), 3)
  np.testing.assert_array_equal(masks[f"{layer.name}/cell_kernel"],
                                np.concatenate(list(blocks), axis=1))
  assert masks["head/kernel"].shape == (3, 2)
