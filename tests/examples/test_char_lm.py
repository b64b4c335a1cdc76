"""examples/char_lm.py: data handling, measures and a tiny end-to-end run,
each against numpy or hand values."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _load_example():
  path = os.path.join(ROOT, "examples", "char_lm.py")
  spec = importlib.util.spec_from_file_location("char_lm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lm = _load_example()


def test_split_is_by_position_and_vocabulary_from_train():
  text = "".join(chr(ord("a") + i % 20) for i in range(1000)) + "XYZ" * 20
  train, valid, test = lm.split_text(text)
  assert train + valid + test == text
  assert (len(valid), len(test)) == (53, 53)      # 5 % of 1060
  vocab = lm.Vocabulary(train)
  assert len(vocab) == 21                          # 20 letters + unknown
  ids = vocab.encode("abX")
  assert ids.tolist() == [1, 2, 0]                 # X is not in train
  with pytest.raises(ValueError, match="too short"):
    lm.split_text("abc")


def test_windows_are_next_character_targets():
  ids = np.arange(23, dtype=np.int32)
  x, y = lm.windows(ids, 5)
  assert x.shape == y.shape == (4, 5)
  np.testing.assert_array_equal(x[2], [10, 11, 12, 13, 14])
  np.testing.assert_array_equal(y[2], [11, 12, 13, 14, 15])
  with pytest.raises(ValueError, match="no window"):
    lm.windows(ids[:3], 5)


def test_bits_per_char_uniform_model_is_log2_vocabulary():
  model = lm.build_model("lstm", 8, 13)
  model.set_weights([np.zeros_like(w) for w in model.get_weights()])
  x = np.random.RandomState(0).randint(0, 13, (5, 7))
  y = np.random.RandomState(1).randint(0, 13, (5, 7))
  assert lm.bits_per_char(model, x, y, 13, batch=2) == pytest.approx(
      math.log2(13), rel=1e-6)


def test_bits_per_char_matches_numpy_log_softmax():
  model = lm.build_model("gru", 8, 11, seed=4)
  rng = np.random.RandomState(2)
  x, y = rng.randint(0, 11, (6, 9)), rng.randint(0, 11, (6, 9))
  logits = model.predict(np.eye(11, dtype=np.float32)[x], verbose=0)
  logits = logits.astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  expected = -np.take_along_axis(logp, y[..., None], -1).mean() / np.log(2)
  assert lm.bits_per_char(model, x, y, 11, batch=4) == pytest.approx(
      expected, rel=1e-5)


def test_parameter_counts_and_matched_sparsity_by_hand():
  # LSTM(128) on 104 symbols: 4·128·(104+128) + 4·128 + 128·104 + 104.
  assert lm.model_params("lstm", 128, 104) == 132712
  assert lm.model_params("lstm", 128, 104) == lm.build_model(
      "lstm", 128, 104).count_params()
  assert lm.model_params("gru", 16, 10) == lm.build_model(
      "gru", 16, 10).count_params()
  # LSTM(256): RNN kernels 4·256·360 = 368640, the rest 27752, so it must
  # keep (132712 − 27752) / 368640 = 28.47 % -> 72 % sparsity (rounded up).
  assert lm.matched_sparsity("lstm", 128, 256, 104) == 0.72
  keep = 1 - 0.72
  assert 27752 + keep * 368640 <= 132712
  with pytest.raises(ValueError, match="cannot be pruned"):
    lm.matched_sparsity("lstm", 4, 256, 104)


def _np_block_sparsity(w, block, gates):
  k, n = w.shape
  g = n // gates
  zero = total = 0
  for gate in range(gates):
    part = w[:, gate * g:(gate + 1) * g]
    for r in range(0, k, block[0]):
      for c in range(0, g, block[1]):
        total += 1
        zero += int(not np.any(part[r:r + block[0], c:c + block[1]]))
  return zero, total


def test_zero_small_blocks_and_block_sparsity_against_numpy():
  model = lm.build_model("lstm", 6, 7)     # kernel 7x24, recurrent 6x24
  rnn = model.get_layer("rnn")
  rng = np.random.RandomState(0)
  for weight in (rnn.cell.kernel, rnn.cell.recurrent_kernel):
    w = rng.uniform(0.5, 1.0, weight.shape).astype(np.float32)
    w[rng.rand(*w.shape) < 0.5] *= 1e-4     # some blocks end up all tiny
    w[:4, :4] = 1e-4
    weight.assign(w)
  before = [rnn.cell.kernel.numpy(), rnn.cell.recurrent_kernel.numpy()]
  lm.zero_small_blocks(model, (4, 4), gates=4, tol=1e-3)
  zero = total = 0
  for old, weight in zip(before, (rnn.cell.kernel, rnn.cell.recurrent_kernel)):
    new = weight.numpy()
    k, n = old.shape
    g = n // 4
    for gate in range(4):
      for r in range(0, k, 4):
        for c in range(0, g, 4):
          cols = slice(gate * g + c, gate * g + min(c + 4, g))
          block = old[r:r + 4, cols]
          want = block if np.abs(block).max() >= 1e-3 else 0 * block
          np.testing.assert_array_equal(new[r:r + 4, cols], want)
    z, t = _np_block_sparsity(new, (4, 4), 4)
    zero, total = zero + z, total + t
  assert zero > 0
  assert lm.block_sparsity(model, (4, 4)) == pytest.approx(zero / total)


def test_tiny_run_end_to_end(tmp_path):
  text = tmp_path / "text.txt"
  rng = np.random.RandomState(0)
  words = ["block", "sparse", "recurrent", "network", "prune", "the", "a"]
  text.write_text(" ".join(rng.choice(words, 3000)), encoding="utf-8")
  out = tmp_path / "out"
  rows = lm.run(lm.parse_args([
      "--text", str(text), "--out", str(out), "--units", "16", "--epochs",
      "2", "--seq-len", "20", "--batch", "16", "--variants", "thr4_90",
      "--verbose", "0", "--time-budget", "0.02"]))
  saved = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in saved] == ["dense", "thr4_90"]
  keys = {"name", "block_size", "block_sparsity", "test_bpc",
          "nonzero_params", "savedmodel_bytes", "tflite_bytes",
          "speedup_vs_dense"}
  for row in saved:
    assert keys <= set(row)
  _, vocab, sets, _ = lm.prepare_data(lm.parse_args(
      ["--text", str(text), "--seq-len", "20", "--batch", "16"]))
  dense, sparse = saved
  assert dense["nonzero_params"] == lm.model_params("lstm", 16, len(vocab))
  assert sparse["block_size"] == [4, 4]
  assert 0.8 <= sparse["block_sparsity"] <= 1.0
  assert sparse["nonzero_params"] < 0.5 * dense["nonzero_params"]
  assert sparse["tflite_ratio"] == pytest.approx(
      sparse["tflite_bytes"] / dense["tflite_bytes"])
  assert sparse["speedup_vs_dense"] == pytest.approx(
      dense["inference_ms"] / sparse["inference_ms"])
  assert (out / "results.md").read_text().count("\n| ") == 2
  assert (out / "bpc_vs_params.png").stat().st_size > 1000
  # The exported best model computes the bpc the table reports.
  run = json.loads((out / "run.json").read_text())
  assert run["best_sparse"] == "thr4_90"
  loaded = tf.saved_model.load(str(out / "best" / "saved_model"))
  serve = loaded.signatures["serving_default"]
  x, y = sets[2]
  logits = list(serve(chars=tf.one_hot(x, len(vocab))).values())[0]
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
  assert float(tf.reduce_mean(ce)) / math.log(2) == pytest.approx(
      sparse["test_bpc"], rel=1e-4)
  assert rows[1]["test_bpc"] == sparse["test_bpc"]


def test_quiet_native_logs_hides_fd2_writes_but_not_python_stderr(capfd):
  import sys  # pylint: disable=import-outside-toplevel
  with lm.quiet_native_logs():
    os.write(2, b"native log line\n")     # as TensorFlow's C++ code writes
    print("python warning", file=sys.stderr)
  os.write(2, b"after the block\n")
  err = capfd.readouterr().err
  assert "native log line" not in err
  assert "python warning" in err and "after the block" in err


def test_quiet_native_logs_shows_the_log_when_the_block_fails(capfd):
  with pytest.raises(ValueError, match="conversion failed"):
    with lm.quiet_native_logs():
      os.write(2, b"converter said why\n")
      raise ValueError("conversion failed")
  assert "converter said why" in capfd.readouterr().err


def test_quick_run_trains_a_budget_of_steps_unless_epochs_are_given(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 2000,
                  encoding="utf-8")
  args = lm.parse_args(["--quick", "--text", str(text)])
  assert args.epochs is None
  _, _, sets, (_, _, steps_per_epoch) = lm.prepare_data(args)
  assert steps_per_epoch == len(sets[0][0]) // 32
  # 90,000 characters: 1,265 train windows of 64, 39 batches of 32 an epoch.
  assert steps_per_epoch == 39
  assert args.epochs == round(lm.QUICK_STEPS / 39) == 42
  given = lm.parse_args(["--quick", "--text", str(text), "--epochs", "3"])
  lm.prepare_data(given)
  assert given.epochs == 3
