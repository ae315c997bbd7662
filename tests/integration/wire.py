"""Test tooling: a recording TLS proxy between one site and the coordinator, and a decoder for
what it recorded.

The proxy terminates the site's TLS connection with the coordinator's own certificate (the test
holds the development CA), forwards everything to the real SuperLink over TLS, and keeps every
byte the site sent. :func:`decode_requests` splits that stream into the HTTP requests Flower's
Fleet API client made (``/v1/fleet/...``, protobuf bodies) and :func:`pushed_objects` extracts the
Flower objects (records, arrays) the site uploaded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingProxy:
    """127.0.0.1:``port`` (TLS, ``cert``/``key``) -> 127.0.0.1:``upstream`` (TLS, trusting ``ca``)."""

    upstream: int
    cert: str
    key: str
    ca: str
    port: int = 0
    sent: list[bytearray] = field(default_factory=list)  # per connection: site -> coordinator bytes

    def start(self) -> RecordingProxy:
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.load_cert_chain(self.cert, self.key)
        self._client_ctx = ssl.create_default_context(cafile=self.ca)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self._server_ctx.wrap_socket(raw, server_side=True)
            upstream = self._client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.upstream)),
                                                    server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError):
            raw.close()
            return
        record = bytearray()
        with self._lock:
            self.sent.append(record)
        _relay(client, upstream, record)

    def all_sent(self) -> bytes:
        with self._lock:
            return b"".join(bytes(r) for r in self.sent)

    def requests(self) -> list[Request]:
        with self._lock:
            streams = [bytes(r) for r in self.sent]
        out: list[Request] = []
        for stream in streams:
            out += decode_requests(stream)
        return out


def _relay(client: ssl.SSLSocket, upstream: ssl.SSLSocket, record: bytearray) -> None:
    """Both directions in one thread, on non-blocking sockets. OpenSSL connections are not
    thread-safe: reading a socket in one thread while another writes to it or closes it can crash
    the interpreter. Non-blocking because a readable socket may carry only TLS housekeeping (a
    session ticket), and a blocking read would then wait for data that the other side never sends."""
    peer = {client: upstream, upstream: client}
    for sock in peer:
        sock.setblocking(False)
    try:
        while True:
            ready = [s for s in peer if s.pending()] or select.select(list(peer), [], [], 1.0)[0]
            for src in ready:
                try:
                    data = src.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                if not data:
                    return
                if src is client:
                    record += data
                _send_all(peer[src], data)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        for sock in peer:
            with contextlib.suppress(OSError):
                sock.close()


def _send_all(sock: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except ssl.SSLWantReadError:
            select.select([sock], [], [], 1.0)
        except (ssl.SSLWantWriteError, BlockingIOError):
            select.select([], [sock], [], 1.0)


def decode_requests(stream: bytes) -> list[Request]:
    """HTTP/1.1 requests in a client's byte stream (Content-Length or chunked bodies)."""
    out = []
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = stream[pos:end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        pos = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                eol = stream.find(b"\r\n", pos)
                size = int(stream[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    pos = stream.find(b"\r\n", pos) + 2
                    break
                body += stream[pos:pos + size]
                pos += size + 2
            data = bytes(body)
        else:
            length = int(headers.get("content-length", "0"))
            data = stream[pos:pos + length]
            pos += length
        out.append(Request(method, path, headers, data))
    return out


def pushed_objects(requests: list[Request]) -> dict[str, bytes]:
    """object id -> object content of every Flower object the client uploaded."""
    from flwr.proto.message_pb2 import PushObjectRequest

    objects = {}
    for req in requests:
        if req.path.endswith("/push-object"):
            msg = PushObjectRequest()
            msg.ParseFromString(req.body)
            objects[msg.object_id] = msg.object_content
    return objects


def pushed_messages(requests: list[Request]) -> list:
    """The protobuf Message (metadata; content travels as objects) of every reply the client pushed."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest

    out = []
    for req in requests:
        if req.path.endswith("/push-messages"):
            msg = PushMessagesRequest()
            msg.ParseFromString(req.body)
            out += list(msg.messages_list)
    return out
