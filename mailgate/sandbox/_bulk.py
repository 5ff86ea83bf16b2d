"""Bulk output for load and limit tests: Markdown answers and file bytes of an exact size. Pure: no I/O.

`long_answer(task_id, seq, size)` (the `answer-bytes` switch) is `markdown_answer(size, heading)`:
exactly `size` bytes of UTF-8 and the same for the same arguments.
It reads like an agent's long report: headings, paragraphs with emphasis, inline code and links, bullet,
numbered, nested and task lists, block quotes, tables and fenced code, with numbers that change from
section to section, so a renderer does the work it would do on a real answer (nothing is repeated
verbatim for long). Its non-ASCII characters are all in Latin-1 (é, °, ±, ×, «»; no em dash or
curly quotes), so CPython keeps the text at one byte per character: a 10 MB answer costs 10 MB of
memory, not 20. About 0.3 s per 10 MB on one core; the sandbox makes it a slice at a time on its
loop (`markdown_pieces`): in a thread it would hold the GIL in 5 ms turns and slow the loop more.

`served_file_bytes(name, size)` are the bytes the sandbox serves for `[sandbox:file-bytes=size
name=name]`: a 64 KiB block of seeded random bytes (seed: the name) repeated, so different names give
different files, the same name and size the same file, and nothing compresses much within zlib's
32 KiB window. `served_file_chunks` yields them without holding the whole file.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_BLOCK = 64 * 1024

_SENTENCES = (
    "The import job reads every row once and keeps only the columns the report needs.",
    "Most of the time goes into parsing dates, which arrive in three different formats.",
    "A café in Lyon reported the same figures twice, so the totals below remove the duplicate.",
    "The naïve approach works for small inputs but slows down sharply past a million rows.",
    "Caching the lookups cut the run time by a little more than half on the sample data.",
    "Temperatures stayed between 18 °C and 24 °C for the whole measurement window.",
    "Each estimate carries an error of ± 3 % at the 95 % confidence level.",
    "The staging server has 4 × 16 GB of memory, which is enough for the full dataset.",
    "The vendor calls this feature «smart sync», although it only copies changed files.",
    "None of the failures reproduced on a clean checkout of the main branch.",
    "The second pass is optional: it only matters when the first one finds conflicts.",
    "We compared three libraries and kept the one with the smallest dependency tree.",
    "The logs show retries clustering around midnight, when the backups start.",
    "Rounding happens only at the very end, so intermediate sums keep full precision.",
    "The old endpoint still answers, but it ignores the filter parameters entirely.",
    "Two of the five regions report in local time; the rest use UTC throughout.",
    "Switching the queue to batches of 500 kept memory flat during the whole run.",
    "The summary table is sorted by impact, not by the order the issues were found.",
    "A short test on the production replica confirmed the numbers within a rounding error.",
    "The contract renews in March unless someone objects in writing before then.",
    "Über-long identifiers in the export were truncated at 64 characters by the old tool.",
    "The fix is small, but it touches the code path every request goes through.",
    "Nothing here needs a migration; the new column is computed when it is read.",
    "Prices are quoted without tax, and the discount applies only to annual plans.",
)
_TOPICS = (
    "Data quality", "Performance", "Costs", "Open questions", "Method", "Results by region",
    "Risks", "Next steps", "Background", "Recommendations", "Appendix: raw figures", "Timeline",
)  # fmt: skip
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


_OPENERS = ("In run {}, ", "For batch {}, ", "Across {} samples, ", "As of step {}, ", "In region {}, ")


def _sentences(i: int, count: int) -> str:
    """`count` sentences, the first opened with a phrase naming `i` (so paragraphs rarely repeat)."""
    n = len(_SENTENCES)
    first = _SENTENCES[i * 7 % n]
    opener = _OPENERS[i % len(_OPENERS)].format(i * 37 % 1009)
    rest = (_SENTENCES[(i * 7 + j * 11) % n] for j in range(1, count))
    return " ".join((opener + first[0].lower() + first[1:], *rest))


def _section(i: int) -> str:
    """Section `i` of the generated report (about 0.5 to 1.5 KB)."""
    kind = i % 8
    topic = _TOPICS[i % len(_TOPICS)]
    word = _WORDS[i % len(_WORDS)]
    if kind == 0:
        return (
            f"## {i // 8 + 1}. {topic}\n\n{_sentences(i, 4)} See **note {i}** and the `{word}_{i}` "
            f"field.\n\n{_sentences(i + 3, 3)}\n\n"
        )
    if kind == 1:
        items = "".join(
            f"- **{_WORDS[(i + j) % 10].title()}**: {_SENTENCES[(i + j * 5) % len(_SENTENCES)]} "
            f"(`{j * i % 997}` ms)\n"
            for j in range(5)
        )
        return f"{_sentences(i, 2)}\n\n{items}\n"
    if kind == 2:
        steps = "".join(
            f"{j + 1}. Step {j + 1} of run {i}: {_SENTENCES[(i * 3 + j) % len(_SENTENCES)]}\n"
            f"   - input: `{_WORDS[j % 10]}-{i}.csv`, {(i * 31 + j * 17) % 9000 + 100} rows\n"
            f"   - *status*: {'done' if (i + j) % 3 else 'pending'}\n"
            for j in range(4)
        )
        return f"### Procedure {i}\n\n{steps}\n"
    if kind == 3:
        rows = "".join(
            f"| {_WORDS[(i + j) % 10]}-{j} | {(i * 13 + j * 7) % 1000 / 10:.1f} | "
            f"{(i + j) % 21 - 10:+d} % | {_TOPICS[(i + j) % len(_TOPICS)].lower()} |\n"
            for j in range(6)
        )
        return f"| Item | Value | Change | Area |\n|---|---:|---:|---|\n{rows}\n"
    if kind == 4:
        return (
            f"```python\ndef total_{word}_{i}(rows: list[dict[str, float]]) -> float:\n"
            f'    """Sum the `{word}` column, skipping rows flagged by check #{i}."""\n'
            f"    kept = [r for r in rows if r.get('flag', 0) < {i % 10 + 1}]\n"
            f"    return round(sum(r['{word}'] for r in kept) * {1 + i % 7}.5, 2)\n```\n\n"
        )
    if kind == 5:
        return (
            f"> {_sentences(i + 1, 2)}\n>\n> -- from the notes of review {i}\n\n"
            f"{_sentences(i + 2, 2)} The details are in [the tracker](https://example.com/issues/{i}) "
            f"and in *section {i % 12 + 1}* above.\n\n"
        )
    if kind == 6:
        return (
            f"### {topic}, part {i}\n\n{_sentences(i + 5, 3)} _Caveat_: {_SENTENCES[i % len(_SENTENCES)]}"
            f"\n\n---\n\n"
        )
    tasks = "".join(
        f"- [{'x' if (i + j) % 2 else ' '}] Ticket {i * 3 + j}: {_SENTENCES[(i + j * 3) % len(_SENTENCES)]}\n"
        for j in range(3)
    )
    return f"{tasks}\n```sh\nmake report REGION={word} RUN={i} --limit {i % 50 + 10}\n```\n\n"


