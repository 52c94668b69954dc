"""Train, evaluate and measure a grid of models x corpora x budgets x seeds (hlm/compare.py):

  python compare.py benchmarks/grids/matched_compute.yaml          # run what is not done yet, then report
  python compare.py benchmarks/grids/matched_compute.yaml --list   # print every run's name, train and eval command
  python compare.py benchmarks/grids/matched_compute.yaml --only __enwiki__ __120s__   # a slice of the grid

Writes <out>/results.jsonl (one record per run), <out>/results.md and PNG charts (with matplotlib).
Run it again to resume: finished runs are kept, a half-trained run resumes from its checkpoint.
To spread a grid over machines, run slices with --only and concatenate their results.jsonl files
into <out>/results.jsonl: the report is rebuilt from every record there.
"""

import argparse
import sys

from hlm import HLMError
from hlm.compare import all_runs_listing, run_grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("--list", action="store_true", help="print the name and commands of every run and exit")
    p.add_argument("--only", nargs="+", default=[], metavar="PART",
                   help="run only the runs whose name contains every PART (names: see --list)")
    args = p.parse_args(argv)
    try:
        if args.list:
            print("\n".join(all_runs_listing(args.grid)))
            return 0
        summary = run_grid(args.grid, only=args.only)
    except HLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} run(s) failed: {', '.join(summary['failed'])} (see their train.log "
              "and eval.log; run again to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
