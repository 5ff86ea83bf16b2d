"""Reading a POST /api/tasks body: JSON, or a form with file parts, within the API's limits.

Limits (the API documents "5 files, 10 MB per file, 30 MB in total"; the sandbox reads MB as MiB):
more than `MAX_FILES` file parts is a 400; a file over `MAX_FILE_SIZE` or files over `MAX_TOTAL_SIZE`
together is a 413. A body whose Content-Length already exceeds the total (plus 1 MiB for the form's
own overhead) is drained unread and answered 413, so the client can read the answer instead of
meeting a reset connection. File bytes are hashed in chunks from starlette's spool and then dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive

from mailgate.sandbox._state import RecordedFile
from mailgate.sandbox._wire import error

MiB = 1024 * 1024
MAX_FILES = 5
MAX_FILE_SIZE = 10 * MiB
MAX_TOTAL_SIZE = 30 * MiB
FILE_FIELDS = ("files", "files[]")
_CHUNK = 256 * 1024


@dataclass
class Body:
    """The request's fields (JSON values, or strings from a form) and a description of its files."""

    fields: dict[str, object]
    multipart: bool = False
    files: list[RecordedFile] = field(default_factory=list)
    files_field: str | None = None


async def read_body(request: Request) -> Body | JSONResponse:
    """Parse the body, or answer why not (400 bad JSON or content type, 400/413 for the limits)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_TOTAL_SIZE + MiB:
        await drain(request.receive)
        return error(413, f"request too large: files may total at most {MAX_TOTAL_SIZE // MiB} MiB")
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        try:
            data = json.loads(await request.body())
        except ValueError:
            return error(400, "body is not valid JSON")
        if not isinstance(data, dict):
            return error(400, "body must be a JSON object")
        return Body(data)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(request, multipart=kind == "multipart/form-data")
    await drain(request.receive)
    return error(400, "send application/json, or multipart/form-data with files")


async def _read_form(request: Request, *, multipart: bool) -> Body | JSONResponse:
    body = Body({}, multipart=multipart)
    uploads: list[UploadFile] = []
    async with request.form(max_files=64, max_fields=64, max_part_size=4 * MiB) as form:
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                body.fields[name] = value
            elif name not in FILE_FIELDS:
                return error(400, f"unexpected file part {name!r}: name file parts files or files[]")
            else:
                body.files_field = body.files_field or name
                uploads.append(value)
        if len(uploads) > MAX_FILES:
            return error(400, f"too many files: at most {MAX_FILES} per request, got {len(uploads)}")
        total = 0
        for upload in uploads:
            recorded = await _describe(upload)
            if recorded.size > MAX_FILE_SIZE:
                return error(
                    413,
                    f"file {recorded.filename!r} is {recorded.size} bytes: at most 10 MiB ({MAX_FILE_SIZE})",
                )
            total += recorded.size
            if total > MAX_TOTAL_SIZE:
                return error(413, f"files total more than 30 MiB ({MAX_TOTAL_SIZE} bytes)")
            body.files.append(recorded)
    return body


async def _describe(upload: UploadFile) -> RecordedFile:
    """Size and sha256 of an upload, read in chunks (a file over the limit is not read at all)."""
    name = upload.filename or "unnamed"
    kind = upload.content_type or "application/octet-stream"
    if upload.size is not None and upload.size > MAX_FILE_SIZE:
        return RecordedFile(name, kind, upload.size, "")
    digest = hashlib.sha256()
    size = 0
    await upload.seek(0)
    while chunk := await upload.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return RecordedFile(name, kind, size, digest.hexdigest())


async def drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, so an early answer does not reset the connection."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
