"""The attachment spool: a message's files on disk, so uploads stream from open files.

`var/spool/<queue id>/<n>-<name>`; written once when the message is composed, removed when the message
is done. Everything can be made again from the raw message in the store, so no fsync is needed. The
folders are 0700 and the files 0600 whatever the umask (they are mail).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from mailgate import private
from mailgate.models import Attachment, UploadFile


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def write(self, message_id: str, files: Sequence[Attachment]) -> list[UploadFile]:
        """Write `files` for a message (replacing an earlier partial spool) and describe them."""
        return await asyncio.to_thread(self._write, message_id, list(files))

    def _write(self, message_id: str, files: list[Attachment]) -> list[UploadFile]:
        folder = self.root / message_id
        shutil.rmtree(folder, ignore_errors=True)
        if not files:
            return []
        private.make_dir(folder)
        out = []
        for n, att in enumerate(files, 1):
            path = folder / f"{n:02d}.bin"
            private.write_file(path, att.data)
            out.append(
                UploadFile(
                    att.filename, att.content_type, path, att.size, hashlib.sha256(att.data).hexdigest()
                )
            )
        return out

    def remove(self, message_id: str) -> None:
        shutil.rmtree(self.root / message_id, ignore_errors=True)

    @staticmethod
    def uploads(files_json: str | None) -> list[UploadFile]:
        """The spooled files a row lists (its `files` column), ready to upload."""
        return [
            UploadFile(f["filename"], f["content_type"], Path(f["path"]), f["size"], f["sha256"])
            for f in json.loads(files_json or "[]")
        ]
