"""setup.py and the Bazel BUILD file compile the same sources."""

import fnmatch
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patterns(name):
  found = re.findall(r"\"(ops/[^\"]+)\"", open(os.path.join(ROOT, name)).read())
  return {p for p in found if p.endswith((".cc", ".cu"))}  # headers are not compiled


def test_build_patterns_match_setup_py():
  assert _patterns("BUILD") == _patterns("setup.py")


def test_every_source_file_is_matched_by_a_pattern():
  patterns = _patterns("setup.py")
  for name in os.listdir(os.path.join(ROOT, "ops")):
    if name.endswith((".cc", ".cu")):
      path = "ops/" + name
      assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is never compiled"
