"""Installs tf_blocksparse and compiles its TensorFlow ops.

The op library must be compiled against the TensorFlow that will load it,
so the build imports the installed `tensorflow` for its flags. pip's
isolated build environment would not see it; install with

    pip install -r requirements.txt
    pip install --no-build-isolation -e .

Two libraries are built into `tf_blocksparse/ops/`:
- `_tf_blocksparse_ops`: op registrations and CPU kernels (always);
- `_tf_blocksparse_ops_gpu`: CUDA kernels, when `nvcc` is found (on PATH or
  in /usr/local/cuda/bin), linked against the static CUDA runtime so that
  the library still loads on a machine without CUDA. Set
  `TF_BLOCKSPARSE_CUDA=0` to skip it.
The arithmetic kernels are compiled once per instruction set (baseline
x86-64-v2, AVX2+FMA, AVX-512; `ops/cpu_isa.h`) into the same library, and
the widest one the CPU supports is chosen at run time, so one build runs on
any x86-64 machine (no `-march=native`). Elsewhere only the baseline is
built. `TF_BLOCKSPARSE_ISA` forces a path at run time.
"""

import concurrent.futures
import fnmatch
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension
from setuptools import find_packages
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


def _tf_flags():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
    self._compile_all(jobs)
    _run(["g++", "-shared", *objs, "-o", out, *tf_lflags])

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
    name="tf_blocksparse",
    version="0.1.0",
    description="Block-sparse recurrent networks for TensorFlow / tf_keras",
    packages=find_packages(include=["tf_blocksparse", "tf_blocksparse.*"]),
    python_requires=">=3.11",
    install_requires=[
        "tensorflow==2.21.*",
        "tf_keras==2.21.*",
        "tensorflow-model-optimization==0.8.1",
        "numpy",
        "absl-py",
    ],
    extras_require={"test": ["pytest"], "plot": ["matplotlib"]},
    ext_modules=[
        Extension("tf_blocksparse.ops._tf_blocksparse_ops", sources=[]),
        Extension("tf_blocksparse.ops._tf_blocksparse_ops_gpu", sources=[]),
    ],
    cmdclass={"build_ext": BuildTfOps},
    zip_safe=False,
)
