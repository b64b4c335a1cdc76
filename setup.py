"""Builds tf_blocksparse and compiles its TensorFlow ops.

`pip install .` (or `pip install -e .`, `pip wheel .`, `python -m build`)
is all it takes: pyproject.toml asks pip for setuptools and the pinned
TensorFlow in its isolated build environment, and the op library is compiled
against that TensorFlow, the same release that the package then requires
and checks at import (`tf_blocksparse/_tf_version.py`: its C++ ABI changes
between minor releases). With `--no-build-isolation`, install
`requirements.txt` first.

Two libraries are built into `tf_blocksparse/ops/`:
- `_tf_blocksparse_ops`: op registrations and CPU kernels (always). A
  missing source, a compile error or a library that does not register every
  op stops the build with a message: an incomplete library must never be
  installed.
- `_tf_blocksparse_ops_gpu`: CUDA kernels, when `nvcc` is found (on PATH or
  in /usr/local/cuda/bin), linked against the static CUDA runtime so that
  the library still loads on a machine without CUDA. Set
  `TF_BLOCKSPARSE_CUDA=0` to skip it; if it fails to build, the build goes
  on without it (the CPU library is complete) and says so.
The arithmetic kernels are compiled once per instruction set (baseline
x86-64-v2, AVX2+FMA, AVX-512; `ops/cpu_isa.h`) into the same library, and
the widest one the CPU supports is chosen at run time, so one build runs on
any x86-64 machine (no `-march=native`). Elsewhere only the baseline is
built. `TF_BLOCKSPARSE_ISA` forces a path at run time.

Package metadata is in pyproject.toml; this file only builds the libraries.
"""

import concurrent.futures
import fnmatch
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# Sources of each library, by file-name convention (the Bazel BUILD file
# uses the same patterns, so both builds always compile the same files):
#   ops/*_cpu_kernels.cc  arithmetic, no TensorFlow header, compiled once per
#                         ISA (-DTFBS_CPU_ISA=N; the file switches the ISA on
#                         after its system headers, see ops/cpu_isa.h);
#   ops/cpu_*.cc          the run-time ISA choice, no TensorFlow header,
#                         baseline flags;
#   ops/*_ops.cc, ops/*_kernels.cc  op registrations and CPU OpKernels;
#   ops/*.cu, ops/*_gpu.cc          CUDA kernels and their GPU OpKernels.
def _sources(pattern, exclude=()):
  found = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
  return [p for p in found if not any(fnmatch.fnmatch(p, e) for e in exclude)]


CPU_ARITHMETIC_SOURCES = _sources("ops/*_cpu_kernels.cc")
CPU_DISPATCH_SOURCES = _sources("ops/cpu_*.cc")
CPU_TF_SOURCES = (_sources("ops/*_ops.cc") +
                  _sources("ops/*_kernels.cc", exclude=["ops/*_cpu_kernels.cc"]))
GPU_CUDA_SOURCES = _sources("ops/*.cu")
GPU_TF_SOURCES = _sources("ops/*_gpu.cc")
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _is_x86_64():
  import platform  # pylint: disable=import-outside-toplevel
  return platform.machine().lower() in ("x86_64", "amd64")


def cpu_isas():
  """(value of TFBS_CPU_ISA, name) of every ISA this build compiles."""
  return [(0, "baseline"), (1, "avx2"), (2, "avx512")] if _is_x86_64() else [(0, "baseline")]


def baseline_flags():
  # The oldest CPU the library runs on; the wider ISAs are enabled per
  # function by the sources themselves.
  return ["-march=x86-64-v2", "-mtune=generic"] if _is_x86_64() else []


class BuildError(RuntimeError):
  """The op library cannot be built; the message says why and what to do."""


def tf_series():
  """TF_SERIES of tf_blocksparse/_tf_version.py, read without importing it."""
  with open(os.path.join(HERE, "tf_blocksparse", "_tf_version.py"), encoding="utf-8") as f:
    return re.search(r'^TF_SERIES = "([0-9.]+)"', f.read(), re.M).group(1)


def registered_ops():
  """Python names of the ops ops/*_ops.cc register (`TfbsBsrMatmul` ->
  `tfbs_bsr_matmul`), which the built library must provide."""
  names = []
  for src in CPU_TF_SOURCES:
    with open(os.path.join(HERE, src), encoding="utf-8") as f:
      names += re.findall(r'REGISTER_OP\("(\w+)"\)', f.read())
  return [re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower() for n in names]


def _tensorflow():
  series = tf_series()
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise BuildError(
        f"building the tf_blocksparse ops needs TensorFlow {series} in the "
        f"build environment, and it cannot be imported ({e}). Install with "
        "build isolation on (`pip install .`: pyproject.toml brings it), or "
        "with --no-build-isolation install the pinned stack first: "
        "`pip install -r requirements.txt`.") from e
  found = re.match(r"\d+\.\d+", tf.__version__).group(0)
  if found != series:
    raise BuildError(
        f"the build environment has TensorFlow {tf.__version__}, but "
        f"tf_blocksparse is built for and requires TensorFlow {series}.x (the "
        f"op library is tied to its C++ ABI): `pip install \"tensorflow=={series}.*\"` "
        "in the build environment, or build with isolation on.")
  return tf


def _tf_flags():
  tf = _tensorflow()
  return tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()


