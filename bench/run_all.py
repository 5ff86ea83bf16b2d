"""Run every benchmark in turn (`make bench`); each prints its figures next to its same-run baseline.

.venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _common import header

SCRIPTS = [
    "sustained_accept.py", "loop_stall.py", "turn_overhead.py", "accept_latency.py", "task_cost.py",
    "trimming_cost.py", "smtp_accept.py", "big_mail.py", "huge_answer.py", "hostile_input.py",
    "store_compare.py", "header_cost.py", "module_walk.py",
]  # fmt: skip


VERDICTS = ("meets target", "SHORT of target")


def run(script: str) -> tuple[int, list[str]]:
    """Run one script, its output shown as it comes; (exit code, its lines that give a verdict)."""
    here = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, str(here / script)], cwd=here.parent, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None
    verdicts = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if any(v in line for v in VERDICTS):
            verdicts.append(line.strip())
    return proc.wait(), verdicts


def main() -> int:
    header("mailgate benchmarks")
    failed = []
    summary: list[tuple[str, str]] = []
    for script in SCRIPTS:
        if not (Path(__file__).parent / script).exists():
            print(f"-- {script}: not present, skipped")
            continue
        print(f"-- {script}", flush=True)
        code, verdicts = run(script)
        if code != 0:
            failed.append(script)
        summary += [(script, line) for line in verdicts] or [(script, "(figures only, no target)")]
    print("\n== every figure against its target (details above, each next to its same-run baseline)")
    for script, line in summary:
        print(f"   {script:22s} {line}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
