"""The attachment spool: a message's files on disk, so uploads stream from open files. Like the rows
of the store, it is a hand-off between the steps of a turn (`turns.steps` writes the files when it
reads the message and uploads them when it posts the turn; `turns.scheduler` removes them when the
message ends), so it lives with the store.

`var/spool/<queue id>/<n>.bin`; written once when the message is composed, removed when the message
is done. Everything can be made again from the raw message in the store, so no fsync is needed, and a
row lists its files relative to the spool (`describe`): with several gateways the spool is each host's
own, and a host resuming another's message finds the files `missing` and makes them again. The folders
are 0700 and the files 0600 whatever the umask (they are mail).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
            private.write_file(path, att.chunks())  # a big file is decoded into it a chunk at a time
            out.append(UploadFile(att.filename, att.content_type, path, att.size, att.sha256))
        return out

    def remove(self, message_id: str) -> None:
        shutil.rmtree(self.root / message_id, ignore_errors=True)

    def describe(self, files: Sequence[UploadFile]) -> list[dict[str, Any]]:
        """The `files` column for spooled files: each path relative to the spool root."""
        return [
            {
                "filename": f.filename,
                "content_type": f.content_type,
                "path": str(f.path.relative_to(self.root)),
                "size": f.size,
                "sha256": f.sha256,
            }
            for f in files
        ]

    def uploads(self, files_json: str | None) -> list[UploadFile]:
        """The spooled files a row lists (its `files` column), ready to upload from this host's spool (an
        absolute path, as rows written before paths were relative hold, is kept as it is)."""
        return [
            UploadFile(f["filename"], f["content_type"], self.root / f["path"], f["size"], f["sha256"])
            for f in json.loads(files_json or "[]")
        ]

    def missing(self, files_json: str | None) -> bool:
        """Is any file the row lists not in this host's spool at its size (another host spooled it, or the
        spool was lost)?"""
        for upload in self.uploads(files_json):
            try:
                if upload.path.stat().st_size != upload.size:
                    return True
            except OSError:
                return True
        return False
