"""A turn's output files for the reply: downloaded and attached, or linked (too large, or unavailable).

Each file may take up to `output_file_max` bytes, all of them together `output_total_max`; a file over
its share is linked instead. `prefetch` starts the downloads of the files a stream announced while the
runner still confirms the turn's end with `GET /api/tasks/{id}`; `collect` then uses them for the files
the API lists with the same URL, under the same limits, and downloads any others itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from mailgate import compose
from mailgate.api import HandingerClient, TooLarge
from mailgate.config import Settings
from mailgate.errors import MailgateError
from mailgate.models import OutputFile
from mailgate.render import AttachedFile, LinkedFile

Outcome = tuple[bytes, str | None] | MailgateError  # (data, content type), or why it was not downloaded


class Prefetch:
    """Downloads started early, one after the other, by URL. `aclose()` stops what is still running."""

    def __init__(self, api: HandingerClient, settings: Settings, files: Sequence[OutputFile]) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self._task = asyncio.create_task(self._run(api, settings, files), name="prefetch-outputs")

    async def _run(self, api: HandingerClient, settings: Settings, files: Sequence[OutputFile]) -> None:
        room = settings.output_total_max
        for f in files:
            if room <= 0:
                return  # `collect` links the rest without reading them
            if f.url in self.outcomes or (f.size is not None and f.size > settings.output_file_max):
                continue
            try:
                data, ctype = await api.download(f.url, max_bytes=settings.output_file_max)
            except MailgateError as exc:
                self.outcomes[f.url] = exc
                continue
            self.outcomes[f.url] = (data, ctype)
            room -= len(data)

    async def wait(self) -> dict[str, Outcome]:
        """The outcomes once every download is over (those it did not get are missing)."""
        await asyncio.gather(self._task, return_exceptions=True)
        return self.outcomes

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._task, return_exceptions=True)


class Outputs:
    def __init__(self, api: HandingerClient, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    def prefetch(self, files: Sequence[OutputFile]) -> Prefetch:
        return Prefetch(self.api, self.settings, files)

    async def collect(
        self, files: Sequence[OutputFile], prefetch: Prefetch | None = None
    ) -> tuple[list[AttachedFile], list[LinkedFile]]:
        early = await prefetch.wait() if prefetch is not None else {}
        attached: list[AttachedFile] = []
        linked: list[LinkedFile] = []
        room = self.settings.output_total_max
        for f in files:
            name = f.filename or f.url.rstrip("/").rpartition("/")[2] or "file"
            cap = min(self.settings.output_file_max, room)
            if f.size is not None and f.size > cap:
                linked.append(LinkedFile(name, f.url, f"{compose.human_size(f.size)}, too large to attach"))
                continue
            try:
                data, ctype = await self._download(f.url, cap, early.get(f.url))
            except TooLarge:
                linked.append(LinkedFile(name, f.url, "too large to attach"))
                continue
            except MailgateError:
                linked.append(LinkedFile(name, f.url, "could not be downloaded"))
                continue
            room -= len(data)
            attached.append(AttachedFile(name, f.media_type or ctype or "application/octet-stream", data))
        return attached, linked

    async def _download(self, url: str, cap: int, early: Outcome | None) -> tuple[bytes, str | None]:
        """`url`'s bytes under `cap`: from the prefetch when it has them (it read up to the per-file
        limit, which is at least `cap`), else downloaded now."""
        if early is None:
            return await self.api.download(url, max_bytes=cap)
        if isinstance(early, MailgateError):
            raise early
        if len(early[0]) > cap:
            raise TooLarge(len(early[0]), cap)
        return early
