"""Fuzz campaigns: batches of cases, each batch in a subprocess.

A worker that dies (a signal, an abort, a sanitizer report), or whose case
runs past the per-case timeout, is a crash or a hang: the case it was running is saved (its
seed, and its inputs as .npz) under the crash directory, and the campaign
goes on from the next seed. Every other outcome is counted per op and path
(see fuzz_cases). The long campaign:

  python tests/fuzz/fuzz_driver.py --cases 100000 --mutations 2000 \\
      --json build/fuzz/campaign.json

and under AddressSanitizer/UndefinedBehaviorSanitizer:

  tools/build_sanitized.sh --fuzz --cases 20000 --mutations 400
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
WORKER = os.path.join(_HERE, "fuzz_worker.py")


class Campaign:
  """Counts of one campaign: outcomes by (suite, op, path), findings listed."""

  def __init__(self, crash_dir):
    self.counts = collections.defaultdict(collections.Counter)
    self.findings = []
    self.crash_dir = crash_dir
    self.package = None

  def add(self, suite, record):
    key = f"{suite}/{record['op']}/{record['path'].split(':')[0]}"
    self.counts[key][record["outcome"]] += 1
    if record["outcome"] in FINDINGS:
      self.findings.append({"suite": suite, **record})

  def total(self, outcomes=None):
    return sum(n for c in self.counts.values() for o, n in c.items()
               if outcomes is None or o in outcomes)

  def summary(self):
    return {"package": self.package,
            "counts": {k: dict(v) for k, v in sorted(self.counts.items())},
            "findings": self.findings[:200],
            "num_findings": len(self.findings)}


def package_root():
  """The folder holding the tf_blocksparse this process would import.

  The workers put it first on their sys.path, so they test the same copy as
  the caller: the installed package under CI (whose source tree has no
  compiled library), the source tree in a developer's in-place build, or a
  sanitized copy when TFBS_FUZZ_PACKAGE_ROOT names one.
  """
  if os.environ.get("TFBS_FUZZ_PACKAGE_ROOT"):
    return os.environ["TFBS_FUZZ_PACKAGE_ROOT"]
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("tf_blocksparse")
  if spec is None or not spec.origin:
    return _ROOT
  return os.path.dirname(os.path.dirname(spec.origin))


def _child_env(env=None):
  env = dict(os.environ if env is None else env)
  env["TFBS_FUZZ_PACKAGE_ROOT"] = env.get("TFBS_FUZZ_PACKAGE_ROOT") or package_root()
  return env


# Outcomes that break the contract (crash and hang come from the driver).
FINDINGS = ("wrong", "silent", "refused", "message", "unexpected", "oom",
            "disagree", "crash", "hang", "harness_error")


def run_batch(campaign, suite, start, count, timeout, base_dir=None, env=None):
  """Runs seeds [start, start + count) in workers until all are done.

  `timeout` is per case: a worker whose current case (its progress file)
  has not changed for that long is killed and the case counted as a hang.
  """
  seed = start
  end = start + count
  while seed < end:
    with tempfile.NamedTemporaryFile("w", suffix=".seed", delete=False) as f:
      progress = f.name
    out = tempfile.TemporaryFile("w+")
    err = tempfile.TemporaryFile("w+")
    cmd = [sys.executable, WORKER, suite, str(seed), str(end - seed), progress]
    if base_dir:
      cmd.append(base_dir)
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_child_env(env), cwd=_ROOT)
    hung = False
    last = time.time()
    while proc.poll() is None:
      time.sleep(0.5)
      now = time.time()
      if now - last > 5 or _stopped(proc.pid):
        # This driver or the worker was suspended (SIGSTOP, a paused job):
        # that time is not the case's, so its clock restarts.
        os.utime(progress)
      last = now
      if now - os.path.getmtime(progress) > timeout:
        proc.kill()
        proc.wait()
        hung = True
    rc = proc.returncode
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    done = False
    for line in stdout.splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if "package" in record:
        campaign.package = record["package"]
      elif record.get("done"):
        done = True
      else:
        campaign.add(suite, record)
    if done and rc == 0:
      os.unlink(progress)
      return
    with open(progress) as f:
      text = f.read().strip()
    os.unlink(progress)
    failed = int(text) if text else seed
    # A Python exception in the harness exits with 1; a crash is a signal
    # (SIGSEGV, SIGABRT from a CHECK or a sanitizer report) or another code.
    outcome = ("hang" if hung else "harness_error"
               if rc == 1 and "Traceback" in stderr else "crash")
    _save(campaign, suite, failed, outcome, rc, stderr[-4000:])
    seed = failed + 1


def _stopped(pid):
  """Whether process `pid` is stopped (state T or t in /proc), where known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
  except (OSError, IndexError):
    return False


