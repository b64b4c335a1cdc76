"""Sums fuzz campaign summaries (the JSON files fuzz_driver.py writes) into
one table of counts per suite, op and path.

  python tools/fuzz_summary.py build/fuzz/campaign-*.json [--suite raw]
      [--json out.json] [--md out.md]

`--suite` keeps only the given suites of a file (FILE:raw,saved_model), for
a campaign of which only some suites count (e.g. one whose public cases ran
on code changed since). Findings are listed with their seeds.
"""

import argparse
import collections
import json
import sys


def _spec(text):
  path, _, suites = text.partition(":")
  return path, (set(suites.split(",")) if suites else None)


def summarize(specs):
  counts = collections.defaultdict(collections.Counter)
  findings, sources = [], []
  for path, suites in specs:
    with open(path) as f:
      data = json.load(f)
    kept = 0
    for key, outcomes in data["counts"].items():
      if suites is None or key.split("/")[0] in suites:
        counts[key].update(outcomes)
        kept += sum(outcomes.values())
    findings += [f for f in data["findings"] if suites is None or f["suite"] in suites]
    sources.append({"file": path, "suites": sorted(suites) if suites else "all",
                    "label": data.get("label"), "first_seed": data.get("first_seed"),
                    "seconds": data.get("seconds"), "finished": data.get("finished"),
                    "runs_kept": kept})
  return counts, findings, sources


def table(counts):
  outcomes = sorted({o for c in counts.values() for o in c})
  lines = ["| suite/op/path | " + " | ".join(outcomes) + " |",
           "|---|" + "---|" * len(outcomes)]
  for key in sorted(counts):
    lines.append(f"| {key} | " + " | ".join(str(counts[key].get(o, 0)) for o in outcomes) + " |")
  total = collections.Counter()
  for c in counts.values():
    total.update(c)
  lines.append("| **all** | " + " | ".join(f"**{total.get(o, 0)}**" for o in outcomes) + " |")
  return "\n".join(lines), total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("files", nargs="+", type=_spec, help="FILE[:suite,suite]")
  parser.add_argument("--json", default=None)
  parser.add_argument("--md", default=None)
  args = parser.parse_args(argv)
  counts, findings, sources = summarize(args.files)
  text, total = table(counts)
  print(text)
  print(f"findings: {len(findings)}")
  for f in findings:
    print(f"  {f['suite']} seed {f['seed']} {f['op']} {f['path']}: {f['outcome']} {f['detail'][:120]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"sources": sources, "counts": counts, "total": total,
                 "findings": findings}, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text + "\n")
  return 1 if findings else 0


if __name__ == "__main__":
  sys.exit(main())
