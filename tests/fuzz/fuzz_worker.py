"""Runs one batch of fuzz cases in this process; the driver's subprocess.

  python tests/fuzz/fuzz_worker.py SUITE START COUNT PROGRESS_FILE [BASE_DIR]

Writes the seed of each case to PROGRESS_FILE before running it (so that the
driver knows which case killed the process), and one JSON line per case and
path to stdout. SUITE is raw, public, saved_model, or selftest (which
aborts at seed 3 and sleeps 1.5 s at seed 7, to test the driver).
"""

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
# The package under test: this worktree, or a sanitized copy of it.
sys.path[:0] = [os.environ.get("TFBS_FUZZ_PACKAGE_ROOT", _ROOT),
                os.path.join(_ROOT, "tests", "ops"), _HERE]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import warnings  # pylint: disable=wrong-import-position
warnings.filterwarnings("ignore")


def _paths(seed, isas, suite):
  custom = f"custom:{isas[seed % len(isas)]}" if isas else "custom"
  return [custom] if suite == "raw" else [custom, "fallback"]


# Address space of a worker (not under AddressSanitizer, whose shadow needs
# terabytes): the machine is shared, and a case that asks for gigabytes is
# a finding to report (MemoryError or ResourceExhausted, an "oom" outcome),
# not a reason to swap everyone out.
MEMORY_LIMIT = 8 << 30


def main(argv):
  suite, start, count, progress = argv[1], int(argv[2]), int(argv[3]), argv[4]
  if "libasan" not in os.environ.get("LD_PRELOAD", ""):
    import resource  # pylint: disable=import-outside-toplevel
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
  if suite == "selftest":  # the driver's own test: seed 3 kills the process
    for seed in range(start, start + count):
      _mark(progress, seed)
      if seed == 3:
        os.abort()
      if seed == 7:  # a slow case, to suspend in the middle
        import time  # pylint: disable=import-outside-toplevel
        time.sleep(1.5)
      print(json.dumps({"seed": seed, "op": "selftest", "path": "none",
                        "outcome": "ok", "detail": "", "mutation": "none",
                        "graph": False}), flush=True)
    print(json.dumps({"done": True}))
    return 0
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.get_logger().setLevel("ERROR")
  import tf_blocksparse as tfbs  # pylint: disable=import-outside-toplevel
  out = sys.stdout
  out.write(json.dumps({"package": tfbs.__file__}) + "\n")
  if suite == "saved_model":
    import fuzz_saved_model  # pylint: disable=import-outside-toplevel
    base = argv[5]
    for seed in range(start, start + count):
      _mark(progress, seed)
      for result in fuzz_saved_model.run_mutation(base, seed):
        out.write(json.dumps(result) + "\n")
      out.flush()
    out.write(json.dumps({"done": True}) + "\n")
    return 0
  import fuzz_cases  # pylint: disable=import-outside-toplevel
  info = tfbs.ops.kernel_info()
  isas = info.get("supported", []) if info.get("custom_ops") else []
  for seed in range(start, start + count):
    _mark(progress, seed)
    case = fuzz_cases.make_case(suite, seed)
    texts = {}
    for path in _paths(seed, isas, suite):
      outcome, detail, text = fuzz_cases.run_case(case, path)
      texts[path.split(":")[0]] = (outcome, text)
      out.write(json.dumps({"seed": seed, "op": case["op"], "path": path,
                            "outcome": outcome, "detail": detail,
                            "mutation": case["mutation"],
                            "graph": case["graph"]}) + "\n")
    # Both paths rejected: they must say the same thing.
    if len(texts) == 2:
      (a, ta), (b, tb) = texts["custom"], texts["fallback"]
      if a in ("rejected", "message") and b in ("rejected", "message") and ta != tb:
        out.write(json.dumps({"seed": seed, "op": case["op"], "path": "both",
                              "outcome": "disagree",
                              "detail": f"custom {ta[:200]!r} / fallback {tb[:200]!r}",
                              "mutation": case["mutation"],
                              "graph": case["graph"]}) + "\n")
    out.flush()
  out.write(json.dumps({"done": True}) + "\n")
  return 0


def _mark(progress, seed):
  with open(progress, "w") as f:
    f.write(str(seed))


if __name__ == "__main__":
  sys.exit(main(sys.argv))