def _save(campaign, suite, seed, outcome, rc, stderr):
  os.makedirs(campaign.crash_dir, exist_ok=True)
  stem = os.path.join(campaign.crash_dir, f"{suite}-{seed}-{outcome}")
  with open(stem + ".txt", "w") as f:
    f.write(f"suite {suite} seed {seed} outcome {outcome} rc {rc}\n\n{stderr}")
  if suite != "saved_model":
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests", "ops"), _HERE]
    try:  # the case's inputs (numpy only: safe to rebuild here)
      import numpy as np  # pylint: disable=import-outside-toplevel
      import fuzz_cases  # pylint: disable=import-outside-toplevel
      case = fuzz_cases.make_case(suite, seed)
      arrays = {k: v for k, v in case.items() if isinstance(v, np.ndarray)}
      np.savez(stem + ".npz", **arrays, meta=json.dumps(
          {k: v for k, v in case.items() if not isinstance(v, (np.ndarray, list))},
          default=str))
    except Exception as e:  # pylint: disable=broad-except
      with open(stem + ".txt", "a") as f:
        f.write(f"\n(could not rebuild the case: {e})\n")
  campaign.counts[f"{suite}/seed/driver"][outcome] += 1
  campaign.findings.append({"suite": suite, "seed": seed, "outcome": outcome,
                            "rc": rc, "path": "driver", "op": "?",
                            "detail": stderr[-500:]})


def campaign(cases, mutations, batch=250, first_seed=0, timeout=300,
             crash_dir=None, log=print, raw_fraction=0.5, after_batch=None):
  """Runs `cases` op cases (`raw_fraction` of them on the raw ops, the rest
  on the public functions, both paths) and `mutations` SavedModel
  mutations; returns the Campaign. `after_batch(campaign)` runs after each
  batch (the long run writes its summary there)."""
  crash_dir = crash_dir or os.path.join(_ROOT, "build", "fuzz", "crashes")
  result = Campaign(crash_dir)
  started = time.time()
  after_batch = after_batch or (lambda _: None)
  raw = int(cases * raw_fraction)
  for suite, n in (("raw", raw), ("public", cases - raw)):
    for start in range(first_seed, first_seed + n, batch):
      run_batch(result, suite, start, min(batch, first_seed + n - start), timeout)
      log(f"[{time.time() - started:7.0f}s] {suite} up to {start + batch}: "
          f"{result.total()} runs, {len(result.findings)} findings")
      after_batch(result)
  if mutations:
    import fuzz_saved_model  # pylint: disable=import-outside-toplevel
    base = tempfile.mkdtemp(prefix="tfbs_fuzz_sm_")
    prepared = subprocess.run([sys.executable, fuzz_saved_model.__file__, "prepare", base],
                              capture_output=True, text=True, cwd=_ROOT,
                              env=_child_env())
    if prepared.returncode != 0:
      raise RuntimeError(f"preparing the SavedModels failed:\n{prepared.stderr[-3000:]}")
    sm_batch = max(1, batch // 5)
    for start in range(first_seed, first_seed + mutations, sm_batch):
      run_batch(result, "saved_model", start,
                min(sm_batch, first_seed + mutations - start), timeout, base_dir=base)
      log(f"[{time.time() - started:7.0f}s] saved_model up to {start + sm_batch}: "
          f"{len(result.findings)} findings")
      after_batch(result)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", type=int, default=2000)
  parser.add_argument("--mutations", type=int, default=100)
  parser.add_argument("--batch", type=int, default=250)
  parser.add_argument("--first-seed", type=int, default=0)
  parser.add_argument("--timeout", type=int, default=300,
                      help="seconds one case may take before it counts as a hang")
  parser.add_argument("--label", default="plain")
  parser.add_argument("--raw-fraction", type=float, default=0.5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  sys.path[:0] = [_HERE]
  crash_dir = os.path.join(_ROOT, "build", "fuzz", f"crashes-{args.label}")
  started = time.time()
  path = args.json or os.path.join(_ROOT, "build", "fuzz", f"campaign-{args.label}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)

  def write(result, finished=False):
    summary = result.summary()
    summary.update(label=args.label, seconds=round(time.time() - started),
                   cases=args.cases, mutations=args.mutations,
                   first_seed=args.first_seed, finished=finished)
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)

  result = campaign(args.cases, args.mutations, args.batch, args.first_seed,
                    args.timeout, crash_dir,
                    log=lambda s: print(s, file=sys.stderr, flush=True),
                    raw_fraction=args.raw_fraction, after_batch=write)
  write(result, finished=True)
  print(f"{'suite/op/path':44s} " + " ".join(f"{o:>9s}" for o in _COLUMNS))
  for key, counter in sorted(result.counts.items()):
    print(f"{key:44s} " + " ".join(f"{counter.get(o, 0):9d}" for o in _COLUMNS))
  print(f"findings: {len(result.findings)}  (details in {path})")
  return 1 if result.findings else 0


_COLUMNS = ("ok", "rejected", "load_error", "changed") + FINDINGS


if __name__ == "__main__":
  sys.exit(main())
