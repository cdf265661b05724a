"""A fault-injecting, counting, delaying HTTP proxy on loopback in front of an S3 endpoint.

Reliability tests need S3 to fail in the ways real S3 fails (SlowDown, resets, a PUT that
succeeded but whose answer was lost, a body cut short); benchmarks need "S3 with 20 ms per
request" and a count of the bytes read. moto answers every request correctly and at once,
so this proxy sits between boto3 and the moto server and breaks requests on demand.

How to use (tests/conftest.py registers the `s3_proxy` fixture; it leaves the environment
alone, so only clients given `endpoint_url=proxy.endpoint` go through it):

    def test_something(s3_proxy, s3_bucket):
        client = boto3.client("s3", endpoint_url=s3_proxy.endpoint)
        s3_proxy.inject("503", method="GET", path=r"/w000000\\.safetensors$", times=2)
        s3_proxy.delay = 0.02                    # every request waits 20 ms before it is served
        ...
        s3_proxy.count("GET")                    # requests received (faulted ones included)
        s3_proxy.bytes_out("GET", path=r"\\.mp4$")  # response body bytes sent to the client
        s3_proxy.log                             # [LoggedRequest(...)], in arrival order

Faults (`FAULTS`), what the client sees:
    "503"           503 SlowDown, S3's XML error body (sent before the body of a request
                    that asked `Expect: 100-continue`, as S3 does, so none is uploaded)
    "500"           500 InternalError, likewise
    "reset"         the connection is reset (RST) as soon as the request headers arrive
    "timeout"       the request is read but never answered: held `timeout_hold` seconds,
                    then the connection is closed (set the client's read_timeout below it)
    "lost_response" the request is performed by the server, its answer dropped and the
                    connection closed: e.g. a PUT that succeeded although the client saw
                    an error
    "truncate"      the server's status, headers and half of its body, then the connection
                    is closed (a response without a body is sent whole)

Request bodies are streamed through with their framing kept (Content-Length, or
`Transfer-Encoding: chunked` with its chunk extensions and trailers, as aws-chunked
uploads use them); response bodies are streamed too (re-chunked when the server sends
no length).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import struct
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest

FAULTS = ("503", "500", "reset", "timeout", "lost_response", "truncate")
CHUNK = 64 * 1024  # bytes per read/write when streaming bodies
_ERRORS = {  # fault -> (status, reason, S3 error code, message), as S3 words them
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus Expect,
# which the proxy answers itself; Transfer-Encoding is re-added when the body is chunked.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "expect",
})


@dataclass
class LoggedRequest:
    """One request as the proxy saw it. Fields are updated before the bytes they count go
    out, so a client that has received a response already finds it counted."""

    method: str
    path: str  # percent-decoded, without the query string
    query: str  # raw query string, '' if none
    fault: str | None = None  # the fault injected into this request, if any
    status: int | None = None  # status sent to the client; None when it got no answer
    upstream_status: int | None = None  # status the server answered; None if not forwarded
    bytes_in: int = 0  # request body bytes read from the client (chunk framing excluded)
    bytes_out: int = 0  # response body bytes sent to the client (chunk framing excluded)


@dataclass
class Rule:
    """`inject` result: faults matching requests, after letting `after` of them pass."""

    fault: str
    method: str | None = None
    path: re.Pattern[str] | None = None
    times: int | None = 1  # None: every matching request from then on
    after: int = 0
    seen: int = 0  # matching requests that reached this rule while it was active
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or bool(self.path.search(path)))

    def take(self) -> bool:
        """Whether this rule faults a request it matches; counts it either way."""
        if self.times is not None and self.fired >= self.times:
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        self.fired += 1
        return True


class _ClientGone(Exception):
    """The client closed or broke the connection while its request was being read."""


class FaultProxy:
    """HTTP/1.1 keep-alive proxy on 127.0.0.1:<free port> forwarding to `upstream` (http://)."""

    def __init__(self, upstream: str, delay: float = 0.0, timeout_hold: float = 30.0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"upstream must be http://host[:port], got {upstream!r}")
        self.upstream = upstream
        self.upstream_address = (parts.hostname, parts.port or 80)
        self.delay = delay  # seconds every request waits before it is served
        self.timeout_hold = timeout_hold  # seconds a "timeout" fault holds the request
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[LoggedRequest] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        if self._server is not None:
            raise RuntimeError(f"FaultProxy already started on {self.endpoint}")
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every client connection (held requests end at once)."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(
        self, fault: str, method: str | None = None, path: str | None = None, times: int | None = 1, after: int = 0
    ) -> Rule:
        """Fault the requests matching `method` and `path` (a regex searched in the decoded
        path): let the first `after` pass, then fault `times` of them (None: all). Rules
        are tried in the order injected; the first that fires wins."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: use one of {', '.join(FAULTS)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times!r}")
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after!r}")
        rule = Rule(fault, method.upper() if method else None, re.compile(path) if path is not None else None,
                    times, after)
        with self._lock:
            self._rules.append(rule)
        return rule

    def reset(self) -> None:
        """Forget all rules and the log (`delay` and `timeout_hold` are kept)."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    @property
    def log(self) -> list[LoggedRequest]:
        """A copy of the log, in arrival order."""
        with self._lock:
            return list(self._log)

    def requests(self, method: str | None = None, path: str | None = None) -> list[LoggedRequest]:
        """Logged requests with this method and a path matching the regex `path`."""
        pattern = re.compile(path) if path is not None else None
        return [r for r in self.log if (method is None or r.method == method.upper())
                and (pattern is None or pattern.search(r.path))]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.requests(method, path))

    def bytes_out(self, method: str | None = "GET", path: str | None = None) -> int:
        """Response body bytes sent to the client for the matching requests."""
        return sum(r.bytes_out for r in self.requests(method, path))

    def _begin(self, method: str, path: str, query: str) -> LoggedRequest:
        """Log a request that just arrived and pick its fault."""
        with self._lock:
            rule = next((r for r in self._rules if r.matches(method, path) and r.take()), None)
            record = LoggedRequest(method, path, query, fault=rule.fault if rule else None)
            self._log.append(record)
        return record

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client keeping its connection open must not block stop()
    request_queue_size = 128  # many pooled boto3 connections may open at once

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    """One client connection: its requests, one after another, each forwarded to the
    upstream over one kept-alive connection of its own."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle holds the
        # body until the client's delayed ACK (~40 ms), which would swamp `delay`.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy = self.server.proxy
        self.upstream: http.client.HTTPConnection | None = None
        self.proxy._track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.upstream is not None:
                self.upstream.close()
            self.proxy._track(self.connection, open_=False)

    def handle_expect_100(self) -> bool:
        return True  # answered in _serve: an S3 error goes out instead of "100 Continue"

    def log_message(self, format: str, *args) -> None:
        pass  # the LoggedRequest records are the log

    def _serve(self) -> None:
        proxy = self.proxy
        target, _, query = self.path.partition("?")
        record = proxy._begin(self.command, unquote(target), query)
        expects_continue = self.headers.get("Expect", "").lower() == "100-continue"
        try:
            if proxy.delay > 0:
                proxy._stopping.wait(proxy.delay)
            if record.fault == "reset":
                self._close(reset=True)
            elif record.fault in _ERRORS:
                self._send_s3_error(record, expects_continue)
            elif record.fault == "timeout":
                self._read_body(record, expects_continue)
                proxy._stopping.wait(proxy.timeout_hold)
                self._close()
            else:
                response = self._forward(record, expects_continue)
                if response is None:
                    return
                record.upstream_status = response.status
                if record.fault == "lost_response":
                    response.read()
                    self._close()
                else:
                    self._relay(record, response)
        except (_ClientGone, OSError, http.client.HTTPException):
            self._close()  # the client or the server broke off mid-exchange: nothing sane to send

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _serve

    # -- request side --

    def _has_body(self) -> bool:
        return self._chunked() or int(self.headers.get("Content-Length") or 0) > 0

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self, record: LoggedRequest) -> Iterator[bytes]:
        """The request body as pieces to forward: raw bytes, chunk framing included."""
        try:
            if self._chunked():
                yield from self._chunked_body(record)
                return
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                piece = self.rfile.read(min(CHUNK, remaining))
                if not piece:
                    raise _ClientGone(f"request body ended {remaining} bytes early")
                remaining -= len(piece)
                record.bytes_in += len(piece)
                yield piece
        except (OSError, ValueError) as e:
            raise _ClientGone(str(e)) from e

    def _chunked_body(self, record: LoggedRequest) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(CHUNK)
            if not size_line.endswith(b"\n"):
                raise _ClientGone(f"bad chunk size line {size_line[:80]!r}")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            yield size_line
            if size == 0:
                break
            while size:
                piece = self.rfile.read(min(CHUNK, size))
                if not piece:
                    raise _ClientGone("chunked request body ended early")
                size -= len(piece)
                record.bytes_in += len(piece)
                yield piece
            crlf = self.rfile.read(2)
            if crlf != b"\r\n":
                raise _ClientGone(f"chunk data not followed by CRLF but {crlf!r}")
            yield crlf
        while True:  # trailers (aws-chunked checksums), then the empty line
            line = self.rfile.readline(CHUNK)
            if not line.endswith(b"\n"):
                raise _ClientGone("chunked request body ended in its trailers")
            yield line
            if line in (b"\r\n", b"\n"):
                return

    def _read_body(self, record: LoggedRequest, expects_continue: bool) -> None:
        if expects_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        for _ in self._body(record):
            pass

    # -- answers made by the proxy --

    def _send_s3_error(self, record: LoggedRequest, expects_continue: bool) -> None:
        status, reason, code, message = _ERRORS[record.fault]
        unread_body = expects_continue and self._has_body()
        if not unread_body:
            self._read_body(record, expects_continue=False)
        request_id = uuid.uuid4().hex[:16].upper()
        body = b"" if self.command == "HEAD" else (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>{uuid.uuid4().hex}</HostId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id),
                   ("Date", self.date_time_string()), ("Server", "AmazonS3")]
        self._respond(record, status, reason, headers, body, close=unread_body)

    def _respond(self, record: LoggedRequest, status: int, reason: str, headers: list[tuple[str, str]],
                 body: bytes, close: bool) -> None:
        """A whole response made here; `close` when the request body was left unread."""
        self._start(record, status, reason, headers + [("Content-Length", str(len(body)))], close=close)
        self._write(record, body)

    # -- forwarding --

    def _upstream_connection(self) -> http.client.HTTPConnection:
        conn = self.upstream
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            conn.close()  # readable while idle: the server closed it (http.client reconnects)
        if conn is None:
            conn = self.upstream = http.client.HTTPConnection(*self.proxy.upstream_address, timeout=300)
        return conn

    def _forward(self, record: LoggedRequest, expects_continue: bool) -> http.client.HTTPResponse | None:
        """Send the request upstream, streaming its body; None when the upstream failed
        (the client then got a 502)."""
        conn = self._upstream_connection()
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if self._chunked():
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            if expects_continue:
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            for piece in self._body(record):
                conn.send(piece)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.upstream = None
            message = f"upstream {self.proxy.upstream} failed: {type(e).__name__}: {e}".encode()
            self._respond(record, 502, "Bad Gateway", [("Content-Type", "text/plain")], message, close=True)
            return None

    def _relay(self, record: LoggedRequest, response: http.client.HTTPResponse) -> None:
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        has_body = self.command != "HEAD" and response.status >= 200 and response.status not in (204, 304)
        if record.fault == "truncate":
            body = response.read() if has_body else b""
            if has_body:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(body))))
            self._start(record, response.status, response.reason, headers, close=False)
            self._write(record, body[: len(body) // 2])
            self._close()
            return
        rechunk = has_body and response.getheader("Content-Length") is None
        if rechunk:
            headers.append(("Transfer-Encoding", "chunked"))
        self._start(record, response.status, response.reason, headers, close=self.close_connection)
        while has_body:
            piece = response.read(CHUNK)
            if not piece:
                break
            self._write(record, piece, chunk=rechunk)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")

    # -- response side --

    def _start(self, record: LoggedRequest, status: int, reason: str, headers: list[tuple[str, str]],
               close: bool) -> None:
        record.status = status
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()

    def _write(self, record: LoggedRequest, data: bytes, chunk: bool = False) -> None:
        if not data:
            return
        record.bytes_out += len(data)  # counted first: the client may look as soon as it has them
        try:
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if chunk else data)
        except OSError:
            record.bytes_out -= len(data)
            raise

    def _close(self, reset: bool = False) -> None:
        """End the connection after this request: a FIN, or with `reset` a RST right now."""
        self.close_connection = True
        if reset:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # drops the makefile reference so close() really closes
                self.connection.close()


@pytest.fixture
def s3_proxy(s3_endpoint) -> Iterator[FaultProxy]:
    """A started FaultProxy in front of the session's moto server (environment unchanged)."""
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy
