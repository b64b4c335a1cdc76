"""Smoke run of examples/block_term_sequences.py (--quick)."""

import importlib.util
import json
import math
import os

import numpy as np

_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                        "block_term_sequences.py")


def _load_example():
  spec = importlib.util.spec_from_file_location("block_term_sequences", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_frames_show_the_majority_digit():
  example = _load_example()
  glyphs = example.render_glyphs()
  assert glyphs.shape == (len(example.FONTS), 10, 32, 32)
  # Every glyph has ink, and different digits look different.
  assert (glyphs.reshape(-1, 1024).max(axis=1) > 0.5).all()
  assert not np.allclose(glyphs[0, 1], glyphs[0, 7])
  rng = np.random.default_rng(0)
  x, y = example.make_sequences(glyphs, 20, rng, noise=0.0, shift=0)
  assert x.shape == (20, example.STEPS, 1024)
  flat = glyphs.reshape(len(example.FONTS), 10, 1024)
  for seq, label in zip(x, y):
    # Without noise or shift each frame is exactly one template glyph.
    digits = [next(d for f in range(len(example.FONTS)) for d in range(10)
                   if np.array_equal(frame, flat[f, d])) for frame in seq]
    counts = np.bincount(digits, minlength=10)
    assert counts[label] == example.STEPS // 2
    assert counts.max() == counts[label] and (counts == counts.max()).sum() == 1


def test_quick_run_writes_table_json_and_png(tmp_path, capsys):
  example = _load_example()
  payload = example.main(["--quick", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert "| model | H | test accuracy |" in printed
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(payload))
  rows = {r["model"]: r for r in saved["results"]}
  assert set(rows) == {"dense", "dense-small", "bt", "bt-bsr", "block-sparse"}
  for row in rows.values():
    assert 0.0 <= row["accuracy"] <= 1.0 and row["inference_s"] > 0
    assert f"| {row['model']} |" in printed
  # Dense LSTM: 4H(I + H + 1) weights; BT LSTM: block-term formula for the
  # [1024, 256] input kernel + dense [64, 256] recurrent kernel + bias.
  assert rows["dense"]["rnn_params"] == 4 * 64 * (1024 + 64 + 1)
  rank, blocks = saved["rank"], saved["num_blocks"]
  in_modes, out_modes = (16, 8, 8), (8, 8, 4)
  bt = blocks * (sum(i * j * rank for i, j in zip(in_modes, out_modes)) +
                 rank ** 3)
  assert rows["bt"]["rnn_params"] == bt + 64 * 256 + 256
  assert rows["bt"]["input_kernel_compression"] == (1024 * 256) / bt
  assert math.isclose(rows["bt"]["compression"],
                      rows["dense"]["rnn_params"] / rows["bt"]["rnn_params"])
  assert rows["bt-bsr"]["rnn_params"] == bt + round(0.25 * 4 * 16) * 256 + 256
  assert os.path.getsize(tmp_path / "block_term_sequences.png") > 5000
