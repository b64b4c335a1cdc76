#!/usr/bin/env bash
# Builds the CPU op library with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitized/ (never over the normal build), and lays out a copy of
# the package there that loads it. Then, with --fuzz ARGS..., runs the fuzzer
# against that copy with the sanitizer runtimes preloaded (the Python and
# TensorFlow binaries are not instrumented, so the runtimes must come first).
#
#   tools/build_sanitized.sh                      # build only
#   tools/build_sanitized.sh --fuzz --cases 2000  # build, then fuzz
#
# Any ASan report or UBSan finding aborts the process (halt_on_error), which
# the fuzz driver records as a crash and saves the case, so "0 crashes" under
# this build means "ASan/UBSan clean". The same source lists as setup.py
# (file-name conventions), -O1 -g for readable reports; every ISA copy of the
# arithmetic is built, so each forced ISA is checked too.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/build/sanitized"
OBJ="$OUT/obj"
PKG="$OUT/pkg"
mkdir -p "$OBJ"
cd "$ROOT"

SAN=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1)
# GCC 12 rejects absl's constexpr function-pointer comparisons (in the
# TensorFlow headers) under the null/nonnull checks: the files that include
# TensorFlow go without those three; the arithmetic keeps every check.
SAN_TF=(-fno-sanitize=null,nonnull-attribute,returns-nonnull-attribute)
read -r -a TF_CFLAGS <<<"$(python -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_compile_flags()))')"
read -r -a TF_LFLAGS <<<"$(python -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_link_flags()))')"
ISA_FLAGS=(-march=x86-64-v2 -mtune=generic)

build_one() {  # obj src flags...
  local obj="$1" src="$2"; shift 2
  if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ] || [ -n "$(find ops -name '*.h' -newer "$obj")" ]; then
    echo "compiling $src -> $(basename "$obj")"
    g++ "${SAN[@]}" "$@" -fPIC -c "$src" -o "$obj"
  fi
}

objs=()
pids=()
for src in ops/*_cpu_kernels.cc; do
  for isa in 0:baseline 1:avx2 2:avx512; do
    obj="$OBJ/$(basename "$src").${isa#*:}.o"
    build_one "$obj" "$src" -std=c++17 "${ISA_FLAGS[@]}" "-DTFBS_CPU_ISA=${isa%%:*}" & pids+=($!)
    objs+=("$obj")
  done
done
for src in ops/cpu_*.cc; do
  obj="$OBJ/$(basename "$src").o"
  build_one "$obj" "$src" -std=c++17 "${ISA_FLAGS[@]}" & pids+=($!)
  objs+=("$obj")
done
for src in ops/*_ops.cc ops/*_kernels.cc; do
  case "$src" in *_cpu_kernels.cc) continue ;; esac
  obj="$OBJ/$(basename "$src").o"
  build_one "$obj" "$src" -Wno-deprecated-declarations "${TF_CFLAGS[@]}" "${SAN_TF[@]}" & pids+=($!)
  objs+=("$obj")
  # two compiles at a time: the machine is shared
  if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[@]}"; pids=(); fi
done
wait "${pids[@]}" 2>/dev/null || true
for o in "${objs[@]}"; do [ -e "$o" ] || { echo "missing $o" >&2; exit 1; }; done

# A package copy: symlinks to the sources, the sanitized library in ops/.
rm -rf "$PKG"
mkdir -p "$PKG/tf_blocksparse/ops"
for entry in tf_blocksparse/*; do
  [ "$(basename "$entry")" = ops ] && continue
  ln -s "$ROOT/$entry" "$PKG/$entry"
done
for f in tf_blocksparse/ops/*.py; do ln -s "$ROOT/$f" "$PKG/$f"; done
g++ -shared "${SAN[@]}" "${objs[@]}" -o "$PKG/tf_blocksparse/ops/_tf_blocksparse_ops.so" "${TF_LFLAGS[@]}"
echo "sanitized library: $PKG/tf_blocksparse/ops/_tf_blocksparse_ops.so"

if [ "${1:-}" = "--fuzz" ]; then
  shift
  export TFBS_FUZZ_PACKAGE_ROOT="$PKG"
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  # Leaks: Python and TensorFlow keep allocations until exit by design.
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
  exec python "$ROOT/tests/fuzz/fuzz_driver.py" --label sanitized "$@"
fi