def markdown_answer(size: int, heading: str) -> str:
    """Exactly `size` bytes (UTF-8) of Markdown under a `# heading`, ending in a newline; "" for 0."""
    return "".join(markdown_pieces(size, heading))


def markdown_pieces(size: int, heading: str) -> Iterator[str]:
    """`markdown_answer(size, heading)` a section (0.5 to 1.5 KB) at a time, for callers that yield
    to an event loop between pieces instead of holding it for the whole text."""
    if size <= 0:
        return
    budget = size - 1  # bytes before the final newline
    piece, i = f"# {heading}\n\n", 0
    while True:
        raw = piece.encode()
        if len(raw) > budget:  # the last piece: cut it
            end = budget
            while end > 0 and raw[end] & 0xC0 == 0x80:  # do not split a character: pad instead
                end -= 1
            yield raw[:end].decode() + " " * (budget - end) + "\n"
            return
        yield piece
        budget -= len(raw)
        piece, i = _section(i), i + 1


def long_answer(task_id: str, seq: int, size: int) -> str:
    """The answer of `[sandbox:answer-bytes=size]` in turn `seq` (0-based) of `task_id`: `size` bytes
    under the heading "Sandbox answer of {size} bytes (turn {seq + 1} of {task_id})"."""
    return markdown_answer(size, long_heading(task_id, seq, size))


def long_heading(task_id: str, seq: int, size: int) -> str:
    return f"Sandbox answer of {size} bytes (turn {seq + 1} of {task_id})"


def _block(name: str) -> bytes:
    return random.Random(name).randbytes(_BLOCK)


def served_file_chunks(name: str, size: int) -> Iterator[bytes]:
    """The bytes of `served_file_bytes(name, size)`, in pieces of at most 64 KiB."""
    block = _block(name)
    for start in range(0, size, _BLOCK):
        yield block[: min(_BLOCK, size - start)]


def served_file_bytes(name: str, size: int) -> bytes:
    """The content the sandbox serves for a `file-bytes` output file called `name` of `size` bytes."""
    return b"".join(served_file_chunks(name, size))
