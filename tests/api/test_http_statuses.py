"""Every row of the HTTP status table in docs/protocols.md, tested on a real server: the table is read
from the file, and each row must have a case here that makes the server answer with that status.

Draining (503 after SIGTERM) needs a real process and its signal: tests/server/test_drain.py proves it,
on a connection kept alive from before the signal; it is checked here by name.
"""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.harness import ROOT, ServerThread, fixture_digits, free_port, multipart, render, request, wait_until

DIGITS, _ = fixture_digits()
MAX_BYTES = 64 * 1024
PNG = render(DIGITS[0], 40, (60, 60), (10, 10))


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 255).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(http_port=free_port(), max_message_bytes=MAX_BYTES, max_image_pixels=250_000,
                      max_request_pixels=250_000, max_queue=1, max_batch_delay_ms=1500, max_batch_size=64,
                      http_body_timeout_s=1.0, http_idle_timeout_s=1.0, max_http_connections=8) as running:
        yield running


def url(server: ServerThread) -> str:
    return f"127.0.0.1:{server.server.http_port}"


def post(server: ServerThread, path: str, body: bytes | Iterator[bytes], kind: str = "image/png",
         **headers: str) -> tuple[int, dict[str, str], dict]:
    status, got, reply = request(url(server), "POST", path, body, {"Content-Type": kind, **headers})
    return status, got, json.loads(reply) if reply else {}


def bad_json(server: ServerThread) -> int:
    return post(server, "/v2/models/lenet5/infer", b"{nope", "application/json")[0]


def unknown_model(server: ServerThread) -> int:
    return request(url(server), "GET", "/v2/models/mnist")[0]


def wrong_method(server: ServerThread) -> int:
    status, headers, _ = request(url(server), "GET", "/v1/recognize")
    assert headers["allow"] == "POST"
    return status


def body_too_large(server: ServerThread) -> int:
    return post(server, "/v1/recognize", b"\x89PNG" + bytes(MAX_BYTES))[0]


def not_an_image(server: ServerThread) -> int:
    return post(server, "/v1/recognize", b"hello", "text/plain")[0]


def too_many_pixels(server: ServerThread) -> int:
    status, headers, body = post(server, "/v1/recognize", png(600, 600))
    assert "exceeds the limit of 250000 pixels" in body["error"] and "retry-after" not in headers
    return status


def queue_full(server: ServerThread) -> int:
    # --max-queue 1 and a 1.5 s batch delay: one call holds the queue, the next is refused.
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, server, "/v1/recognize", PNG)
        recognizer = server.server.recognizer
        assert recognizer is not None
        wait_until(lambda: recognizer.queued_images == 1, what="one image held in the queue")
        status, headers, body = post(server, "/v1/recognize", PNG)
        assert headers.get("retry-after") == "1" and "--max-queue" in body["error"]
        assert held.result(30)[0] == 200
    return status


def slow_body(server: ServerThread) -> int:
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + PNG[:10])  # and never the other 990 bytes
        answer = sock.recv(4096)
    return int(answer.split()[1])


def slow_head(server: ServerThread) -> int:
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\n")
        return 0 if sock.recv(1) == b"" else -1  # 0: closed, unanswered


def content_encoding(server: ServerThread) -> int:
    return post(server, "/v1/recognize", PNG, **{"Content-Encoding": "gzip"})[0]


def too_many_connections(server: ServerThread) -> int:
    open_ = [socket.create_connection(("127.0.0.1", server.server.http_port)) for _ in range(8)]
    try:
        def refused() -> bool:
            with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=0.3) as extra:
                try:
                    return extra.recv(64).startswith(b"HTTP/1.1 503")
                except TimeoutError:
                    return False
        wait_until(refused, timeout=10, what="a connection beyond --max-http-connections refused")
        return 503
    finally:
        for sock in open_:
            sock.close()


def missing_file(server: ServerThread) -> int:
    body, kind = multipart("note", None, b"hello", "text/plain")
    return post(server, "/v1/recognize", body, kind)[0]


# Each docs row (matched by a phrase of its first column) -> (the case, the status it must give).
CASES: dict[str, tuple[Callable[[ServerThread], int], int]] = {
    "bad JSON": (bad_json, 400),
    "missing multipart file": (missing_file, 400),
    "unknown model or version": (unknown_model, 404),
    "wrong method": (wrong_method, 405),
    "body larger than `--max-message-bytes`": (body_too_large, 413),
    "`Content-Type` not an image": (not_an_image, 415),
    "image over `--max-image-pixels`": (too_many_pixels, 413),
    "batch queue full": (queue_full, 429),
    "request body not arrived": (slow_body, 408),
    "request head not complete": (slow_head, 0),
    "`Content-Encoding` on an upload": (content_encoding, 415),
    "more than `--max-http-connections`": (too_many_connections, 503),
}
# Rows proved elsewhere, on a real process.
ELSEWHERE = {"server draining": "tests/server/test_drain.py::test_held_calls_are_answered_after_new_ones_were_refused"}


def table_rows() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "protocols.md").read_text()
    start = text.index("## HTTP errors and limits")
    end = text.find("\n## ", start + 1)
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", text[start:end if end > 0 else None], re.M)
    return [(problem, status) for problem, status in rows if problem != "problem" and not set(problem) <= set("-")]


def test_every_row_of_the_documented_status_table_has_a_case() -> None:
    rows = [problem for problem, _ in table_rows()]
    uncovered = [p for p in rows if not any(key in p for key in [*CASES, *ELSEWHERE])]
    assert rows and not uncovered, f"rows of docs/protocols.md with no test: {uncovered}"
    for where in ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), where


@pytest.mark.parametrize("row", list(CASES))
def test_the_documented_status(server: ServerThread, row: str) -> None:
    case, expected = CASES[row]
    [documented] = [status for problem, status in table_rows() if row in problem]
    if expected:
        assert documented.startswith(str(expected)), f"docs say {documented!r} for {row!r}"
    else:
        assert "closed" in documented
    assert case(server) == expected
    # And the server keeps serving (once connections a case closed are gone from its count).
    wait_until(lambda: post(server, "/v1/recognize", PNG)[0] == 200, what="the server answering again")
