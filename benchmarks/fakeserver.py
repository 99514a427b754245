"""A real HTTP server on 127.0.0.1 for fake providers, with fault injection.

Each fake provider (speech-to-text, translation) registers routes on a ``FakeServer`` and speaks
that provider's wire format; the real ``openai`` SDK and ``requests`` reach it through the
base-URL settings. Faults are injected per request by ``server.fault`` (a callable that returns a
``Fault`` or None), so one test can say "every request for the next 10 s gets 429" or "30% 5xx".

Only 127.0.0.1 is ever bound or contacted.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def form(self) -> tuple[dict, dict]:
        """Parse multipart/form-data into (fields, files); files map name -> (filename, bytes)."""
        ctype = self.headers.get("content-type", "")
        raw = f"Content-Type: {ctype}\r\n\r\n".encode() + self.body
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        fields, files = {}, {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_param("filename", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if filename is not None:
                files[name] = (filename, payload)
            else:
                fields.setdefault(name, []).append(payload.decode("utf-8"))
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}, files


@dataclass
class Response:
    status: int = 200
    body: bytes | str | dict | list = b""
    headers: dict = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, (dict, list)):
            return json.dumps(self.body).encode("utf-8"), "application/json"
        if isinstance(self.body, str):
            return self.body.encode("utf-8"), "text/plain; charset=utf-8"
        return self.body, "application/octet-stream"


@dataclass
class Fault:
    """One injected misbehaviour: ``kind`` is status | reset | reset_mid_body | truncate | hang | garbage
    | drip (a 200 whose ``body`` comes one byte every ``interval`` seconds: each read gets data in
    time, so only a total deadline ends it)."""

    kind: str
    status: int = 500
    body: bytes | str | dict = b""
    headers: dict = field(default_factory=dict)
    interval: float = 1.0


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, payload, dict(headers or {}))


def serve_local(dispatch, *, name: str, queue_size: int = 256) -> ThreadingHTTPServer:
    """An HTTP/1.1 server on 127.0.0.1 (a free port), serving from a daemon thread, that hands every
    request to ``dispatch(handler)``. Shared by the test fakes and the benchmarks' fake API."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _handle(self):
            dispatch(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = queue_size

        def get_request(self):
            # Headers and body may be written separately: without NODELAY, Nagle plus delayed
            # ACK adds ~40 ms to every answer.
            connection, address = super().get_request()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return connection, address

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), name=name, daemon=True).start()
    return httpd


