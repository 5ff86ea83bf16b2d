"""The Handinger API client: one shared `httpx.AsyncClient` (and one for output files, see `download`),
every foreign error translated here.

`HandingerClient.create_turn` posts one turn (JSON, or multipart when there are files; streamed as SSE
when the server supports it) and returns what it saw as a `RunResult`. It never retries a request that
may have created a turn: the caller reconciles with `get_task` first (see DESIGN.md, "exactly once").

Errors (see `mailgate.errors`): `ApiUnavailable` (transport errors, timeouts, 429, 409, 5xx, redirects;
`maybe_sent` tells whether the request may have done something), `ApiUnauthorized` (401), `ApiRejected`
(other 4xx, with the API's own short reason), `TooLarge` (`download` past `max_bytes`),
`DownloadRefused` (`download` of a URL that `egress` does not allow). A read error *after* a 2xx answer
to `create_turn` is no error: the turn was accepted, so `RunResult(done=False)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import ExitStack, aclosing, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, ServerSentEvent

from mailgate import __version__, egress, slicedjson
from mailgate.config import OutputHost
from mailgate.errors import ApiRejected, ApiUnauthorized, ApiUnavailable, DownloadRefused, TooLarge
from mailgate.metrics import Metrics
from mailgate.models import OutputFile, RunResult, Source, TaskSnapshot, Turn, UploadFile

logger = logging.getLogger(__name__)

_REASON_MAX = 300
_ERROR_BODY_MAX = 64 * 1024
_MAX_REDIRECTS = 5
_PROGRESS_INTERVAL = 0.5  # seconds between on_progress calls while text streams in
STREAM_RETRY_AFTER = 3600.0  # seconds to use the blocking form after the API refused a stream
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
Progress = Callable[[RunResult], None] | None
Accepted = Callable[[], Awaitable[None]] | None


class _StreamRefused(Exception):
    """The server refused `stream` (400/422 naming it): nothing was created."""


class HandingerClient:
    """A client for the API subset mailgate uses. Create one per process; `aclose()` it on shutdown."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        concurrency: int = 64,
        timeout: float = 120.0,
        send_triggered_by: bool = True,
        files_field: str = "files",
        stream: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        output_hosts: Sequence[OutputHost] = (),
        private_origins: Iterable[str] = (),
        verify: ssl.SSLContext | bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.base_url = httpx.URL(base_url.rstrip("/"))
        self.metrics = metrics if metrics is not None else Metrics()
        # where output files may come from; `private_origins`: for tests, whose servers are on loopback
        self.destinations = egress.Destinations(self.base_url, output_hosts, private_origins)
        self.send_triggered_by = send_triggered_by
        self.files_field = files_field
        self.stream = stream
        self._stream_refused_until = 0.0  # after a refusal, ask for a stream again only after an hour
        self._stream_warned = False
        # Sent per request (never as a client default) so that only the API's origin ever sees it.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"User-Agent": f"mailgate/{__version__}"},
            limits=httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency),
            timeout=httpx.Timeout(connect=10.0, read=timeout, write=60.0, pool=30.0),
            follow_redirects=False,
            transport=transport,
            verify=verify,
            event_hooks={"response": [self._count]},
        )
        self._files = httpx.AsyncClient(  # output files: see `download`
            headers={"User-Agent": f"mailgate/{__version__}"},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=0),
            timeout=httpx.Timeout(connect=10.0, read=timeout, write=60.0, pool=30.0),
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            event_hooks={"response": [self._count]},
        )

    async def _count(self, response: httpx.Response) -> None:
        """Count each answered request in `mailgate_api_requests` (by endpoint template, never the path)."""
        request = response.request
        endpoint = _endpoint(request.url, self.base_url)
        self.metrics.api_requests.labels(request.method, endpoint, str(response.status_code)).inc()

    def _translate(self, exc: httpx.HTTPError) -> ApiUnavailable:
        """`_translate`, counting a request that got no answer as status `error`."""
        try:
            request: httpx.Request | None = exc.request
        except RuntimeError:  # an error raised before any request was made
            request = None
        if request is not None and not isinstance(exc, httpx.HTTPStatusError):
            endpoint = _endpoint(request.url, self.base_url)
            self.metrics.api_requests.labels(request.method, endpoint, "error").inc()
        return _translate(exc)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._files.aclose()

    async def create_turn(
        self,
        *,
        task_id: str,
        worker_id: str,
        input: str,
        budget: str,
        files: Sequence[UploadFile] = (),
        on_progress: Progress = None,
        on_accepted: Accepted = None,
    ) -> RunResult:
        """POST /api/tasks: start task `task_id` or add a turn to it. See the module docstring for errors.

        `on_accepted` is awaited once the API has answered 2xx (the turn exists), before the answer's body
        (a stream, or the blocking form's JSON) is read.
        """
        fields: dict[str, Any] = {"input": input, "workerId": worker_id, "taskId": task_id, "budget": budget}
        if self.send_triggered_by:
            fields["triggeredBy"] = "email"
        if self.stream and time.monotonic() >= self._stream_refused_until:
            try:
                return await self._create({**fields, "stream": True}, files, on_progress, on_accepted)
            except _StreamRefused:
                if not self._stream_warned:  # the API's era does not change often: say it once
                    self._stream_warned = True
                    logger.warning("api.stream_refused: the API does not stream; using the blocking form")
                self._stream_refused_until = time.monotonic() + STREAM_RETRY_AFTER
        return await self._create(fields, files, on_progress, on_accepted)

    async def _create(
        self, fields: dict[str, Any], files: Sequence[UploadFile], progress: Progress, accepted: Accepted
    ) -> RunResult:
        stream = fields.get("stream") is True
        headers = {**self._auth, "Accept": "text/event-stream" if stream else "application/json"}
        with ExitStack() as opened:
            body: dict[str, Any]
            if files:
                parts = [
                    (self.files_field, (f.filename, opened.enter_context(f.path.open("rb")), f.content_type))
                    for f in files
                ]
                data = {k: ("true" if v is True else str(v)) for k, v in fields.items()}
                body = {"data": data, "files": parts}
            else:
                body = {"json": fields}
            try:
                async with self._client.stream("POST", "/api/tasks", headers=headers, **body) as response:
                    if not response.is_success:
                        error = await _read_error_body(response)
                        refused = "stream" in _reason(response, error).lower()
                        if stream and response.status_code in (400, 422) and refused:
                            raise _StreamRefused
                        _raise_for_status(response, error)
                    if accepted is not None:
                        await accepted()
                    return await _read_run(response, progress)
            except httpx.HTTPError as exc:
                raise self._translate(exc) from exc

    async def get_task(self, task_id: str) -> TaskSnapshot | None:
        """GET /api/tasks/{id} (and /turns in the newest era). None when the task does not exist."""
        path = f"/api/tasks/{quote(task_id, safe='')}"
        body = await self._get_json(path)
        if body is None:
            return None
        task: dict[str, Any] = body["task"] if isinstance(body.get("task"), dict) else body
        if not isinstance(body.get("turns"), list):  # the newest era lists them separately
            body["turns"] = (await self._get_json(f"{path}/turns") or {}).get("items")
        turns = sorted((_turn(t) for t in _list(body["turns"]) if isinstance(t, dict)), key=lambda t: t.seq)
        totals = task.get("totals")
        totals = totals if isinstance(totals, dict) else {}
        credits, duration = _number(totals.get("credits")), _number(totals.get("durationMs"))
        return TaskSnapshot(
            task_id=_str(task.get("id")) or task_id,
            worker_id=_str(task.get("workerId")),
            status=_str(task.get("status")) or "pending",
            url=_str(task.get("url")),
            turns=tuple(turns),
            credits=credits,
            duration_ms=None if duration is None else int(duration),
        )

    async def delete_task(self, task_id: str) -> bool:
        """DELETE /api/tasks/{id}: archive the task. False when it was not archived or does not exist."""
        body = await self._get_json(f"/api/tasks/{quote(task_id, safe='')}", method="DELETE")
        return body is not None and body.get("archived") is True

    async def worker_run(self, worker_id: str, task_id: str) -> RunResult | None:
        """The worker-run object, to recover sources and files; None on 404. An older server ignores
        `taskId` and reports the worker's most recent task."""
        body = await self._get_json(f"/api/workers/{quote(worker_id, safe='')}", params={"taskId": task_id})
        return None if body is None else _run_from_json(body)

    async def worker_known(self, worker_id: str) -> bool:
        """Does the API know worker `worker_id`? `GET /api/workers/{id}`: a 2xx says yes; so does a 404
        about the worker's tasks (a worker that has not run yet); any other 404 says no. A 401 raises
        `ApiUnauthorized`, other failures as usual."""
        path = f"/api/workers/{quote(worker_id, safe='')}"
        try:
            response = await self._client.get(path, headers=self._auth)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        body = response.content[:_ERROR_BODY_MAX]
        if response.status_code == 404:
            reason = _reason(response, body).lower()
            return "task" in reason and not ("worker" in reason and "not found" in reason)
        if not response.is_success:
            _raise_for_status(response, body)
        return True

    async def download(self, url: str, *, max_bytes: int) -> tuple[bytes, str | None]:
        """Fetch a file the worker produced: (bytes, content-type). `TooLarge` past `max_bytes`;
        `DownloadRefused` for a URL that `egress.Destinations` does not allow (another host, a private
        address, a redirect to another origin, not http(s)).

        The address connected to is the address checked: the host is resolved here, every address it
        has is checked, and the request goes to a checked address by IP, with the URL's host in the Host
        header and, over https, in SNI and the certificate check. (A transport with socket options
        never sees the name; checking the peer after connecting comes after the request was sent.)
        Connections for files are not kept (a kept one would be reused by address, for any name) and
        no proxy from the environment is used (the proxy would be what is connected to). The API key
        goes only to the API's own origin, also across redirects.
        """
        try:
            target = self.base_url.join(url)
        except httpx.InvalidURL:
            raise DownloadRefused(egress.NOT_WEB) from None
        first: egress.Origin | None = None
        for _ in range(_MAX_REDIRECTS + 1):
            where = self.destinations.check_url(target, redirected_from=first)
            first = first or where
            headers = self._auth if where == self.destinations.api else {}
            try:
                async with self._open(target, where, headers) as response:
                    if response.is_redirect and "location" in response.headers:
                        try:
                            target = target.join(response.headers["location"])
                        except httpx.InvalidURL:
                            raise DownloadRefused(egress.NOT_WEB) from None
                        continue
                    if not response.is_success:
                        _raise_for_status(response, await _read_error_body(response))
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise TooLarge(int(declared), max_bytes)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise TooLarge(len(data), max_bytes)
                    return bytes(data), response.headers.get("content-type")
            except httpx.HTTPError as exc:
                raise self._translate(exc) from exc
        raise ApiRejected(0, f"more than {_MAX_REDIRECTS} redirects")

    @asynccontextmanager
    async def _open(
        self, target: httpx.URL, where: egress.Origin, headers: dict[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """GET `target` from a checked address of its host (the next one when one refuses to connect)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(where[1], where[2], type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ApiUnavailable(f"cannot look up {where[1]}: {exc}", maybe_sent=False) from exc
        addresses = self.destinations.check_addresses(where, [str(info[4][0]) for info in infos])
        host = target.raw_host.decode("ascii")
        extensions = {"sni_hostname": host} if target.scheme == "https" else {}
        headers = {**headers, "Host": target.netloc.decode("ascii")}
        failed: httpx.HTTPError | None = None
        for address in addresses:
            request = self._files.build_request(
                "GET", target.copy_with(host=address), headers=headers, extensions=extensions
            )
            try:
                response = await self._files.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failed = exc  # nothing was sent: try the next address
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return
        assert failed is not None
        raise failed

    async def _get_json(self, path: str, *, params: Any = None, method: str = "GET") -> dict[str, Any] | None:
        """One small request: the JSON object on 2xx, None on 404, translated errors otherwise."""
        try:
            response = await self._client.request(method, path, params=params, headers=self._auth)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        if response.status_code == 404:
            return None
        if not response.is_success:
            _raise_for_status(response, response.content[:_ERROR_BODY_MAX])
        body = await _json_async(response.content)
        if not isinstance(body, dict):
            raise ApiUnavailable(f"{method} {path}: the answer is not a JSON object", maybe_sent=True)
        return body


async def _read_run(response: httpx.Response, on_progress: Progress) -> RunResult:
    """Read a 2xx answer to POST /api/tasks. The turn was accepted: nothing here raises."""
    result = RunResult()
    try:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            await _read_events(response, result, on_progress)
        else:
            body = await _json_async(await response.aread())
            if isinstance(body, dict):
                result = _run_from_json(body)
    except httpx.HTTPError as exc:
        logger.warning(
            "api_answer_incomplete: the turn was accepted; its end is read with GET",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
    if on_progress is not None:
        _notify(on_progress, result)
    return result


async def _read_events(response: httpx.Response, result: RunResult, on_progress: Progress) -> None:
    # The text's deltas are kept in a list and joined when needed: `result.text += delta` copies the
    # whole text at every delta (an attribute gets no in-place concatenation), which for a 10 MB
    # answer held the loop for a long time (bench/loop_stall.py).
    last = time.monotonic()
    parts: list[str] = []
    try:
        async with aclosing(EventSource(response).aiter_sse()) as events:
            async for sse in events:
                done = sse.data.strip() == "[DONE]"
                event = None if done else await _json_async(sse.data)
                if _apply_event(sse, event, result, parts):
                    return
                if on_progress is not None and time.monotonic() - last >= _PROGRESS_INTERVAL:
                    last = time.monotonic()
                    result.text = "".join(parts)
                    _notify(on_progress, result)
    finally:
        result.text = "".join(parts)


def _apply_event(sse: ServerSentEvent, event: Any, result: RunResult, parts: list[str]) -> bool:
    """Fold one event (`event`: its data parsed) into `result`; True at the done marker. Unknown events
    and bad JSON are skipped."""
    if sse.data.strip() == "[DONE]":
        result.done = True
        return True
    if not isinstance(event, dict):
        return False
    kind = event.get("type") or sse.event
    if kind == "text-delta":
        parts.append(_str(event.get("delta")) or _str(event.get("textDelta")) or "")
    elif kind == "source-url" and _str(event.get("url")):
        result.sources.append(Source(url=event["url"], title=_str(event.get("title"))))
    elif kind == "file" and _str(event.get("url")):
        result.files.append(_output_file(event))
    elif kind == "error":
        result.error = (_str(event.get("errorText")) or "error")[:_REASON_MAX]
    elif kind == "finish":
        result.done = True
    return result.done


def _notify(on_progress: Callable[[RunResult], None], result: RunResult) -> None:
    try:
        on_progress(replace(result, sources=list(result.sources), files=list(result.files)))
    except Exception:
        logger.exception("api.progress_callback_failed")


def _run_from_json(body: dict[str, Any]) -> RunResult:
    sources = [Source(url=s["url"], title=_str(s.get("title"))) for s in _objects(body.get("sources"))]
    return RunResult(
        text=_str(body.get("output_text")) or "",
        done=True,
        status=_str(body.get("status")),
        url=_str(body.get("url")),
        sources=sources,
        files=[_output_file(f) for f in _objects(body.get("files"))],
        error=_message(body.get("error")),
    )


def _turn(raw: dict[str, Any]) -> Turn:
    seq = raw.get("seq")
    return Turn(
        seq=seq if isinstance(seq, int) else 0,
        status=_str(raw.get("status")) or "",
        input=_str(raw.get("input")) or "",
        output_text=_str(raw.get("outputText")) or _str(raw.get("output_text")) or "",
        files=tuple(_output_file(f) for f in _objects(raw.get("files"))),
    )


def _objects(raw: object) -> list[dict[str, Any]]:
    return [x for x in _list(raw) if isinstance(x, dict) and _str(x.get("url"))]


def _list(raw: object) -> list[Any]:
    return raw if isinstance(raw, list) else []


def _output_file(raw: dict[str, Any]) -> OutputFile:
    size = raw.get("size")
    return OutputFile(
        url=raw["url"],
        filename=_str(raw.get("filename")),
        media_type=_str(raw.get("mediaType")) or "application/octet-stream",
        size=size if isinstance(size, int) and size >= 0 else None,
    )


def _number(value: object) -> float | None:
    """A count or amount the API gave (finite, not negative), or None: `1e400` parses as infinity, which
    `int()` refuses (the answer to `/status` would crash)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _message(error: object) -> str | None:  # the API's error: a string, or an object with a message
    return _str(error.get("message") if isinstance(error, dict) else error)


def _json(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; nesting too deep to read
        return None


async def _json_async(raw: str | bytes) -> Any:
    """`_json` for what may be big (a task with a 10 MB answer, a stream's event): parsed a slice at a
    time, the event loop running in between (`slicedjson`)."""
    try:
        return await slicedjson.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _read_error_body(response: httpx.Response) -> bytes:  # a proxy's error page can be big
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) >= _ERROR_BODY_MAX:
            break
    return bytes(chunks[:_ERROR_BODY_MAX])


def _reason(response: httpx.Response, body: bytes) -> str:
    """The API's own words for an error: JSON `error`/`message`, or one short line of text."""
    text, parsed = body.decode("utf-8", "replace").strip(), _json(body)
    plain = response.headers.get("content-type", "text/plain").startswith("text/plain")
    reason = None
    if isinstance(parsed, dict):
        reason = _message(parsed.get("error")) or _str(parsed.get("message"))
    elif plain and "Traceback" not in text:  # a short line of text, never a stack trace
        reason = text.partition("\n")[0]
    reason = " ".join((reason or response.reason_phrase or "error").split())
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 3] + "..."


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after", "").strip()
        if not value or value.isdigit():
            return float(value) if value else None
        when = parsedate_to_datetime(value)  # HTTP-dates are always GMT
        return max(0.0, (when.replace(tzinfo=when.tzinfo or UTC) - datetime.now(UTC)).total_seconds())
    except (ValueError, TypeError, OverflowError):  # unparseable: no hint
        return None


def _raise_for_status(response: httpx.Response, body: bytes) -> NoReturn:
    status = response.status_code
    what = f"{response.request.method} {response.request.url.path}: HTTP {status}"
    if status == 401:
        raise ApiUnauthorized(f"{what} (the API key is missing, wrong or revoked)")
    if status in (409, 429) or status < 400 or status >= 500:
        if status < 400:  # a redirect: HANDINGER_BASE_URL probably needs fixing
            what += f" to {response.headers.get('location', '?')[:100]}"
        raise ApiUnavailable(
            f"{what}: {_reason(response, body)}",
            maybe_sent=status >= 500,
            retry_after=_retry_after(response.headers),
            answered=True,
        )
    raise ApiRejected(status, _reason(response, body))


_RESOURCES = ("tasks", "workers")  # /api/<resource>/{id}


def _endpoint(url: httpx.URL, base: httpx.URL) -> str:
    """The endpoint template of `url` (`/api/tasks/{id}/turns`): a bounded label, never an id.
    Files fetched from elsewhere than the API's origin are `download`."""
    if egress.origin(url) != egress.origin(base):
        return "download"
    parts = [p for p in url.path.removeprefix(base.path.rstrip("/")).split("/") if p]
    if len(parts) < 2 or parts[0] != "api" or parts[1] not in _RESOURCES:
        return "other"
    template = ["", "api", parts[1]]
    if len(parts) >= 3:
        template.append("{id}")
    if len(parts) == 4 and parts[3] == "turns":
        template.append("turns")
    elif len(parts) >= 4:
        return "other"
    return "/".join(template)


def _translate(exc: httpx.HTTPError) -> ApiUnavailable:
    """httpx errors -> ApiUnavailable; `maybe_sent=False` when no byte can have been sent."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ApiUnavailable(message[:_REASON_MAX], maybe_sent=not isinstance(exc, _NOT_SENT))
