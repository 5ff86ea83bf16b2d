"""The SMTP DATA phase read into one growing buffer, not a list of lines.

aiosmtpd keeps every line of a message as its own bytearray and then joins them: a 40 MB message costs
about 4x its size before the handler even sees it. `StreamingData.smtp_DATA` keeps aiosmtpd's replies
and limits (503/501 before 354; 500 for a line over `line_length_limit`; 552 past `data_size_limit`, after
the data is drained; dot-unstuffing per RFC 5321 4.5.2) but appends each line to one bytearray.
`decode_data` is not supported: mailgate always takes bytes.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import MISSING, SMTP

__all__ = ["StreamingData"]


class StreamingData(SMTP):
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        size, limit = 0, self.data_size_limit
        problem: str | None = None
        partial = False  # inside a line that was too long
        while self.transport is not None:  # eof_received cancels this coroutine
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                problem = problem or "500 Line too long (see RFC5321 4.5.3.1.6)"
                del data[:]
                await self._reader.readexactly(exc.consumed)  # drain the long line's start
                partial = True
                continue
            if partial:  # the end of the long line
                partial = False
                continue
            if line == b".\r\n":
                break
            size += len(line)
            if problem is None and limit and size > limit:
                problem = "552 Error: Too much mail data"
                del data[:]
            if problem is None:
                data += memoryview(line)[1:] if line.startswith(b".") else line
        if problem is not None:
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = bytes(data)
        del data
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
