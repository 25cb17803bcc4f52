"""`mfpipe serve`'s HTTP side: MLflow scoring-server requests in, recommendations out, on one thread.

Split from `serving` (loading and logging versions): this module only parses requests, writes the
answers of a loaded `pyfunc_model.Recommendations` and runs the selector loop.
"""

from __future__ import annotations

import email.utils
import json
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from mfpipe import pyfunc_model
from mfpipe.errors import MfpipeError, one_line


def request_columns(body: bytes) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """An MLflow scoring-server JSON body (`dataframe_records`, `dataframe_split` or `inputs`) as input
    columns, and its params; built without pandas, which costs more than the answer for one user."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"body is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError("body must be a JSON object")
    params = document.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("'params' must be an object")
    if "dataframe_split" in document:
        split = document["dataframe_split"]
        names, rows = split.get("columns", []), split.get("data", [])
        return {name: [row[i] for row in rows] for i, name in enumerate(names)}, params
    records = document.get("dataframe_records", document.get("inputs"))
    if isinstance(records, dict):  # `inputs` as columns
        return {name: list(values) for name, values in records.items()}, params
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("body needs 'dataframe_records' (a list of objects), 'dataframe_split' or 'inputs'")
    names = {name for record in records for name in record}
    return {name: [record.get(name) for record in records] for name in names}, params


def answer(recommendations: pyfunc_model.Recommendations, body: bytes) -> bytes:
    """The `/invocations` answer, `{"predictions": [rows]}` as MLflow's scoring server writes it."""
    return Answers(recommendations)(body)


class Answers:
    """`answer` for one loaded version, with each item's id and title already JSON-encoded.

    The bytes are those of `json.dumps({"predictions": [row, ...]})`; written from precomputed fragments
    they cost a few microseconds per row instead of a dict and an encoder pass per row.
    """

    def __init__(self, recommendations: pyfunc_model.Recommendations) -> None:
        self.recommendations = recommendations
        catalog = recommendations.catalog
        self.item_json = [_json_string(i) for i in catalog.item_objects.tolist()]
        self.title_json = [json.dumps(t) for t in catalog.titles.tolist()]

    def __call__(self, body: bytes) -> bytes:
        out = self.recommendations.ranked(*pyfunc_model.parse_inputs(*request_columns(body)))
        items, titles = self.item_json, self.title_json
        heads = [  # per input row: its user and source
            (f'{{"user_id": {_json_string(user)}, "rank": ', f', "source": {_json_string(source)}}}')
            for user, source in zip(out.users.tolist(), out.sources.tolist(), strict=True)
        ]
        rows = [
            f'{heads[row][0]}{rank}, "item_id": {items[item]}, "score": {_json_float(score)}, '
            f'"title": {titles[item]}{heads[row][1]}'
            for row, rank, item, score in zip(out.row.tolist(), out.rank.tolist(), out.item.tolist(),
                                              out.score.tolist(), strict=True)
        ]  # fmt: skip
        return f'{{"predictions": [{", ".join(rows)}]}}'.encode()


_json_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str (ensure_ascii)


def _json_float(value: float) -> str:
    """A float as json.dumps writes it: repr when finite, NaN / Infinity / -Infinity otherwise."""
    return float.__repr__(value) if value - value == 0 else json.dumps(value)


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request: method, path (query dropped), lower-case header names, body."""

    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked."""
        connection = self.headers.get("connection", "").lower()
        return connection == "keep-alive" if self.version == "HTTP/1.0" else connection != "close"


