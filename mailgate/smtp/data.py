"""Reading one DATA: block by block to its end, line ends normalized, spooled to a file past a threshold.

- `DotReader` reads the raw blocks of one DATA from the session's stream: `StreamReader.readuntil` finds
  each candidate end in C, so a 40 MB message is ~650 blocks of 64 KiB, not 500,000 lines. Only
  `<CR><LF>.<CR><LF>` ends DATA (Postfix 3.9's `smtpd_forbid_bare_newline = normalize`): `\\n.\\n`,
  `\\r\\n.\\n` and `\\n.\\r\\n` are content, so a message cannot smuggle a second one past an MTA that reads
  line ends differently. Bytes a client pipelines after the end stay in the stream for the next command.
- `Normalizer` turns every bare LF into CRLF and undoes dot-stuffing (RFC 5321 4.5.2: a line's leading
  dot goes, a lone `.` that does not end DATA becomes an empty line, as Postfix does), with C-level
  `bytes.replace` per block. A bare CR stays as it is (the header block's are refused: `mail.scan`).
- `Incoming` keeps the normalized message in memory up to `threshold` bytes and then in a file under
  `<spool>/incoming/` (0600), written a batch at a time in a worker thread, so an unfinished session
  costs at most about `threshold` + `BATCH` bytes of memory whatever its size. `content()` reads the
  file back once, through the descriptor that wrote it (a sweep may have unlinked its name), and the
  file is gone when the session's DATA ends however it ends; `sweep()` removes what a killed process
  left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from mailgate import private

__all__ = ["BATCH", "DotReader", "Incoming", "Normalizer", "incoming_dir", "sweep"]

BATCH = 1024 * 1024  # bytes written to the spool file at a time
_END = b"\n.\r\n"  # what readuntil looks for: the end of DATA when a CR comes before it


class DotReader:
    """The raw blocks of one DATA, dot-stuffed and with the line ends as sent, up to the end line.

    `await block()` gives the next block, or None once `<CR><LF>.<CR><LF>` was read (the CRLF before
    the dot is the last line's own and is part of the last block). A closed connection raises
    `asyncio.IncompleteReadError`.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._last2 = b"\r\n"  # the last two bytes read: the DATA command's line end at first
        self.done = False

    async def block(self) -> bytes | None:
        if self.done:
            return None
        reader = self._reader
        if self._last2 == b"\r\n":  # at a line start after CRLF: a lone "." here ends DATA
            head = await reader.readexactly(1)
            if head == b".":
                head += await reader.readexactly(2)
                if head == b".\r\n":
                    self.done = True
                    return None
            return self._took(head)
        try:
            block = await reader.readuntil(_END)
        except asyncio.LimitOverrunError as exc:  # no end in the next `limit` bytes: take them as they are
            return self._took(await reader.readexactly(exc.consumed))
        before = block[-5:-4] if len(block) > 4 else self._last2[-1:]
        if before == b"\r":
            self.done = True
            return block[:-3]
        return self._took(block)  # "\n.\r\n" after a bare LF: content

    def _took(self, data: bytes) -> bytes:
        self._last2 = data[-2:] if len(data) >= 2 else self._last2[-1:] + data
        return data


class Normalizer:
    """Bare LF to CRLF and dot-unstuffing over consecutive raw blocks of one DATA."""

    def __init__(self) -> None:
        self._line_start = True
        self._cr = False  # the last block ended with a CR: a LF starting the next one completes a CRLF

    def feed(self, block: bytes) -> bytes:
        if not block:
            return b""
        lead = b""
        if self._cr and block[:1] == b"\n":
            lead, block = b"\n", block[1:]
            self._line_start = True
        self._cr = block.endswith(b"\r")
        lfs = block.count(b"\n")
        if lfs and lfs != block.count(b"\r\n"):  # a bare LF: counting is cheaper than replacing
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._line_start and block[:1] == b".":
            block = block[1:]
            self._line_start = False
        if b"\n." in block:
            block = block.replace(b"\n.", b"\n")
        if block:
            self._line_start = block.endswith(b"\n")
        return lead + block if lead else block


def incoming_dir(spool: Path) -> Path:
    """Where DATA in progress is spooled: `<spool>/incoming` (beside the attachments' folders)."""
    return spool / "incoming"


def sweep(folder: Path) -> int:
    """Remove the spool files a killed process left in `folder`; return how many went."""
    removed = 0
    with contextlib.suppress(OSError):  # no folder (yet), or not one: nothing was left there
        for path in folder.iterdir():
            if path.is_file() and path.name.startswith("data-"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    return removed


def _remove(file: BinaryIO | None, path: Path | None) -> None:
    if file is not None:
        with contextlib.suppress(OSError):  # closing flushes: a full disk refuses it again
            file.close()
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Incoming:
    """One message being received: in memory up to `threshold` bytes, then in a spool file."""

    def __init__(self, folder: Path, threshold: int) -> None:
        self.folder = folder
        self.threshold = threshold
        self.size = 0
        self._blocks: list[bytes] = []
        self._pending = 0  # bytes in `_blocks`
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    async def write(self, block: bytes) -> None:
        """Add `block`; raises OSError when the spool file cannot be made or written (disk full)."""
        if not block:
            return
        self._blocks.append(block)
        self._pending += len(block)
        self.size += len(block)
        if self._file is None and self.size > self.threshold:
            self._file = await asyncio.to_thread(self._open)
        if self._file is not None and self._pending >= BATCH:
            await self._flush()

    async def content(self) -> bytes:
        """The whole message (one bytes object); the spool file is removed."""
        if self._file is None:
            data = b"".join(self._blocks)
            self._blocks, self._pending = [], 0
            return data
        await self._flush()
        try:
            return await asyncio.to_thread(self._read_back, self._file, self.size)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop what was received: the memory, and the spool file (closed and unlinked in a worker
        thread when a loop runs: unlinking 39 MB takes a few ms, eight at once a loop's 25 ms)."""
        self._blocks, self._pending = [], 0
        file, path = self._file, self.path
        self._file = self.path = None
        if file is None and path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _remove(file, path)
            return
        loop.run_in_executor(None, _remove, file, path)

    def _open(self) -> BinaryIO:
        private.make_dir(self.folder)
        fd, name = tempfile.mkstemp(prefix="data-", suffix=".eml", dir=self.folder)  # 0600
        self.path = Path(name)
        return os.fdopen(fd, "w+b")

    async def _flush(self) -> None:
        assert self._file is not None
        blocks, self._blocks, self._pending = self._blocks, [], 0
        await asyncio.to_thread(self._file.writelines, blocks)

    @staticmethod
    def _read_back(file: BinaryIO, size: int) -> bytes:
        file.flush()
        file.seek(0)
        data = file.read(size)
        if len(data) != size:
            raise OSError(f"spool file shrank: {len(data)} of {size} bytes")
        return data
