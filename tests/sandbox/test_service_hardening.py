"""The sandbox service against hostile clients (issue 23, items 1-5): each test runs a real
server on an ephemeral loopback port and stays bounded (socket timeouts, short deadlines)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from grpo.sandbox.server import SandboxServer


@contextlib.contextmanager
def serve(**kw):
    srv = SandboxServer("127.0.0.1", 0, **kw)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def post(srv, obj, *, headers=None, timeout=10.0, raw: bytes | None = None):
    """(status, decoded JSON body) of one POST /run on a fresh connection."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = raw if raw is not None else json.dumps(obj).encode()
        conn.request("POST", "/run", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def health(srv, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/health", headers=headers or {})
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


# -- 1. a big secret_in cannot jam a worker ---------------------------------------------------
READ_SECRET = """
import os
fd = int(os.environ["GRPO_SECRET_FD"])
got = b""
while True:
    c = os.read(fd, 1 << 16)
    if not c:
        break
    got += c
print(len(got), got == b"s" * len(got))
"""


def test_big_secret_in_cannot_jam_a_worker():
    # One worker, no queue: a handler stuck on the secret's pipe would turn every later run away.
    with serve(workers=1, max_queue=0) as srv:
        secret = "s" * (70 << 10)  # over a pipe's 64 KiB
        t0 = time.monotonic()
        st, r = post(srv, {"program": "print(1)", "secret_in": secret})  # never reads its secret
        assert (st, r["status"], r["stdout"]) == (200, "ok", "1\n") and time.monotonic() - t0 < 5
        # a run that never reads it and never ends still ends at its wall_time
        st, r = post(srv, {"program": "import time; time.sleep(60)", "secret_in": secret,
                           "limits": {"wall_time": 1, "cpu_time": 1}})
        assert (st, r["status"]) == (200, "timeout") and r["wall_time"] < 3
        # a run that reads it gets all of it (1 MiB, sixteen pipefuls)
        st, r = post(srv, {"program": READ_SECRET, "secret_in": "s" * (1 << 20)})
        assert (st, r["status"], r["stdout"]) == (200, "ok", f"{1 << 20} True\n")
        assert health(srv)["busy"] == 0 and health(srv)["queued"] == 0


# -- 2. every limit has a maximum ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["wall_time", "cpu_time", "memory_mb", "max_procs", "file_size_mb", "open_files",
                                  "tmp_size_mb", "stdout_bytes", "stderr_bytes"])
def test_every_limit_has_a_maximum(name):
    with serve(workers=1, max_queue=0) as srv:
        # e.g. stdout_bytes=1 TB: a run printing 400 MB took the server from 30 to 1,626 MiB
        st, r = post(srv, {"program": "print(1)", "limits": {name: 10 ** 12}}, timeout=5)
        assert st == 400 and name in r["error"] and "maximum" in r["error"]
        cap = health(srv)["max_limits"][name]  # clients can see them
        st, r = post(srv, {"program": "print(1)", "limits": {name: int(cap) + 1}}, timeout=5)
        assert st == 400
        st, r = post(srv, {"program": "print(1)", "limits": {name: int(cap)}}, timeout=20)  # the maximum itself runs
        assert (st, r["status"]) == (200, "ok")
    with pytest.raises(ValueError, match="unknown limits"):
        SandboxServer("127.0.0.1", 0, max_limits={"stdout_mb": 1})


# -- 3. slow clients ----------------------------------------------------------------------------
def read_until_closed(s: socket.socket, limit: float = 5.0) -> bytes:
    s.settimeout(limit)
    got = b""
    try:
        while True:
            c = s.recv(65536)
            if not c:
                return got
            got += c
    except ConnectionResetError:  # turned away before it was read: closed all the same
        return got


def test_slow_clients_cannot_hold_threads():
    with serve(workers=1, max_queue=2, request_timeout=1.0, max_connections=8, max_body=64 << 10,
               max_buffered=100 << 10) as srv:
        base = threading.active_count()
        t0 = time.monotonic()
        # one client drips its headers a byte every 0.1 s: each read is quick, the whole never ends
        drip = socket.create_connection(srv.server_address, timeout=5)
        dripped = []

        def dripper():
            try:
                for b in b"POST /run HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200:
                    drip.send(bytes([b]))
                    time.sleep(0.1)
            except OSError:
                dripped.append(time.monotonic() - t0)

        th = threading.Thread(target=dripper, daemon=True)
        th.start()
        # a body of 60 KiB announced, 10 bytes sent, then nothing; a second one would buffer too much
        big = socket.create_connection(srv.server_address, timeout=5)
        big.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: 61440\r\n\r\n{\"progra")
        while srv._buffered < 61440 and time.monotonic() - t0 < 2:  # its headers are read
            time.sleep(0.01)
        over = socket.create_connection(srv.server_address, timeout=5)
        over.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: 61440\r\n\r\n{\"progra")
        assert b" 503 " in read_until_closed(over)
        # 40 uploads that stall in their body
        stalled = []
        for _ in range(40):
            s = socket.create_connection(srv.server_address, timeout=5)
            s.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"program\"")
            stalled.append(s)
        time.sleep(0.2)
        # a thread per connection held, at most max_connections (plus this test's dripping thread)
        assert srv.connections == 8 and threading.active_count() - base <= 8 + 1
        answers = [read_until_closed(s) for s in stalled + [big]]
        # within about request_timeout each one is answered 408 (or was turned away at once) and closed
        assert time.monotonic() - t0 < 3
        assert all(b" 408 " in a or b" 503 " in a or a == b"" for a in answers)
        assert sum(b" 408 " in a for a in answers) >= 5 and sum(b" 503 " in a for a in answers) >= 20
        th.join(5)
        assert dripped and dripped[0] < 3  # the dripping client lost its connection at the deadline
        time.sleep(0.2)
        assert threading.active_count() - base <= 1 and health(srv)["connections"] == 1  # (this one)
        st, r = post(srv, {"program": "print(1)"})
        assert (st, r["status"]) == (200, "ok")
        for s in stalled + [big, over, drip]:
            s.close()
