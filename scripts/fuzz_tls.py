#!/usr/bin/env python3
"""Mutation fuzzing of tsproxy's TLS front over real sockets (issue 8, item 1).

Inputs start from the real ClientHellos in ``tests/data/client_hellos/*.bin`` and are mutated
structure-aware: truncated at every offset, oversized records and messages, wrong values in every
length field, bad record/client versions, 1,000 extensions (unknown, duplicate SNI), junk after the
hello, the handshake split over TLS records at every byte and over TCP segments, other record
types first, SSLv2-style hellos, havoc (bit flips, inserts, deletes) and plain random bytes.

Each input is one TCP connection to the proxy: connect, send the bytes (some in timed pieces),
then half-close (most) or reset (some), read whatever the proxy says until it closes (bounded).
Many connections are in flight at once (``--parallel``). Meanwhile and at the end:

* the worker pids (``status`` over the control socket) must not change: a changed or missing pid
  is a crash;
* ``/proc/PID/fd`` of every worker is counted before and after (after the proxy has had time to
  close what the fuzzer left behind): a growth is a leak;
* a normal TLS client (Python ``ssl``) must still complete a handshake and an HTTP exchange.

Run against a running proxy::

    python scripts/fuzz_tls.py --port 8443 --config-dir /etc/tsproxy --count 100000

or let the script start its own (trustme certificates, a tiny origin, 2 workers)::

    python scripts/fuzz_tls.py --count 100000 --workers 2

It prints one JSON object of figures (inputs, per-family counts, crashes, fds before/after,
seconds) and exits 1 if a worker crashed, fds leaked or the final client was not served.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import selectors
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HELLO_DIR = REPO / "tests" / "data" / "client_hellos"

# --------------------------------------------------------------------------------------------------
# ClientHello structure (enough to find every length field)
# --------------------------------------------------------------------------------------------------


@dataclass
class Hello:
    """A ClientHello broken into fields; ``build()`` reassembles with correct lengths."""

    client_version: int
    random: bytes
    session_id: bytes
    ciphers: bytes
    compression: bytes
    extensions: list[tuple[int, bytes]]
    record_version: int = 0x0301

    @classmethod
    def parse(cls, data: bytes) -> Hello:
        assert data[0] == 22
        rec_version = struct.unpack(">H", data[1:3])[0]
        body = b""
        pos = 0
        while pos < len(data):  # reassemble records
            n = struct.unpack(">H", data[pos + 3 : pos + 5])[0]
            body += data[pos + 5 : pos + 5 + n]
            pos += 5 + n
        assert body[0] == 1
        hlen = int.from_bytes(body[1:4], "big")
        m = body[4 : 4 + hlen]
        p = 0
        cv = struct.unpack(">H", m[p : p + 2])[0]
        p += 2
        rnd = m[p : p + 32]
        p += 32
        sl = m[p]
        sid = m[p + 1 : p + 1 + sl]
        p += 1 + sl
        cl = struct.unpack(">H", m[p : p + 2])[0]
        ciphers = m[p + 2 : p + 2 + cl]
        p += 2 + cl
        col = m[p]
        comp = m[p + 1 : p + 1 + col]
        p += 1 + col
        exts: list[tuple[int, bytes]] = []
        if p < len(m):
            el = struct.unpack(">H", m[p : p + 2])[0]
            p += 2
            end = p + el
            while p < end:
                t, n = struct.unpack(">HH", m[p : p + 4])
                exts.append((t, m[p + 4 : p + 4 + n]))
                p += 4 + n
        return cls(cv, rnd, sid, ciphers, comp, exts, rec_version)

    # Each "len_*" is an override hook: None means the correct value.
    def message(
        self,
        *,
        len_sid: int | None = None,
        len_ciphers: int | None = None,
        len_comp: int | None = None,
        len_exts: int | None = None,
        ext_len_override: dict[int, int] | None = None,
        omit_exts: bool = False,
    ) -> bytes:
        out = struct.pack(">H", self.client_version) + self.random
        out += bytes([(len(self.session_id) if len_sid is None else len_sid) & 0xFF]) + self.session_id
        out += (
            struct.pack(">H", (len(self.ciphers) if len_ciphers is None else len_ciphers) & 0xFFFF)
            + self.ciphers
        )
        out += bytes([(len(self.compression) if len_comp is None else len_comp) & 0xFF]) + self.compression
        if omit_exts:
            return out
        ext_blob = b""
        for i, (t, d) in enumerate(self.extensions):
            n = len(d)
            if ext_len_override and i in ext_len_override:
                n = ext_len_override[i]
            ext_blob += struct.pack(">HH", t, n & 0xFFFF) + d
        out += struct.pack(">H", (len(ext_blob) if len_exts is None else len_exts) & 0xFFFF) + ext_blob
        return out

    def handshake(self, body: bytes | None = None, *, hs_len: int | None = None, hs_type: int = 1) -> bytes:
        body = self.message() if body is None else body
        n = len(body) if hs_len is None else hs_len
        return bytes([hs_type]) + (n & 0xFFFFFF).to_bytes(3, "big") + body

    def build(self, **kw: Any) -> bytes:
        return records(self.handshake(self.message(**kw)), self.record_version)


def records(payload: bytes, version: int = 0x0301, *, ctype: int = 22, size: int = 16384) -> bytes:
    """``payload`` as TLS records of at most ``size`` bytes."""
    out = b""
    for i in range(0, max(len(payload), 1), size):
        piece = payload[i : i + size]
        out += struct.pack(">BHH", ctype, version, len(piece)) + piece
    return out


def load_hellos(directory: Path = HELLO_DIR) -> list[tuple[str, bytes]]:
    return [(p.stem, p.read_bytes()) for p in sorted(directory.glob("*.bin"))]


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class Input:
    family: str
    pieces: list[bytes]  # sent with a short pause between pieces (TCP segments)
    reset: bool = False  # close with RST instead of a half-close


BAD_VERSIONS = [
    0x0000,
    0x0002,
    0x0200,
    0x0300,
    0x0301,
    0x0302,
    0x0303,
    0x0304,
    0x0305,
    0x03FF,
    0x7F1C,
    0xFEFD,
    0xFFFF,
]


def deterministic(hellos: list[tuple[str, bytes]]) -> Iterator[Input]:
    """Systematic families: every truncation point, every record split point, every length field."""
    for _name, raw in hellos:
        h = Hello.parse(raw)
        hs = h.handshake()
        for k in range(len(raw)):
            yield Input("truncated", [raw[:k]])
        for k in range(1, len(hs)):  # handshake split over two records at every byte
            yield Input(
                "record_split", [records(hs[:k], h.record_version) + records(hs[k:], h.record_version)]
            )
        yield Input("record_split_1byte", [b"".join(records(hs[i : i + 1]) for i in range(len(hs)))])
        for k in range(1, min(len(raw), 80)):  # TCP split (two segments) at the first 80 offsets
            yield Input("tcp_split", [raw[:k], raw[k:]])
        for v in BAD_VERSIONS:
            h2 = Hello.parse(raw)
            h2.client_version = v
            yield Input("bad_client_version", [h2.build()])
            h2 = Hello.parse(raw)
            h2.record_version = v
            yield Input("bad_record_version", [h2.build()])
            h2 = Hello.parse(raw)
            h2.extensions = [
                (t, bytes([2]) + struct.pack(">H", v) if t == 43 else d) for t, d in h2.extensions
            ]
            yield Input("bad_supported_versions", [h2.build()])
        for delta in (-2, -1, 1, 2, 255, 0xFFFF):
            yield Input("wrong_len", [h.build(len_sid=len(h.session_id) + delta)])
            yield Input("wrong_len", [h.build(len_ciphers=len(h.ciphers) + delta)])
            yield Input("wrong_len", [h.build(len_comp=len(h.compression) + delta)])
            yield Input("wrong_len", [h.build(len_exts=sum(4 + len(d) for _, d in h.extensions) + delta)])
            for i in range(len(h.extensions)):
                yield Input("wrong_len", [h.build(ext_len_override={i: len(h.extensions[i][1]) + delta})])
            yield Input("wrong_len", [records(h.handshake(hs_len=len(h.message()) + delta))])
            body = records(h.handshake())
            n = struct.unpack(">H", body[3:5])[0]
            yield Input("wrong_len", [body[:3] + struct.pack(">H", (n + delta) & 0xFFFF) + body[5:]])


def many_extensions(h: Hello, rng: random.Random, n: int = 1000) -> list[bytes]:
    """1,000 extensions of a few shapes; split into records as needed."""
    out = []
    for kind in ("unknown", "dup_sni", "empty", "grease", "mixed"):
        h2 = Hello.parse(Hello.build(h))
        sni = next((d for t, d in h.extensions if t == 0), b"\x00\x05\x00\x00\x02ab")
        if kind == "unknown":
            extra = [(0x5000 + i, b"x" * (i % 7)) for i in range(n)]
        elif kind == "dup_sni":
            extra = [(0, sni) for _ in range(n)]
        elif kind == "empty":
            extra = [(0xFF00 + (i % 200), b"") for i in range(n)]
        elif kind == "grease":
            extra = [(0x0A0A + 0x1010 * (i % 16), b"") for i in range(n)]
        else:
            extra = [(rng.randrange(0x10000), rng.randbytes(rng.randrange(8))) for _ in range(n)]
        h2.extensions = h.extensions + extra
        out.append(records(h2.handshake()))
    return out


def oversized(h: Hello, rng: random.Random) -> list[bytes]:
    hs = h.handshake()
    big_ext = (0xFFFE, b"\x00" * 60000)
    h2 = Hello.parse(Hello.build(h))
    h2.extensions = [*h.extensions, big_ext]
    return [
        struct.pack(">BHH", 22, 0x0301, 0xFFFF) + hs + b"\x00" * 100,  # record length 65535
        struct.pack(">BHH", 22, 0x0301, 16384 + 2049) + hs + b"\x00" * (16384 + 2049 - len(hs)),
        records(h.handshake(hs_len=0xFFFFFF)),  # message claims 16 MiB
        records(h.handshake(hs_len=200000)) + records(b"\x00" * 40000),
        records(h2.handshake()),  # 60 kB extension, in 4 records
        records(hs + b"\x00" * 70000),  # hello + 70 kB more handshake bytes
        records(rng.randbytes(100000)),
    ]


def junk_after(raw: bytes, rng: random.Random) -> list[bytes]:
    return [
        raw + rng.randbytes(rng.randrange(1, 2000)),
        raw + raw,
        raw + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        raw + records(b"\x01\x00", ctype=21),  # alert
        raw + records(b"\x01", ctype=20),  # change_cipher_spec
        raw + records(rng.randbytes(64), ctype=23),  # application data before the handshake
        raw + records(b"\x01\x40\x00" + b"x" * 64, ctype=24),  # heartbeat request
        raw + struct.pack(">BHH", 22, 0x0303, 0),  # empty handshake record
    ]


def first_records(raw: bytes, rng: random.Random) -> list[bytes]:
    return [
        records(b"\x01\x00", ctype=21) + raw,
        records(b"\x01", ctype=20) + raw,
        records(rng.randbytes(40), ctype=23) + raw,
        records(b"\x01\x40\x00" + b"x" * 64, ctype=24) + raw,
        struct.pack(">BHH", 22, 0x0301, 0) + raw,  # zero-length handshake record first
        records(b"", ctype=22) * 50 + raw,
        bytes([0x80, 0x2E, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10])
        + rng.randbytes(37),  # SSLv2
        records(raw[5:], ctype=rng.choice([0, 19, 25, 99, 255])),
    ]


def havoc(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        op = rng.randrange(6)
        if not b:
            b += rng.randbytes(8)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 32))
        elif op == 3:
            del b[i : i + rng.randrange(1, 32)]
        elif op == 4:
            b[i] = rng.choice([0x00, 0xFF, 0x7F, 0x80])
        else:
            j = rng.randrange(len(b))
            b[i : i + 2] = b[j : j + 2]
    return bytes(b)


def random_inputs(hellos: list[tuple[str, bytes]], rng: random.Random) -> Iterator[Input]:
    """Endless mix of the random families, weighted towards havoc on real hellos."""
    parsed = [(raw, Hello.parse(raw)) for _, raw in hellos]
    while True:
        raw, h = rng.choice(parsed)
        r = rng.random()
        if r < 0.45:
            yield Input("havoc", [havoc(raw, rng)], reset=rng.random() < 0.2)
        elif r < 0.55:
            k = rng.randrange(len(raw) + 1)
            yield Input("truncated", [raw[:k]], reset=rng.random() < 0.5)
        elif r < 0.62:
            yield Input("junk_after", [rng.choice(junk_after(raw, rng))])
        elif r < 0.68:
            yield Input("other_record_first", [rng.choice(first_records(raw, rng))])
        elif r < 0.72:
            yield Input("oversized", [rng.choice(oversized(h, rng))])
        elif r < 0.75:
            yield Input("many_extensions", [rng.choice(many_extensions(h, rng))])
        elif r < 0.85:
            n = rng.randrange(0, 3000)
            blob = rng.randbytes(n)
            if rng.random() < 0.5 and n >= 5:  # random body behind a plausible record header
                blob = struct.pack(">BHH", 22, 0x0301, min(n - 5, 0xFFFF)) + blob[5:]
            yield Input("random", [blob], reset=rng.random() < 0.2)
        elif r < 0.93:
            data = havoc(raw, rng)
            cuts = sorted(rng.sample(range(1, len(data)), min(rng.randrange(1, 6), len(data) - 1)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            yield Input("tcp_split_havoc", pieces)
        else:
            hs = h.handshake()
            cuts = sorted(rng.sample(range(1, len(hs)), rng.randrange(1, 12)))
            frags = [hs[a:b] for a, b in zip([0, *cuts], [*cuts, len(hs)], strict=True)]
            data = b"".join(records(f, h.record_version) for f in frags)
            yield Input("record_split_random", [havoc(data, rng) if rng.random() < 0.3 else data])


def all_inputs(hellos: list[tuple[str, bytes]], seed: int) -> Iterator[Input]:
    """The systematic inputs (shuffled) interleaved 1:1 with random ones, then random ones only."""
    rng = random.Random(seed)
    fixed = list(deterministic(hellos))
    for _, raw in hellos:
        h = Hello.parse(raw)
        fixed += [Input("many_extensions", [data]) for data in many_extensions(h, rng)]
        fixed += [Input("oversized", [data]) for data in oversized(h, rng)]
        fixed += [Input("junk_after", [data]) for data in junk_after(raw, rng)]
        fixed += [Input("other_record_first", [data]) for data in first_records(raw, rng)]
    rng.shuffle(fixed)
    rand = random_inputs(hellos, rng)
    for inp in fixed:
        yield inp
        yield next(rand)
    yield from rand


# --------------------------------------------------------------------------------------------------
# the driver: many connections in flight on one selector
# --------------------------------------------------------------------------------------------------


@dataclass
class _Conn:
    sock: socket.socket
    inp: Input
    started: float
    piece: int = 0
    offset: int = 0
    next_send: float = 0.0
    sent_all: bool = False
    got: int = 0


@dataclass
class Stats:
    inputs: int = 0
    families: Counter[str] = field(default_factory=Counter)
    connect_errors: int = 0
    proxy_closed: int = 0  # the proxy closed the connection (EOF or RST) after our input
    proxy_reset: int = 0  # ... of which with an error on our side (RST, refused)
    fuzzer_gave_up: int = 0  # the proxy kept the connection open past --linger; we closed it
    bytes_back: int = 0
    server_replied: int = 0  # connections where the proxy sent something (alert, ServerHello)


class Fuzzer:
    def __init__(self, host: str, port: int, *, parallel: int = 48, linger: float = 3.0) -> None:
        self.addr = (host, port)
        self.parallel = parallel
        self.linger = linger
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.stats = Stats()

    def _open(self, inp: Input) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self.stats.connect_errors += 1
            s.close()
            return
        c = _Conn(s, inp, time.monotonic())
        self.conns[s.fileno()] = c
        self.sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, c)
        self.stats.inputs += 1
        self.stats.families[inp.family] += 1

    def _finish(self, c: _Conn, *, proxy_closed: bool) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        self.conns.pop(c.sock.fileno(), None)
        if proxy_closed:
            self.stats.proxy_closed += 1
        else:
            self.stats.fuzzer_gave_up += 1
        if c.got:
            self.stats.server_replied += 1
        c.sock.close()

    def _send_more(self, c: _Conn, now: float) -> None:
        if now < c.next_send:
            return
        pieces = c.inp.pieces
        while c.piece < len(pieces):
            data = pieces[c.piece]
            try:
                n = c.sock.send(data[c.offset :]) if data else 0
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the proxy already reset us
                self._finish(c, proxy_closed=True)
                return
            c.offset += n
            if c.offset < len(data):
                return
            c.piece += 1
            c.offset = 0
            if c.piece < len(pieces):
                c.next_send = now + 0.002  # a separate TCP segment
                return
        c.sent_all = True
        if c.inp.reset:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._finish(c, proxy_closed=True)  # we reset; nothing more to see
            return
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        self.sel.modify(c.sock, selectors.EVENT_READ, c)

    def _step(self, timeout: float) -> None:
        now = time.monotonic()
        for key, mask in self.sel.select(timeout):
            c: _Conn = key.data
            if c.sock.fileno() < 0 or c.sock.fileno() not in self.conns:
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    self.stats.proxy_reset += 1
                    self._finish(c, proxy_closed=True)
                    continue
                if data == b"":
                    self._finish(c, proxy_closed=True)
                    continue
                if data:
                    c.got += len(data)
                    self.stats.bytes_back += len(data)
            if mask & selectors.EVENT_WRITE and not c.sent_all:
                self._send_more(c, now)
        for c in list(self.conns.values()):
            if not c.sent_all and c.piece > 0 and now >= c.next_send:
                self._send_more(c, now)
            elif now - c.started > self.linger:
                self._finish(c, proxy_closed=False)

    def run(
        self,
        inputs: Iterator[Input],
        count: int,
        *,
        every: int = 0,
        check: Callable[[int], None] | None = None,
    ) -> Stats:
        sent = 0
        while sent < count or self.conns:
            while sent < count and len(self.conns) < self.parallel:
                self._open(next(inputs))
                sent += 1
                if check is not None and every and sent % every == 0:
                    check(sent)
            self._step(0.005)
        return self.stats


# --------------------------------------------------------------------------------------------------
# watching the proxy
# --------------------------------------------------------------------------------------------------


def worker_pids(config_dir: Path) -> list[int]:
    sys.path.insert(0, str(REPO))
    from tsproxy import control
    from tsproxy.config import ProxyConfig  # noqa: F401  (import check only)

    state = _state_dir(config_dir)
    status = control.call(control.socket_path(state), "status", None, 10.0)
    return [int(w["pid"]) for w in status["workers"]]


def _state_dir(config_dir: Path) -> Path:
    rec = (config_dir / "records.config").read_text()
    for line in rec.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "proxy.config.local_state_dir":
            p = Path(parts[3])
            return p if p.is_absolute() else config_dir / p
    return config_dir / "run"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fds_of(pids: list[int]) -> dict[int, int]:
    return {pid: fd_count(pid) for pid in pids}


def wait_fds_settle(pids: list[int], baseline: dict[int, int], timeout: float) -> dict[int, int]:
    """The fd counts once they are back to the baseline (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        now = fds_of(pids)
        if all(now[p] <= baseline[p] for p in pids) or time.monotonic() >= deadline:
            return now
        time.sleep(0.1)


def normal_client(host: str, port: int, cafile: str | None, sni: str, http_host: str) -> bytes:
    ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
    ctx.check_hostname = bool(cafile)
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as s,
    ):
        s.sendall(f"GET / HTTP/1.1\r\nHost: {http_host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def fuzz(
    host: str,
    port: int,
    config_dir: Path,
    *,
    count: int,
    seed: int = 1,
    parallel: int = 48,
    linger: float = 3.0,
    settle: float = 10.0,
    cafile: str | None = None,
    sni: str = "proxy.test",
    http_host: str = "origin.test",
) -> dict[str, Any]:
    """Fuzz, watch, check; returns the figures (also what the CLI prints)."""
    hellos = load_hellos()
    pids = worker_pids(config_dir)
    before = fds_of(pids)
    pid_changes: list[str] = []

    def check(sent: int) -> None:
        now = worker_pids(config_dir)
        if now != pids:
            pid_changes.append(f"after {sent} inputs: {pids} -> {now}")

    def accepts() -> int:
        from tsproxy import control

        result = control.call(
            control.socket_path(_state_dir(config_dir)),
            "metric.get",
            {"names": ["proxy.process.net.accepts_total"]},
            10.0,
        )
        return int(result["metrics"][0][1])

    accepts0 = accepts()
    t0 = time.monotonic()
    fz = Fuzzer(host, port, parallel=parallel, linger=linger)
    stats = fz.run(all_inputs(hellos, seed), count, every=1000, check=check)
    elapsed = time.monotonic() - t0
    check(count)
    after = wait_fds_settle(pids, before, settle) if not pid_changes else {}
    final = normal_client(host, port, cafile, sni, http_host)
    return {
        "inputs": stats.inputs,
        "families": dict(sorted(stats.families.items())),
        "seconds": round(elapsed, 1),
        "inputs_per_second": round(stats.inputs / elapsed, 1) if elapsed else None,
        "connect_errors": stats.connect_errors,
        "proxy_closed": stats.proxy_closed,
        "proxy_reset": stats.proxy_reset,
        "accepts_total": accepts() - accepts0,
        "fuzzer_gave_up": stats.fuzzer_gave_up,
        "server_replied": stats.server_replied,
        "worker_pids": pids,
        "crashes": len(pid_changes),
        "pid_changes": pid_changes,
        "fds_before": {str(k): v for k, v in before.items()},
        "fds_after": {str(k): v for k, v in after.items()},
        "final_client_status": final.split(b"\r\n", 1)[0].decode(errors="replace"),
    }