class FakeServer:
    def __init__(self, latency: float = 0.0):
        self.routes: dict[tuple[str, str], callable] = {}
        self.fault = None            # callable(Request) -> Fault | None
        self.latency = latency       # seconds added to every answered request
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.answered = 0
        self.answered_at: list[float] = []   # when each answer was written out
        self.in_flight = 0           # requests being served, a hanging one until the server stops
        self.max_in_flight = 0
        # Requests a "hang" fault holds now: they end only when the server stops, so unlike
        # in_flight (which an earlier test's leftover request may still lower) it never falls mid-test.
        self.holding = 0
        self.drips_finished = 0      # "drip" answers sent to their last byte (a client that waited)
        self.concurrency_log: list[tuple[float, int]] = []
        # A plan's concurrency limit, as ElevenLabs enforces it: over the cap, 429 at once.
        self.concurrency_cap: int | None = None
        self.accepted_in_flight = 0
        self.rejected_for_concurrency = 0
        # In order: ("accept" | "reject" | "done", requests accepted in flight after it, time).
        self.cap_log: list[tuple[str, int, float]] = []
        self._stopping = threading.Event()
        self._httpd = None

    # -- set-up ---------------------------------------------------------------------------
    def route(self, method: str, path: str):
        def register(func):
            self.routes[(method.upper(), path)] = func
            return func
        return register

    def start(self) -> "FakeServer":
        self._httpd = serve_local(self._dispatch, name="fake-server")
        return self

    def stop(self):
        self._stopping.set()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    # -- serving --------------------------------------------------------------------------
    def _dispatch(self, handler: BaseHTTPRequestHandler):
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        parts = urlsplit(handler.path)
        request = Request(handler.command, parts.path, parse_qs(parts.query),
                          {k.lower(): v for k, v in handler.headers.items()}, body)
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.concurrency_log.append((time.monotonic(), self.in_flight))
        accepted = False
        try:
            if self.concurrency_cap is not None:
                with self.lock:
                    accepted = self.accepted_in_flight < self.concurrency_cap
                    if accepted:
                        self.accepted_in_flight += 1
                        self.cap_log.append(("accept", self.accepted_in_flight, time.monotonic()))
                    else:
                        self.rejected_for_concurrency += 1
                        self.cap_log.append(("reject", self.accepted_in_flight, time.monotonic()))
                if not accepted:
                    self._send(handler, Response(429, {"detail": {
                        "status": "too_many_concurrent_requests",
                        "message": "Too many concurrent requests for your plan."}}))
                    return
            fault = self.fault(request) if self.fault else None
            if fault is not None:
                self._apply_fault(handler, fault)
                return
            if self.latency:
                time.sleep(self.latency)
            func = self.routes.get((request.method, request.path))
            response = func(request) if func else Response(404, {"error": {"message": "no such route"}})
            # The plan's slot is the work, not the socket write: it is free once the answer exists,
            # as it is on a real server (where the answer then still travels for milliseconds).
            accepted = self._free_slot(accepted)
            self._send(handler, response)
            with self.lock:
                self.answered += 1
                self.answered_at.append(time.monotonic())
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self._free_slot(accepted)
            with self.lock:
                self.in_flight -= 1

    def _free_slot(self, accepted: bool) -> bool:
        """Give an accepted request's plan slot back (once); returns False, for the caller's flag."""
        if accepted:
            with self.lock:
                self.accepted_in_flight -= 1
                self.cap_log.append(("done", self.accepted_in_flight, time.monotonic()))
        return False

    def _send(self, handler, response: Response):
        payload, ctype = response.encoded()
        handler.send_response(response.status)
        headers = {"Content-Type": ctype, **response.headers}
        for key, value in headers.items():
            handler.send_header(key, str(value))
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
        handler.wfile.flush()

    def _apply_fault(self, handler, fault: Fault):
        if fault.kind == "status":
            self._send(handler, Response(fault.status, fault.body, fault.headers))
        elif fault.kind == "reset":
            # RST instead of FIN: SO_LINGER with a zero timeout, then close mid-request.
            sock = handler.connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            handler.close_connection = True
            sock.close()
        elif fault.kind == "reset_mid_body":
            # Headers and half a body, then RST: the client sees the connection die while reading.
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "4000")
            handler.end_headers()
            handler.wfile.write(b'{"text": "' + b"x" * 1000)
            handler.wfile.flush()
            sock = handler.connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            handler.close_connection = True
            sock.close()
        elif fault.kind == "truncate":
            payload = b'{"text": "cut off in the midd'
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload) + 500))
            handler.end_headers()
            handler.wfile.write(payload)
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        elif fault.kind == "garbage":
            self._send(handler, Response(200, b"<html>this is not json", {"Content-Type": "application/json"}))
        elif fault.kind == "drip":
            self._drip(handler, fault)
        elif fault.kind == "hang":
            with self.lock:
                self.holding += 1
            try:
                self._stopping.wait(timeout=600)
            finally:
                with self.lock:
                    self.holding -= 1
            handler.close_connection = True
        else:
            raise ValueError(f"unknown fault kind {fault.kind}")

    def _drip(self, handler, fault: Fault):
        payload, ctype = Response(200, fault.body).encoded()
        handler.send_response(200)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.flush()
        for at in range(len(payload)):
            if self._stopping.wait(fault.interval):
                break
            handler.wfile.write(payload[at:at + 1])
            handler.wfile.flush()
        else:
            with self.lock:
                self.drips_finished += 1
        handler.close_connection = True
