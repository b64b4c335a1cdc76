"""The bounded fuzz run of the test command (about a minute on 2 cores).

Fixed seeds, so a failure reproduces: `python tests/fuzz/fuzz_driver.py`
runs the long campaign over other seeds. Every batch runs in a subprocess;
a crash or hang there is a finding with its case saved.
"""

import json
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import fuzz_cases  # pylint: disable=wrong-import-position
import fuzz_driver  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
  crash_dir = str(tmp_path_factory.mktemp("crashes"))
  return fuzz_driver.campaign(cases=400, mutations=20, batch=400,
                              first_seed=0, timeout=300, crash_dir=crash_dir,
                              log=lambda s: None)


def test_no_crash_hang_or_wrong_result(campaign):
  assert campaign.findings == [], campaign.findings[:5]


def test_workers_tested_the_package_this_process_imports(campaign):
  # Under CI the package is installed and the source tree has no compiled
  # library: workers that imported the source tree would test the fallback
  # only and call it the custom path.
  import tf_blocksparse  # pylint: disable=import-outside-toplevel
  assert os.path.realpath(campaign.package) == os.path.realpath(tf_blocksparse.__file__)


def test_every_op_and_path_ran_valid_and_malformed_cases(campaign):
  # Guard against a run that passes by testing nothing: each op on each of
  # its paths computed some valid cases and rejected some malformed ones.
  for suite, ops, paths in (("raw", fuzz_cases.RAW_OPS, ["custom"]),
                            ("public", fuzz_cases.PUBLIC_OPS, ["custom", "fallback"])):
    for op in ops:
      for path in paths:
        counts = campaign.counts[f"{suite}/{op}/{path}"]
        assert counts["ok"] > 0 and counts["rejected"] > 0, (suite, op, path, counts)


def test_saved_model_mutations_ran_for_both_modes(campaign):
  for mode in ("portable", "custom_op"):
    ran = sum(sum(c.values()) for key, c in campaign.counts.items()
              if key.startswith("saved_model/") and key.endswith("/" + mode))
    assert ran >= 10, (mode, dict(campaign.counts))


def test_a_crashing_case_is_caught_and_saved(tmp_path):
  result = fuzz_driver.Campaign(str(tmp_path))
  fuzz_driver.run_batch(result, "selftest", 0, 6, timeout=60)
  assert result.counts["selftest/selftest/none"]["ok"] == 5  # 0-2 and 4-5
  assert [f["seed"] for f in result.findings] == [3]
  assert result.findings[0]["outcome"] == "crash"
  assert os.path.exists(tmp_path / "selftest-3-crash.txt")


def test_a_suspended_worker_is_not_a_hang(tmp_path):
  # A worker stopped (SIGSTOP, a paused job) for longer than the timeout in
  # the middle of a slow case is not a hang: the suspension is not the case's.
  import signal  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  result = fuzz_driver.Campaign(str(tmp_path))
  run = threading.Thread(target=fuzz_driver.run_batch,
                         args=(result, "selftest", 7, 1), kwargs={"timeout": 2})
  run.start()
  worker = None
  for _ in range(100):
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          args = f.read().split(b"\0")
      except OSError:
        continue
      if b"selftest" in args and any(a.endswith(b"fuzz_worker.py") for a in args):
        worker = int(pid)
    if worker:
      break
    time.sleep(0.05)
  assert worker, "the selftest worker did not start"
  time.sleep(0.3)
  os.kill(worker, signal.SIGSTOP)
  time.sleep(4)  # twice the timeout
  os.kill(worker, signal.SIGCONT)
  run.join(60)
  assert result.findings == []
  assert result.counts["selftest/selftest/none"]["ok"] == 1


def test_summary_sums_campaigns_and_keeps_the_suites_asked_for(tmp_path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "fuzz_summary", os.path.join(_HERE, "..", "..", "tools", "fuzz_summary.py"))
  summary = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(summary)
  finding = {"suite": "public", "seed": 5, "op": "bsr_matmul", "path": "fallback",
             "outcome": "wrong", "detail": ""}
  runs = [{"counts": {"raw/raw_matmul/custom": {"ok": 3, "rejected": 1},
                      "public/bsr_matmul/fallback": {"ok": 2}},
           "findings": [finding]},
          {"counts": {"raw/raw_matmul/custom": {"ok": 4}}, "findings": []}]
  paths = []
  for i, run in enumerate(runs):
    paths.append(str(tmp_path / f"c{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(run, f)
  counts, findings, _ = summary.summarize([(paths[0], {"raw"}), (paths[1], None)])
  assert dict(counts) == {"raw/raw_matmul/custom": {"ok": 7, "rejected": 1}}
  assert findings == []  # the public suite of the first file was left out
  counts, findings, _ = summary.summarize([(p, None) for p in paths])
  assert counts["public/bsr_matmul/fallback"] == {"ok": 2} and findings == [finding]
