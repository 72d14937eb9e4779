"""`python -m bench [NAME ...]`: run the benchmarks and print their figures."""

from __future__ import annotations

import importlib
import sys
import time

SUITES = ["field_store", "hub_sync", "dedup_eval", "dedup_hub", "audit_bench", "hub_pg"]


def main(argv: list[str]) -> int:
    chosen = argv or SUITES
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SUITES}", file=sys.stderr)
        return 2
    for name in chosen:
        module = importlib.import_module(f"bench.{name}")
        start = time.perf_counter()
        results = module.run()
        print(f"== {name} ({time.perf_counter() - start:.0f} s)")
        for title, figures in results.items():
            print(f"  {title}")
            for key, value in figures.items():
                if isinstance(value, float):
                    shown = f"{value:,.2f}"
                else:
                    shown = f"{value:,}" if isinstance(value, int) else str(value)
                print(f"    {key:32} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
