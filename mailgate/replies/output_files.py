"""The worker's output files for a reply: downloaded to attach, or linked (too large, not fetched, or
unavailable), each link with a reason its reader understands.

Each file may take up to `output_file_max` bytes (and no more than fits in a reply of `max_reply_size`
once base64 has made it a third larger), all of them together `output_total_max`; a file over its share
is linked instead of attached. Which of the downloaded files finally fit in the reply is for `compose`
to decide (it links the largest first when the whole reply would be too big).

Where a file may be fetched from is `egress`'s rule (the API's origin and MAILGATE_OUTPUT_HOSTS, public
addresses only, no redirect to another site): anything else is linked as "not fetched" and never
requested.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.errors import DownloadRefused, MailgateError, TooLarge
from mailgate.models import AttachedFile, LinkedFile, OutputFile, human_size

BASE64_GROWTH = 78 / 57  # base64 in 76-character lines with CRLF: the bytes on the wire per byte


class OutputFiles:
    def __init__(self, api: HandingerClient, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    async def collect(self, files: Sequence[OutputFile]) -> tuple[list[AttachedFile], list[LinkedFile]]:
        attached: list[AttachedFile] = []
        linked: list[LinkedFile] = []
        settings = self.settings
        room = settings.output_total_max
        file_max = min(settings.output_file_max, int(settings.max_reply_size / BASE64_GROWTH))
        for f in files:
            name = f.filename or f.url.rstrip("/").rpartition("/")[2] or "file"
            cap = min(file_max, room)
            if f.size is not None and f.size > cap:
                linked.append(LinkedFile(name, f.url, f"{human_size(f.size)}, too large to attach"))
                continue
            try:
                data, ctype = await self.api.download(f.url, max_bytes=cap)
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