def _nvcc():
  if os.environ.get("TF_BLOCKSPARSE_CUDA", "1") == "0":
    return None
  return shutil.which("nvcc") or next(
      (p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


def _cuda_home(nvcc):
  """The toolkit folder holding lib64/libcudart_static.a."""
  candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                "/usr/local/cuda"]
  for home in filter(None, candidates):
    if os.path.exists(os.path.join(home, "lib64", "libcudart_static.a")):
      return home
  raise OSError("libcudart_static.a not found; set CUDA_HOME")


def _run(cmd):
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=HERE)


def _check_library(path, expected):
  """Loads the built library and checks that every op is registered."""
  lib = _tensorflow().load_op_library(path)
  missing = [op for op in expected if not hasattr(lib, op)]
  if missing:
    raise BuildError(f"{path} was built but does not register {missing}")


class BuildTfOps(build_ext):
  """Builds the op libraries with g++/nvcc instead of distutils' compiler."""

  def build_extensions(self):
    for ext in list(self.extensions):
      if not ext.name.endswith("_gpu"):
        self.build_extension(ext)
        continue
      try:
        built = self.build_extension(ext)
      except (subprocess.CalledProcessError, OSError) as e:
        # The CPU library is complete without it; say so and go on.
        print(f"WARNING: CUDA kernels not built ({e}); CPU kernels only.",
              file=sys.stderr)
        built = False
      if not built:  # nothing to copy or install for it
        self.extensions.remove(ext)

  def build_extension(self, ext):
    out = self.get_ext_fullpath(ext.name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(self.build_temp, ext.name.replace(".", "_"))
    os.makedirs(tmp, exist_ok=True)
    if ext.name.endswith("_gpu"):
      return self._build_gpu(out, tmp)
    self._build_cpu(out, tmp)
    return True

  def _compile_all(self, jobs):
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
      list(pool.map(_run, jobs))

  def _build_cpu(self, out, tmp):
    groups = {"ops/*_cpu_kernels.cc": CPU_ARITHMETIC_SOURCES,
              "ops/cpu_*.cc": CPU_DISPATCH_SOURCES, "ops/*_ops.cc": CPU_TF_SOURCES}
    empty = [pattern for pattern, found in groups.items() if not found]
    if empty or not registered_ops():
      raise BuildError(
          f"no C++ sources match {empty or 'ops/*_ops.cc with REGISTER_OP'} "
          f"under {HERE}: this source tree or source distribution is "
          "incomplete (an sdist must carry ops/, see MANIFEST.in). Install "
          "from the git repository or a complete sdist.")
    tf_cflags, tf_lflags = _tf_flags()
    objs, jobs = [], []
    for src in CPU_ARITHMETIC_SOURCES:
      for isa, name in cpu_isas():
        obj = os.path.join(tmp, f"{os.path.basename(src)}.{name}.o")
        jobs.append(["g++", "-std=c++17", "-O3", *baseline_flags(), "-fPIC",
                     f"-DTFBS_CPU_ISA={isa}", "-c", src, "-o", obj])
        objs.append(obj)
    for src in CPU_DISPATCH_SOURCES:
      obj = os.path.join(tmp, os.path.basename(src) + ".o")
      jobs.append(["g++", "-std=c++17", "-O2", *baseline_flags(), "-fPIC",
                   "-c", src, "-o", obj])
      objs.append(obj)
    for src in CPU_TF_SOURCES:
      obj = os.path.join(tmp, os.path.basename(src) + ".o")
      jobs.append(["g++", "-O2", "-fPIC", "-Wno-deprecated-declarations",
                   *tf_cflags, "-c", src, "-o", obj])
      objs.append(obj)
    try:
      self._compile_all(jobs)
      _run(["g++", "-shared", *objs, "-o", out, *tf_lflags])
    except (subprocess.CalledProcessError, OSError) as e:
      raise BuildError(
          f"building the CPU op library failed ({e}); the compiler's messages "
          "are above. It is required (g++ with C++17), so the install stops "
          "here rather than install a package without it.") from e
    _check_library(out, registered_ops())

  def _build_gpu(self, out, tmp):
    nvcc = _nvcc()
    if nvcc is None:
      print("nvcc not found: building without CUDA kernels.")
      return False
    tf_cflags, tf_lflags = _tf_flags()
    cuda_home = _cuda_home(nvcc)
    objs, jobs = [], []
    for src in GPU_CUDA_SOURCES:
      obj = os.path.join(tmp, os.path.basename(src) + ".o")
      jobs.append([nvcc, "-std=c++17", "-O3", *CUDA_ARCH_FLAGS,
                   "-Xcompiler", "-fPIC", "-c", src, "-o", obj])
      objs.append(obj)
    for src in GPU_TF_SOURCES:
      obj = os.path.join(tmp, os.path.basename(src) + ".o")
      jobs.append(["g++", "-O2", "-fPIC", "-Wno-deprecated-declarations",
                   "-DGOOGLE_CUDA=1", *tf_cflags, "-c", src, "-o", obj])
      objs.append(obj)
    self._compile_all(jobs)
    _run(["g++", "-shared", *objs, "-o", out, *tf_lflags,
          f"-L{cuda_home}/lib64", "-l:libcudart_static.a", "-ldl", "-lrt",
          "-lpthread"])
    return True


setup(
    ext_modules=[
        Extension("tf_blocksparse.ops._tf_blocksparse_ops", sources=[]),
        Extension("tf_blocksparse.ops._tf_blocksparse_ops_gpu", sources=[]),
    ],
    cmdclass={"build_ext": BuildTfOps},
    zip_safe=False,
)
