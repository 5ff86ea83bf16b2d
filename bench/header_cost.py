"""The cost of reading one message's header at DATA (issue 11): now, and before the caps, in the same run.

    .venv/bin/python bench/header_cost.py [--repeat 3]

What admission does with a header block before it decides (`Headers.parse`, `read_facts`, `read_signals`,
`policy.automatic_reason`, `authn.trust_from_header`), timed per message for a plain message and for
hostile ones: a 240 KB folded Subject of tiny encoded words, a 240 KB From of quoted names, 3,000 + 3,000
To/Cc addresses (plain quoted names, and encoded-word names). The baseline is the `mailgate` package at
BASELINE_COMMIT (`git archive` into a temporary directory, run in a subprocess), so both run on this
machine and interpreter with the same inputs. Each figure is the best of `--repeat` runs. Target: every
hostile message within 10x a plain one, and well under 50 ms (the event loop's budget; the work runs on
the header thread anyway). For the loop's own stalls while such messages arrive over SMTP see
`hostile_input.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import ROOT, header, verdict

BASELINE_COMMIT = "0deadc5"  # before issue 11's caps
TARGET_MS = 50.0


def folded(items: list[str], sep: str = "") -> str:
    return f"{sep}\r\n ".join(items)


def message(**fields: str) -> bytes:
    head = {"From": "Alice <alice@example.org>", "To": "research@agents.example.com", "Subject": "hi"}
    head |= {"Message-ID": "<m1@example.org>"} | fields
    return ("\r\n".join(f"{k}: {v}" for k, v in head.items()) + "\r\n\r\nbody\r\n").encode()


def cases() -> dict[str, bytes]:
    return {
        "plain": message(Cc="Bob <bob@example.org>, carol@example.org"),
        "subject 240 KB of encoded words": message(Subject=folded(["=?UTF-8?Q?a?= =?UTF-8?B?w6k=?="] * 8000)),
        "From 240 KB of quoted names": message(
            From=folded([f'"Name, number {i} (x)" <user{i}@example.org>' for i in range(5300)], ",")
        ),
        "To+Cc 6,000 quoted names": message(
            To=folded([f'"Person {i}" <p{i}@example.org>' for i in range(3000)], ","),
            Cc=folded([f'"Person {i}" <q{i}@example.org>' for i in range(3000)], ","),
        ),
        "To+Cc 6,000 encoded names": message(
            To=folded([f"=?UTF-8?Q?P=C3=A9rson_{i}?= <p{i}@example.org>" for i in range(3000)], ","),
            Cc=folded([f"=?UTF-8?Q?P=C3=A9rson_{i}?= <q{i}@example.org>" for i in range(3000)], ","),
        ),
    }


def measure(repeat: int) -> dict[str, float]:
    """Seconds per message, best of `repeat`, with the `mailgate` on sys.path."""
    from mailgate.admission import authn, policy
    from mailgate.mail import headers as reads
    from mailgate.mail.headers import Headers, read_facts

    def work(raw: bytes) -> None:
        headers = Headers.parse(raw)
        read_facts(headers)
        # now the header is read once into plain values (`read_signals`); the baseline took `Headers`
        signals: Any = reads.read_signals(headers) if hasattr(reads, "read_signals") else headers
        policy.automatic_reason(signals, "alice@example.org", own_domain="agents.example.com")
        authn.trust_from_header(signals)

    return {name: best(lambda raw=raw: work(raw), repeat) for name, raw in cases().items()}


def best(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def baseline(repeat: int) -> dict[str, float] | None:
    """`measure` on the package at BASELINE_COMMIT, in a subprocess; None without git history."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "mailgate"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        code = (
            f"import sys, json; sys.path[:0] = [{tmp!r}, {str(ROOT / 'bench')!r}]; "
            f"import header_cost; print(json.dumps(header_cost.measure({repeat})))"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        found: dict[str, float] = json.loads(out)
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    header("header cost per message at DATA")
    sys.path.insert(0, str(ROOT))
    now = measure(args.repeat)
    before = baseline(args.repeat)
    plain = now["plain"]
    print(f"{'message':34s} {'now':>10s} {'x plain':>8s} {'before':>10s} {'before/now':>10s}")
    for name, seconds in now.items():
        old = before.get(name) if before else None
        old_text = f"{old * 1000:8.1f}ms" if old is not None else "       n/a"
        ratio = f"{old / seconds:9.0f}x" if old is not None else "       n/a"
        print(f"{name:34s} {seconds * 1000:8.1f}ms {seconds / plain:7.0f}x {old_text} {ratio}")
    worst = max(now.values())
    print(f"slowest: {worst * 1000:.1f} ms (target {TARGET_MS:.0f} ms): {verdict(worst * 1000 <= TARGET_MS)}")


if __name__ == "__main__":
    main()
