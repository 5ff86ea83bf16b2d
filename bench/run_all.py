"""Run every benchmark in turn (`make bench`); each prints its figures next to its same-run baseline.

.venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import header, run_py

SCRIPTS = [
    "sustained_accept.py", "loop_stall.py", "turn_overhead.py", "accept_latency.py", "task_cost.py",
    "trimming_cost.py", "smtp_accept.py", "big_mail.py", "huge_answer.py", "hostile_input.py",
    "store_compare.py", "header_cost.py", "module_walk.py",
]  # fmt: skip


def main() -> int:
    header("mailgate benchmarks")
    failed = []
    for script in SCRIPTS:
        if not (Path(__file__).parent / script).exists():
            print(f"-- {script}: not present, skipped")
            continue
        print(f"-- {script}", flush=True)
        if run_py(script) != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
