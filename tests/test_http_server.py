"""The HTTP server of `mfpipe serve`: MLflow request formats in, JSON answers out, keep-alive and pipelining
over one selector loop, the status codes of unreadable requests, and a failing answer that stops nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from mfpipe import http_server, pyfunc_model, serving, tracking
from mfpipe.models import create
from tests.test_serving import register_tiny, tiny


def test_answer_reads_mlflow_request_formats():
    data = tiny()
    scorer = create("pop").fit(data).scorer()
    catalog = pyfunc_model.Catalog(data.user_ids, data.item_ids, np.array(["One", None, "Three", None]))
    recs = pyfunc_model.Recommendations(scorer, catalog)
    bodies = [
        {"dataframe_records": [{"user_id": "u1"}], "params": {"k": 1}},
        {"dataframe_split": {"columns": ["user_id", "k"], "data": [["u1", 1]]}},
        {"inputs": {"user_id": ["u1"], "k": [1]}},
    ]
    for body in bodies:
        rows = json.loads(http_server.answer(recs, json.dumps(body).encode()))["predictions"]
        assert rows == [
            {"user_id": "u1", "rank": 1, "item_id": "i3", "score": 2.0, "title": "Three", "source": "model"}
        ]
    for bad in (b"[", b"[]", b'{"rows": []}', b'{"dataframe_records": [{"k": 1}]}'):
        with pytest.raises(ValueError):
            http_server.answer(recs, bad)


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_server_answers_and_rejects_bad_input(tmp_path):
    data = tiny()
    model_path = create("pop").fit(data).save(tmp_path / "pop.npz")
    recs = pyfunc_model.Recommendations.load(model_path, serving.Catalog.of(data).save(tmp_path / "c.npz"))
    server = http_server.make_server(recs, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        status, answer = _post(port, {"dataframe_records": [{"user_id": "u1", "k": 2}]})
        assert status == 200 and [r["item_id"] for r in answer["predictions"]] == ["i3", "i4"]
        status, answer = _post(port, {"dataframe_records": [{"user_id": "u1", "k": 0}]})
        assert status == 400 and "k must be at least 1" in answer["message"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()


def _pop_server() -> http_server.Server:
    data = tiny()
    scorer = create("pop").fit(data).scorer()
    catalog = pyfunc_model.Catalog(data.user_ids, data.item_ids, np.array(["One", None, "Three", None], dtype=object))
    server = http_server.make_server(pyfunc_model.Recommendations(scorer, catalog), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _read_responses(sock: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` HTTP responses read off a raw socket: (status, lower-case headers, body)."""
    buffer, out = b"", []
    while len(out) < n:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buffer[:head_end].decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            stop = head_end + 4 + int(headers.get("content-length", 0))
            if len(buffer) >= stop:
                out.append((int(lines[0].split()[1]), headers, buffer[head_end + 4 : stop]))
                buffer = buffer[stop:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} responses"
        buffer += chunk
    return out


def _post_bytes(body: bytes, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    head = f"POST /invocations {version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_http_server_keeps_alive_pipelines_and_reads_requests_in_pieces():
    server = _pop_server()
    body = json.dumps({"dataframe_records": [{"user_id": "u1"}], "params": {"k": 1}}).encode()
    try:
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(_post_bytes(body) * 2 + b"\r\n" + _post_bytes(body))  # pipelined, a stray CRLF between
            answers = _read_responses(sock, 3)
            assert [(a[0], json.loads(a[2])["predictions"][0]["item_id"]) for a in answers] == [(200, "i3")] * 3
            assert answers[0][1]["content-type"] == "application/json" and "connection" not in answers[0][1]
            for byte in _post_bytes(body):  # one byte at a time
                sock.sendall(bytes([byte]))
            assert _read_responses(sock, 1)[0][0] == 200
            sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            assert _read_responses(sock, 1)[0][:1] == (200,)
            sock.sendall(_post_bytes(body, "Connection: close\r\n"))
            status, headers, _ = _read_responses(sock, 1)[0]
            assert status == 200 and headers["connection"] == "close" and _closed(sock)
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(_post_bytes(b"", version="HTTP/1.0"))  # HTTP/1.0: closed after the answer
            assert _read_responses(sock, 1)[0][0] == 400 and _closed(sock)
        with socket.create_connection(server.server_address, timeout=10) as sock:
            head, _, rest = _post_bytes(body, "Expect: 100-continue\r\n").partition(b"\r\n\r\n")
            sock.sendall(head + b"\r\n\r\n")  # curl waits for 100 Continue before sending a body
            assert _read_responses(sock, 1)[0][0] == 100
            sock.sendall(rest)
            assert _read_responses(sock, 1)[0][0] == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"POST /invocations HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"POST /invocations HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 12_000 + b"\r\n", 431),
    ],
)
def test_http_server_answers_unreadable_requests_then_closes(request_bytes, status):
    server = _pop_server()
    try:
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(request_bytes)
            answer = _read_responses(sock, 1)[0]
            assert answer[0] == status and json.loads(answer[2])["error_code"] == "BAD_REQUEST" and _closed(sock)
        with socket.create_connection(server.server_address, timeout=10) as sock:  # the server goes on
            sock.sendall(b"GET /ping HTTP/1.1\r\n\r\nPUT /invocations HTTP/1.1\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\n")
            assert [a[0] for a in _read_responses(sock, 3)] == [200, 501, 404]
    finally:
        server.shutdown()
        server.server_close()


