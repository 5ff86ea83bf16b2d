"""The worker's output files for a reply: downloaded and attached, or linked (too large, or unavailable).

Each file may take up to `output_file_max` bytes, all of them together `output_total_max`; a file over
its share is linked instead of attached.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.errors import MailgateError, TooLarge
from mailgate.models import AttachedFile, LinkedFile, OutputFile, human_size


class OutputFiles:
    def __init__(self, api: HandingerClient, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    async def collect(self, files: Sequence[OutputFile]) -> tuple[list[AttachedFile], list[LinkedFile]]:
        attached: list[AttachedFile] = []
        linked: list[LinkedFile] = []
        room = self.settings.output_total_max
        for f in files:
            name = f.filename or f.url.rstrip("/").rpartition("/")[2] or "file"
            cap = min(self.settings.output_file_max, room)
            if f.size is not None and f.size > cap:
                linked.append(LinkedFile(name, f.url, f"{human_size(f.size)}, too large to attach"))
                continue
            try:
                data, ctype = await self.api.download(f.url, max_bytes=cap)
            except TooLarge:
                linked.append(LinkedFile(name, f.url, "too large to attach"))
                continue
            except MailgateError:
                linked.append(LinkedFile(name, f.url, "could not be downloaded"))
                continue
            room -= len(data)
            attached.append(AttachedFile(name, f.media_type or ctype or "application/octet-stream", data))
        return attached, linked
