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


def _compiled_library():
  # The library of the package under test: after `pip install .` it is in
  # site-packages, not in the source tree.
  import glob  # pylint: disable=import-outside-toplevel
  import tf_blocksparse.ops  # pylint: disable=import-outside-toplevel
  found = glob.glob(os.path.join(os.path.dirname(tf_blocksparse.ops.__file__),
                                 "_tf_blocksparse_ops.*so"))
  return found[0] if found else None


def test_wide_instructions_live_only_in_the_isa_namespaces():
  """One build runs on any x86-64 CPU: only code the run-time dispatch calls
  after CPUID said yes (tfbs::isa_avx2 / isa_avx512) may hold AVX or
  AVX-512 instructions; everything else is baseline."""
  import platform  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  lib = _compiled_library()
  if lib is None or platform.machine() != "x86_64" or not shutil.which("objdump"):
    pytest.skip("needs the built x86-64 library and objdump")
  text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib],
                        capture_output=True, text=True, check=True).stdout
  wide = re.compile(r"%(ymm|zmm)\d+|%k[1-7]\b")
  per_function, function = {}, None
  for line in text.splitlines():
    head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if head:
      function = head.group(1)
    elif function and wide.search(line):
      per_function[function] = per_function.get(function, 0) + 1
  outside = [f for f in per_function if "isa_avx2" not in f and "isa_avx512" not in f]
  assert not outside, f"wide instructions outside the ISA namespaces: {outside[:5]}"
  assert any("isa_avx512" in f and "zmm" in text for f in per_function)
  assert any("isa_avx2" in f for f in per_function)