def ok(result: dict[str, Any]) -> bool:
    return (
        result["crashes"] == 0
        and all(result["fds_after"].get(k, 1 << 30) <= v for k, v in result["fds_before"].items())
        and result["final_client_status"].startswith("HTTP/1.1 200")
    )


# --------------------------------------------------------------------------------------------------
# a self-contained proxy for the CLI (no --port given)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_proxy(
    workers: int, handshake_timeout: int, records: dict[str, Any] | None = None, *, rsa: bool = False
) -> Iterator[tuple[int, Path, str]]:
    import http.server
    import subprocess
    import threading

    import trustme

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TSPROXY_CMD, subprocess_env, write_config_dir  # type: ignore[import-not-found]

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a: Any) -> None:
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert("proxy.test", key_type=trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA)
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = write_config_dir(
            d / "etc",
            {
                "proxy.config.http.server_ports": f"{port}:ssl:ip-in=127.0.0.1",
                "proxy.config.exec_thread.limit": workers,
                "proxy.config.ssl.handshake_timeout_in": handshake_timeout,
                **(records or {}),
            },
            {
                "certs/proxy.pem": leaf.private_key_and_cert_chain_pem.bytes(),
                "ssl_multicert.config": "dest_ip=* ssl_cert_name=certs/proxy.pem\n",
                "remap.config": f"map https://origin.test/ http://127.0.0.1:{origin.server_address[1]}/\n",
            },
        )
        with open(d / "proxy.out", "wb") as out:
            proc = subprocess.Popen(
                [*TSPROXY_CMD, "start", "--config-dir", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    pids = worker_pids(cfg)
                    if pids and all(pids):
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("tsproxy did not start:\n" + (d / "proxy.out").read_text())
                time.sleep(0.1)
            time.sleep(0.3)
            yield port, cfg, str(d / "ca.pem")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
            origin.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="a running proxy's TLS port (default: start our own)")
    ap.add_argument("--config-dir", type=Path, help="the running proxy's config dir (for status)")
    ap.add_argument("--cafile", help="CA of the proxy certificate, for the final client")
    ap.add_argument("--sni", default="proxy.test")
    ap.add_argument("--http-host", default="origin.test")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=48)
    ap.add_argument("--linger", type=float, default=3.0, help="seconds to wait for the proxy to close")
    ap.add_argument("--workers", type=int, default=2, help="own proxy: ET_NET workers")
    ap.add_argument("--handshake-timeout", type=int, default=2, help="own proxy: handshake_timeout_in")
    args = ap.parse_args(argv)
    if args.port is not None:
        if args.config_dir is None:
            ap.error("--port needs --config-dir (to read worker pids)")
        result = fuzz(
            args.host,
            args.port,
            args.config_dir,
            count=args.count,
            seed=args.seed,
            parallel=args.parallel,
            linger=args.linger,
            cafile=args.cafile,
            sni=args.sni,
            http_host=args.http_host,
        )
    else:
        with own_proxy(args.workers, args.handshake_timeout) as (port, cfg, ca):
            result = fuzz(
                "127.0.0.1",
                port,
                cfg,
                count=args.count,
                seed=args.seed,
                parallel=args.parallel,
                linger=args.linger,
                cafile=ca,
                sni="proxy.test",
                http_host="origin.test",
                settle=args.handshake_timeout + 10,
            )
    result["ok"] = ok(result)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
