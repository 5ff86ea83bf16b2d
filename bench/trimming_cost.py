"""Trimming's cost: microseconds per line of `trim_reply`, now and before issue 16.5, in the same run.

Also the HTML side (`split_html_reply`, issue 18): microseconds per KB of markup, typical and hostile.

    .venv/bin/python bench/trimming_cost.py [--repeat 5]

The baseline is `mailgate/trimming.py` as it stood at BASELINE_COMMIT, loaded from git history at run
time (`git show`), so both run on the same machine, interpreter and inputs. Each figure is the best of
`--repeat` runs. Inputs: typical replies (the corpus reply bodies when ../shared/corpus is there, and a
few built here) and adversarial ones (bodies made of lines that begin like an attribution, or of
footers, quotes, header lines, one long line). Target: a few microseconds per line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from collections.abc import Callable

from _common import ROOT, header, verdict

sys.path.insert(0, str(ROOT))

from mailgate.mail.html_quotes import split_html_reply
from mailgate.mail.trimming import trim_reply

BASELINE_COMMIT = "fc2356d"  # trimming before issue 16.5 / 18
CORPUS = ROOT.parent / "shared" / "corpus" / "reply-bodies" / "discourse+email_reply_trimmer" / "emails"
TARGET_US_PER_LINE = 5.0

Trim = Callable[[str], object]


def baseline() -> Trim | None:
    """`trim_reply` as of BASELINE_COMMIT, or None when git history is not at hand."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:mailgate/trimming.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("trimming_baseline")
    exec(compile(source, f"{BASELINE_COMMIT}:mailgate/trimming.py", "exec"), module.__dict__)  # noqa: S102
    trim: Trim = module.trim_reply
    return trim


def _quote(lines: int) -> str:
    return "\n".join(f"> line {k} of the earlier message, as the client quoted it." for k in range(lines))


def typical() -> list[tuple[str, str]]:
    cases = [
        (
            "gmail top-post, 40-line quote",
            "Thanks, that works.\n\nBest,\nAnn\n\n"
            "On Mon, Apr 2, 2012 at 6:26 PM, Bob <b@example.com> wrote:\n\n" + _quote(40),
        ),
        (
            "outlook top-post, header block",
            "See below.\n\n________________________________\nFrom: Bob <b@example.com>\n"
            "Sent: Monday, June 2, 2025 9:00 AM\nTo: Ann\nSubject: Hi\n\n"
            + "\n".join(f"old line {k}" for k in range(40)),
        ),
        (
            "inline answers",
            "Hi\n\nOn Tue, 1 Mar 2011 at 18:02, A <a@x.org> wrote:\n"
            + "\n\n".join(f"> question {k}?\n\nanswer {k}." for k in range(15)),
        ),
        ("smtp-source body, 4 KB", "\n".join(f"La de da de da {k}." for k in range(1, 230))),
        (
            "plain prose, 4 KB",
            "\n".join("The quick brown fox jumps over the lazy dog again." for _ in range(80)),
        ),
    ]
    if CORPUS.is_dir():
        bodies = [f.read_text(encoding="utf-8") for f in sorted(CORPUS.glob("*.txt"))]
        cases.append((f"corpus reply bodies ({len(bodies)}, all)", "\x00".join(bodies)))
    return cases


def adversarial() -> list[tuple[str, str]]:
    return [
        ("100 KB of 'On the other hand ...' lines", "On the other hand, we could try it tomorrow.\n" * 2250),
        ("100 KB of 'On 3 x @ b:' lines", "On 3 x @ b:\n" * 8400),
        (
            "100 KB of 'On 3 May 2020 at 10:00, Bob wrote' + quote",
            "On 3 May 2020 at 10:00, Bob wrote\n> x\n" * 2500,
        ),
        ("100 KB of 399-char words", ("x" * 399 + "\n") * 250),
        ("100 KB of 'Bob Smith <b@x' lines", "Bob Smith Jones Lee Ann Mary <b@x\n" * 2900),
        ("100 KB of footers", "Sent from my iPhone\n" * 5000),
        ("100 KB of header lines", "From: Bob <b@example.com>\n" * 3800),
        ("100 KB of nested quotes", ("> " * 40 + "deep\n") * 1200),
        ("1 MB in one line", "x" * 1_000_000),
    ]


def html_inputs() -> list[tuple[str, str]]:
    fixtures = sorted((ROOT / "tests" / "data").glob("quote-*.eml"))
    bodies = [f.read_bytes().split(b"\r\n\r\n", 1)[1].decode("utf-8") for f in fixtures]
    thread = (
        '<div>Thanks.</div><div class="gmail_quote">'
        + (
            '<div class="gmail_attr">On Mon, Jun 2, 2025 at 6:26 PM Bob &lt;b@example.com&gt; wrote:</div>'
            '<blockquote class="gmail_quote"><div>Earlier message, with a few words in it.</div>'
        )
        * 200
        + "</blockquote>" * 200
        + "</div>"
    )
    return [
        (f"client fixtures ({len(bodies)}, all)", "\x00".join(bodies)),
        ("gmail thread, 200 nested quotes", thread),
        (
            "outlook reply above 300 KB of history",
            '<div>Thanks.</div><div id="divRplyFwdMsg">x</div>'
            + "<p>old text of the thread, paragraph after paragraph.</p>" * 6000,
        ),
        ("2 MB of <div> with a blockquote at the end", "<div>x</div>" * 170_000 + "<blockquote type=cite>q"),
        ("5,000 nested plain blockquotes", "<blockquote>" * 5000 + "x"),
    ]


def _lines(text: str) -> int:
    return text.count("\n") + 1


def _best(trim: Trim, text: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        if "\x00" in text:  # several bodies, trimmed one by one
            for body in text.split("\x00"):
                trim(body)
        else:
            trim(text)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    header("trimming cost (trim_reply), microseconds per line")
    old = baseline()
    print(
        f"   baseline: mailgate/trimming.py at {BASELINE_COMMIT}" + ("" if old else " (not found: skipped)")
    )
    print(f"   target: <= {TARGET_US_PER_LINE:.0f} us per line on every input\n")
    print(f"   {'input':58} {'lines':>7} {'now us/line':>12} {'before':>12} {'ratio':>8}")
    worst = 0.0
    for group, cases in (("typical", typical()), ("adversarial", adversarial())):
        print(f"   -- {group}")
        for name, text in cases:
            lines = _lines(text)
            now = _best(trim_reply, text, args.repeat) / lines * 1e6
            if lines > 1:  # one 1 MB line is timed as a whole, not per line
                worst = max(worst, now)
            if old is None:
                print(f"   {name:58} {lines:>7} {now:>12.2f}")
                continue
            before = _best(old, text, max(1, min(args.repeat, 2))) / lines * 1e6
            print(f"   {name:58} {lines:>7} {now:>12.2f} {before:>12.2f} {before / now:>7.0f}x")
    ok = worst <= TARGET_US_PER_LINE
    print(f"\n   worst now (inputs of many lines): {worst:.2f} us/line: {verdict(ok)}")
    print(f"\n   {'split_html_reply input':58} {'KB':>7} {'us/KB':>12} {'total ms':>12}")
    for name, html in html_inputs():
        seconds = _best(split_html_reply, html, args.repeat)
        kb = len(html.encode()) / 1024
        print(f"   {name:58} {kb:>7.0f} {seconds / kb * 1e6:>12.1f} {seconds * 1e3:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
