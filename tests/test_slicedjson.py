"""`slicedjson.loads` gives exactly what `json.loads` gives (values and ValueError alike), with slices
made small here so that every document has long strings cut in many places."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from mailgate import slicedjson
from mailgate.sandbox import long_answer

pytestmark = pytest.mark.anyio

# escapes, surrogate pairs and a lone surrogate, control characters (refused unescaped), quotes
ALPHABET = ["a", " ", '"', "\\", "\n", "\t", "é", "😀", "\ud800", "\x01", "/", "x" * 20]


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slicedjson, "SLICE", 64)


async def same(raw: str | bytes) -> None:
    want: Any
    try:
        want = ("value", json.loads(raw))
    except ValueError:
        want = "ValueError"
    got: Any
    try:
        got = ("value", await slicedjson.loads(raw))
    except ValueError:
        got = "ValueError"
    assert repr(got) == repr(want), raw[:200]


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


async def test_random_documents_and_their_corruptions_read_as_json_loads_reads_them() -> None:
    rng = random.Random(16)
    for _ in range(400):
        turns = [
            {"seq": n, "outputText": text(rng, rng.randint(0, 400)), text(rng, 80): [text(rng, 70), 1.5]}
            for n in range(rng.randint(0, 3))
        ]
        doc = {"task": {"id": text(rng, 5), "totals": {"credits": rng.random()}}, "turns": turns}
        for ascii_only in (True, False):
            raw = json.dumps(doc, ensure_ascii=ascii_only)
            at = rng.randrange(len(raw))
            bad = raw[:at] + rng.choice(['"', "\\", "\x00", "}", "\\u12"]) + raw[at + 1 :]
            for one in (raw, bad):
                await same(one)
                await same(one.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"a": "\n" * 1000}),  # an escape every other character: read whole
        json.dumps({"a": "😀" * 300}),  # surrogate pairs in \u escapes, never cut apart
        json.dumps({"x" * 300: "key"}),  # a long key
        json.dumps(["x" * 300] * 3) + "  ",
        '{"a":"' + "x" * 300,  # unterminated
        '{"a":"' + "x" * 300 + '"} trailing',
        '{"a":"' + "x" * 300 + '\\q"}',  # a bad escape
        b'\xef\xbb\xbf{"a":"' + b"x" * 300 + b'"}',  # a UTF-8 BOM (json.loads takes it in bytes only)
        '\ufeff{"a":"' + "x" * 300 + '"}',
        json.dumps({"a": "x" * 300}).encode("utf-16"),
        b'{"a":"' + b"\xff" * 300 + b'"}',  # not UTF-8
        b'{"a":"' + "é".encode() * 300 + b'"}',  # multi-byte characters across slices
    ],
)
async def test_edge_cases_read_as_json_loads_reads_them(raw: str | bytes) -> None:
    await same(raw)


async def test_a_sandbox_answer_of_a_megabyte_reads_whole() -> None:
    answer = long_answer("tsk_1", 0, 1_000_000)
    raw = json.dumps({"turns": [{"outputText": answer}]}, ensure_ascii=False).encode()
    assert await slicedjson.loads(raw) == {"turns": [{"outputText": answer}]}


async def test_nesting_deeper_than_the_stack_is_bad_json_for_the_api_client_not_a_crash() -> None:
    """A document nested deeper than Python's stack (json.loads raises RecursionError) reads as bad JSON
    (None: the event is skipped, the answer is "not a JSON object"); one nested as deep as json.loads
    takes, with a long string inside, gives json.loads's value."""
    from mailgate import api

    assert await api._json_async("[" * 100_000 + "]" * 100_000) is None
    assert api._json("[" * 100_000 + "]" * 100_000) is None
    deep = "[" * 400 + json.dumps("x" * 1000) + "]" * 400
    assert await slicedjson.loads(deep) == json.loads(deep)
