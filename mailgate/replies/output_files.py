"""The worker's output files for a reply: downloaded to attach, or linked (too large, not fetched, or
unavailable), each link with a reason its reader understands.

Each file may take up to `output_file_max` bytes (and no more than fits in a reply of `max_reply_size`
once base64 has made it a third larger), all of them together `output_total_max`; a file over its share
is linked instead of attached. Which of the downloaded files finally fit in the reply is for `compose`
to decide (it links the largest first when the whole reply would be too big).

Where a file may be fetched from is `egress`'s rule (the API's origin and MAILGATE_OUTPUT_HOSTS, public
addresses only, no redirect to another site): anything else is linked as "not fetched" and never
requested.

The files a stream announces (`prefetch`) are downloaded while the final `GET /api/tasks/{id}` is on its
way, one after the other, up to `output_total_max` together: the GET's list is still the one that counts
(`collect`), and a file it names that was fetched already is not fetched again. Each is fetched with the
same checks and the per-file cap; `collect` applies the reply's own caps to what came, as if it had
fetched it then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.errors import DownloadRefused, MailgateError, TooLarge
from mailgate.models import AttachedFile, LinkedFile, OutputFile, human_size

BASE64_GROWTH = 78 / 57  # base64 in 76-character lines with CRLF: the bytes on the wire per byte


Fetched = tuple[bytes, str | None]  # a file's bytes and its content-type


class Prefetch:
    """Downloads of announced files, one after the other in a task of their own: `take(url)` is the
    download of `url` (awaited, it gives the bytes or raises as `download` does), or None when `url`
    is not (or no longer) among them. `cancel()` ends what is left."""

    def __init__(self, api: HandingerClient, urls: Sequence[str], *, file_max: int, total_max: int) -> None:
        loop = asyncio.get_running_loop()
        self._results: dict[str, asyncio.Future[Fetched]] = {u: loop.create_future() for u in urls}
        self._task = asyncio.create_task(self._run(api, file_max, total_max), name="prefetch")

    async def _run(self, api: HandingerClient, file_max: int, total_max: int) -> None:
        fetched = 0
        try:
            for url, result in list(self._results.items()):
                if fetched >= total_max:  # no room left: not fetched ahead (`collect` decides)
                    self._results.pop(url).cancel()
                    continue
                try:
                    data, ctype = await api.download(url, max_bytes=file_max)
                except Exception as exc:  # raised again where the file is taken, as `download` would
                    result.set_exception(exc)
                    continue
                fetched += len(data)
                result.set_result((data, ctype))
        finally:  # cancelled: what was not fetched is fetched by `collect` itself
            for result in self._results.values():
                if not result.done():
                    result.cancel()

    def take(self, url: str) -> asyncio.Future[Fetched] | None:
        return self._results.pop(url, None)

    def cancel(self) -> None:
        self._task.cancel()
        for result in self._results.values():  # not taken: nobody waits for them
            if not result.cancelled() and result.done():
                result.exception()  # retrieved, so an error is not reported as never retrieved
            result.cancel()
        self._results.clear()


class OutputFiles:
    def __init__(self, api: HandingerClient, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    @property
    def _file_max(self) -> int:
        settings = self.settings
        return min(settings.output_file_max, int(settings.max_reply_size / BASE64_GROWTH))

    def prefetch(self, files: Sequence[OutputFile]) -> Prefetch:
        """Start downloading `files` (announced by the stream) before `collect` is asked for them."""
        file_max = self._file_max
        urls = [f.url for f in files if f.size is None or f.size <= file_max]
        return Prefetch(
            self.api, list(dict.fromkeys(urls)), file_max=file_max, total_max=self.settings.output_total_max
        )

    async def collect(
        self, files: Sequence[OutputFile], prefetched: Prefetch | None = None
    ) -> tuple[list[AttachedFile], list[LinkedFile]]:
        attached: list[AttachedFile] = []
        linked: list[LinkedFile] = []
        settings = self.settings
        room = settings.output_total_max
        file_max = self._file_max
        for f in files:
            name = f.filename or f.url.rstrip("/").rpartition("/")[2] or "file"
            cap = min(file_max, room)
            if f.size is not None and f.size > cap:
                linked.append(LinkedFile(name, f.url, f"{human_size(f.size)}, too large to attach"))
                continue
            try:
                data, ctype = await self._download(f.url, cap, prefetched)
            except DownloadRefused as exc:
                linked.append(LinkedFile(name, f.url, exc.reason))
                continue
            except TooLarge:
                linked.append(LinkedFile(name, f.url, "too large to attach"))
                continue
            except MailgateError:
                linked.append(LinkedFile(name, f.url, "could not be downloaded"))
                continue
            room -= len(data)
            content_type = f.media_type or ctype or "application/octet-stream"
            attached.append(AttachedFile(name, content_type, data, f.url))
        return attached, linked

    async def _download(self, url: str, cap: int, prefetched: Prefetch | None) -> Fetched:
        """`url` under `cap` bytes: from `prefetched` when it has it (fetched under a cap at least as
        high), else downloaded now."""
        result = prefetched.take(url) if prefetched is not None else None
        if result is not None:
            try:
                data, ctype = await asyncio.shield(result)
            except asyncio.CancelledError:
                if not result.cancelled():
                    raise  # this job was cancelled, not the download
            else:
                if len(data) > cap:
                    raise TooLarge(len(data), cap)
                return data, ctype
        return await self.api.download(url, max_bytes=cap)