class BadRequest(ValueError):
    """A request that cannot be read: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


MAX_HEAD = 1 << 16  # bytes of request line + headers
MAX_BODY = 1 << 30


def parse_request(buffer: bytes | bytearray) -> tuple[Request | None, int]:
    """The first complete request in `buffer` and the bytes it took; (None, 0) while it is incomplete.

    Only what MLflow's clients send is read: Content-Length bodies (chunked bodies get 411).
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise BadRequest(431, "request headers too large")
        return None, 0
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(400, f"bad request line {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, f"bad header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest(411, "a body needs Content-Length (chunked bodies are not read)")
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY:
        raise BadRequest(400, f"bad Content-Length {length[:30]!r}")
    stop = end + 4 + int(length)
    if len(buffer) < stop:
        return None, 0
    path = parts[1].split("?", 1)[0]
    return Request(parts[0], path, parts[2], headers, bytes(buffer[end + 4 : stop])), stop


NOT_FOUND = b'{"error_code": "NOT_FOUND"}'


def respond(answers: Answers, request: Request) -> tuple[int, bytes]:
    """(status, JSON body) of a request: `POST /invocations`, `GET /ping` and `/health`."""
    if request.method == "GET":
        return (200, b"{}") if request.path in ("/ping", "/health") else (404, NOT_FOUND)
    if request.method != "POST":
        return 501, json.dumps({"error_code": "NOT_IMPLEMENTED", "message": f"method {request.method}"}).encode()
    if request.path != "/invocations":
        return 404, NOT_FOUND
    try:
        return 200, answers(request.body)
    except (ValueError, TypeError, KeyError) as exc:
        return 400, json.dumps({"error_code": "BAD_REQUEST", "message": one_line(exc)}).encode()


def response_bytes(status: int, body: bytes, close: bool) -> bytes:
    """Status line, headers and body in one piece: one send, so Nagle and delayed ACKs never wait on a part."""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: mfpipe\r\nDate: {_http_date()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    )
    return head.encode("latin-1") + body


_dates: dict[int, str] = {}


def _http_date() -> str:
    """The Date header, formatted once per second."""
    now = int(time.time())
    if now not in _dates:
        _dates.clear()
        _dates[now] = email.utils.formatdate(now, usegmt=True)
    return _dates[now]


@dataclass(eq=False)
class _Connection:
    """A client socket with the bytes received and not yet answered, and the bytes not yet sent."""

    sock: socket.socket
    inbox: bytearray
    outbox: bytearray
    closing: bool = False
    continued: bool = False  # `100 Continue` already sent for the request being received


class Server:
    """HTTP/1.1 with keep-alive on one thread and a selector, answering `/invocations` for one version.

    Why one thread: an answer is ~0.2 ms of Python holding the GIL, so threads add no parallelism, only
    GIL hand-offs and context switches between the connections' threads (measured with 8 keep-alive
    clients: ThreadingHTTPServer spent ~0.2 ms per request around the answer; no garbage collection ran
    while serving, so none is tuned). Requests are answered in arrival order, each in one send; a client
    that reads slowly only stops its own connection being read; a large batch request holds the others
    for its duration (under the GIL the threads were held nearly as long).
    Same surface as `socketserver`: `serve_forever`, `shutdown` (from another thread), `server_close`,
    `server_address`.
    """

    def __init__(self, answers: Answers, host: str, port: int) -> None:
        self.answers = answers
        self.socket = socket.create_server((host, port), backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._stop = False
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown` (also one asked before this started); open connections are closed on the way out."""
        self._stopped.clear()
        connections: dict[int, _Connection] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            try:
                while not self._stop:
                    for key, events in selector.select(poll_interval):
                        if key.fileobj is self.socket:
                            self._accept(selector, connections)
                        else:
                            self._serve(selector, connections, key.data, events)
            finally:
                for connection in list(connections.values()):
                    self._close(selector, connections, connection)
                self._stop = False
                self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` (running in another thread) and wait until it has."""
        self._stop = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()

    def _accept(self, selector: selectors.BaseSelector, connections: dict[int, _Connection]) -> None:
        while True:
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of descriptors: the client is dropped, the server goes on
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, bytearray(), bytearray())
            connections[sock.fileno()] = connection
            selector.register(sock, selectors.EVENT_READ, connection)

    def _serve(self, selector: selectors.BaseSelector, connections: dict[int, _Connection],
               connection: _Connection, events: int) -> None:  # fmt: skip
        """Read what arrived, answer every complete request in it, send what can be sent."""
        if events & selectors.EVENT_READ:
            try:
                data = connection.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(selector, connections, connection)
                return
            if data:
                connection.inbox += data
                self._answer(connection)
        self._flush(selector, connections, connection)

    def _answer(self, connection: _Connection) -> None:
        """Answer every complete request received so far, in order, into the connection's outbox."""
        while not connection.closing:
            while connection.inbox.startswith(b"\r\n"):  # empty lines before a request are ignored (RFC 9112)
                del connection.inbox[:2]
            if not connection.inbox:
                return
            try:
                request, used = parse_request(connection.inbox)
            except BadRequest as exc:
                body = json.dumps({"error_code": "BAD_REQUEST", "message": str(exc)}).encode()
                connection.outbox += response_bytes(exc.status, body, close=True)
                connection.closing = True
                return
            if request is None:
                self._continue(connection)
                return
            del connection.inbox[:used]
            connection.continued = False
            try:
                status, body = respond(self.answers, request)
            except Exception as exc:  # one failed answer must not stop the server; the operator sees it
                print(f"mfpipe serve: {request.method} {request.path}: {one_line(exc)}", file=sys.stderr)
                status, body = 500, json.dumps({"error_code": "INTERNAL_ERROR", "message": one_line(exc)}).encode()
            connection.closing = not request.keep_alive
            connection.outbox += response_bytes(status, body, close=connection.closing)

    @staticmethod
    def _continue(connection: _Connection) -> None:
        """`100 Continue` to a client that waits for it before sending its body (curl does above 1 KB)."""
        head = bytes(connection.inbox[: connection.inbox.find(b"\r\n\r\n") + 1])
        if not connection.continued and b"\r\n" in head and b"100-continue" in head.lower():
            connection.outbox += b"HTTP/1.1 100 Continue\r\n\r\n"
            connection.continued = True

    def _flush(self, selector: selectors.BaseSelector, connections: dict[int, _Connection],
               connection: _Connection) -> None:  # fmt: skip
        """Send what the socket takes; while some is left, wait to write and stop reading (back-pressure)."""
        if connection.outbox:
            try:
                sent = connection.sock.send(connection.outbox)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(selector, connections, connection)
                return
            del connection.outbox[:sent]
        if connection.closing and not connection.outbox:
            self._close(selector, connections, connection)
            return
        wanted = selectors.EVENT_WRITE if connection.outbox else selectors.EVENT_READ
        if selector.get_key(connection.sock).events != wanted:
            selector.modify(connection.sock, wanted, connection)

    @staticmethod
    def _close(selector: selectors.BaseSelector, connections: dict[int, _Connection], connection: _Connection) -> None:
        """Close a connection; what the client sent and was not read is drained first, or the kernel would
        answer it with a reset that can destroy the (error) answer before the client reads it."""
        try:
            for _ in range(16):  # bounded: a client still uploading is not waited for
                if not connection.sock.recv(1 << 16):
                    break
        except OSError:  # nothing more to read now (BlockingIOError), or the peer is gone
            pass
        connections.pop(connection.sock.fileno(), None)
        selector.unregister(connection.sock)
        connection.sock.close()


def make_server(recommendations: pyfunc_model.Recommendations, port: int, host: str = "127.0.0.1") -> Server:
    """An HTTP server answering `/invocations` for one loaded version (not started)."""
    try:
        return Server(Answers(recommendations), host, port)
    except OSError as exc:
        raise MfpipeError(f"{host}:{port}: cannot listen ({one_line(exc)})") from None