def test_http_server_sends_large_answers_to_many_clients():
    server = _pop_server()
    body = json.dumps({"dataframe_records": [{"user_id": f"n{i}"} for i in range(3000)], "params": {"k": 4}}).encode()
    socks = [socket.create_connection(server.server_address, timeout=30) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(_post_bytes(body))
        for sock in socks:  # each answer (~400 kB) is more than a socket buffer holds: sent in pieces
            status, _, answer = _read_responses(sock, 1)[0]
            assert status == 200 and len(json.loads(answer)["predictions"]) == 4 * 3000
    finally:
        for sock in socks:
            sock.close()
        server.shutdown()
        server.server_close()


def test_answer_is_json_dumps_of_the_rows():
    """The answer written from precomputed fragments is byte for byte `json.dumps` of the rows."""
    data = tiny()
    scorer = create("pop").fit(data).scorer()
    titles = np.array(['Ünïcode "quoted"', None, "Three\n", None], dtype=object)
    recs = pyfunc_model.Recommendations(scorer, pyfunc_model.Catalog(data.user_ids, data.item_ids, titles))
    body = {"dataframe_records": [{"user_id": "u1"}, {"user_id": 'é"x', "k": 3}, {"user_id": "u2", "items": ["i3"]}]}
    columns = recs.columns(["u1", 'é"x', "u2"], [4, 3, 4], [None, None, ["i3"]])
    rows = zip(*(columns[n].tolist() for n in pyfunc_model.OUTPUT_COLUMNS), strict=True)
    expected = json.dumps({"predictions": [dict(zip(pyfunc_model.OUTPUT_COLUMNS, r, strict=True)) for r in rows]})
    assert http_server.answer(recs, json.dumps({**body, "params": {"k": 4}}).encode()) == expected.encode()
    assert http_server.answer(recs, b'{"inputs": {"user_id": []}}') == b'{"predictions": []}'


def test_parse_request_waits_for_a_whole_request():
    whole = b"POST /invocations?x=1 HTTP/1.1\r\nContent-Length: 2\r\nConnection: Close\r\n\r\n{}GET"
    for cut in (0, 10, whole.index(b"{}"), whole.index(b"{}") + 1):
        assert http_server.parse_request(whole[:cut]) == (None, 0)
    request, used = http_server.parse_request(whole)
    assert (request.method, request.path, request.body, used) == ("POST", "/invocations", b"{}", len(whole) - 3)
    assert not request.keep_alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_answer(proc: subprocess.Popen, port: int, body: dict, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return _post(port, body)[1]
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(proc.stdout.read().decode()[-3000:]) from None
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.services
def test_mfpipe_serve_answers_http(tmp_path):
    store, version = register_tiny(tmp_path)
    tracking.move_alias(store, "mfpipe-tiny", tracking.CHAMPION, version, {"reason": "test"})
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    cmd = [sys.executable, "-m", "mfpipe", "serve", "--dataset", "tiny", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rows = _wait_for_answer(proc, port, {"dataframe_records": [{"user_id": "u1", "k": 2}]})["predictions"]
        assert [r["item_id"] for r in rows] == ["i3", "i4"]
        assert rows[0]["title"] == "Three" and rows[0]["source"] == "model"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_a_shutdown_asked_before_serving_starts_still_stops_it():
    data = tiny()
    recs = pyfunc_model.Recommendations(create("pop").fit(data).scorer(), pyfunc_model.Catalog(
        data.user_ids, data.item_ids, np.array([None] * 4, dtype=object)))  # fmt: skip
    server = http_server.make_server(recs, 0)
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    stopper.start()
    time.sleep(0.2)  # shutdown is waiting before serve_forever runs
    server.serve_forever(poll_interval=0.05)  # returns at once
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    server.server_close()


def test_a_failing_answer_is_a_500_and_the_server_goes_on(capsys):
    server = _pop_server()

    def broken(body: bytes) -> bytes:
        raise RuntimeError("boom\nsecond line")

    try:
        server.answers = broken
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(_post_bytes(b"{}") + b"GET /ping HTTP/1.1\r\n\r\n")
            (status, _, body), (ping, _, _) = _read_responses(sock, 2)
        assert status == 500 and json.loads(body)["error_code"] == "INTERNAL_ERROR" and ping == 200
        assert "boom" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
