"""IOBuffer and VIO: the byte pipes between state machines and VConnections (ATS I_IOBuffer.h,
I_VIO.h).

A MIOBuffer is a growable byte queue with a *water mark*: the producer (e.g. a NetVConnection's
``net_read_io``) stops filling it once ``read_avail()`` reaches the water mark, and waits until the
consumer drains it and re-enables the VIO. That is the whole of tsproxy's backpressure: a slow
reader stops the socket read on the other side, so memory never grows with the body size.

Readers (IOBufferReader) consume from the front; with several readers, bytes are dropped only
after every reader consumed them.

Storage: one contiguous ``bytearray``, except that a ``bytes`` object written into an empty
buffer is kept by reference (as ATS appends an IOBufferBlock) and handed back by reference when
a single reader reads it all. A socket read that is consumed whole, the common case on both
sides of a proxied request, is therefore never copied here. The next write turns it into a
``bytearray``; every path that changes the storage knows it may be ``bytes``. A write into a
non-empty buffer first drops the bytes every reader consumed, so what the buffer stores is what
its readers still need plus the new bytes, never a consumed prefix on top (a slow reader's
buffer stays within its water mark in memory too, not only in count). An empty buffer
holds the shared ``b""``, so the thousands of idle connections' buffers hold no storage object
(as an ATS MIOBuffer with no blocks).

Two buffers in a row (a proxy's origin read buffer whose bytes go on into the client write buffer)
can share one water mark: ``downstream`` names the next buffer, whose unconsumed bytes count
against this buffer's water mark. The producer then stops once the *sum* reaches it, as in ATS's
tunnel where producer and consumer share one buffer: what one transaction buffers is bounded
however slowly its consumer drains.

A VIO describes one direction of I/O on a VConnection: the continuation to call back, how many
bytes are wanted (``nbytes``; ``INT64_MAX`` for "until EOS"), how many are done (``ndone``), the
buffer, and ``reenable()`` to ask the VConnection to continue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from iocore.eventsystem.event import Continuation

INT64_MAX = (1 << 63) - 1
DEFAULT_WATER_MARK = 256 * 1024
_EMPTY: Final = b""


class MIOBuffer:
    """A byte queue with readers and a water mark."""

    __slots__ = ("_buf", "_first", "_others", "downstream", "water_mark")

    def __init__(self, water_mark: int = DEFAULT_WATER_MARK) -> None:
        self._buf: bytearray | bytes = _EMPTY
        # The readers: nearly every buffer has exactly one for life, held directly; any more
        # are in a tuple (no container at all for the common case).
        self._first: IOBufferReader | None = None
        self._others: tuple[IOBufferReader, ...] = ()
        self.water_mark = water_mark
        self.downstream: MIOBuffer | None = None  # its pending bytes count against water_mark

    @property
    def readers(self) -> tuple[IOBufferReader, ...]:
        first = self._first
        return () if first is None else (first, *self._others)

    def alloc_reader(self) -> IOBufferReader:
        """A new reader starts at the oldest byte any reader still needs."""
        reader = IOBufferReader(self, self._low())
        if self._first is None:
            self._first = reader
        else:
            self._others = (*self._others, reader)
        return reader

    def dealloc_all_readers(self) -> None:
        """Forget every reader (ATS ``dealloc_all_readers``) when the owner is done with the
        buffer: a reader points back at its buffer, so the pair is otherwise a reference cycle."""
        self._first = None
        self._others = ()

    def _low(self) -> int:
        """The position of the oldest byte some reader still needs (0 without readers)."""
        first = self._first
        if first is None:
            return 0
        low = first.pos
        for r in self._others:
            if r.pos < low:
                low = r.pos
        return low

    def write(self, data: bytes | bytearray | memoryview) -> int:
        buf = self._buf
        if not buf and type(data) is bytes:
            self._buf = data  # empty, so every reader is at 0: keep the bytes, no copy
            return len(data)
        low = self._low()
        if isinstance(buf, bytes):
            # The copy a kept ``bytes`` needs anyway leaves out what every reader consumed.
            buf = self._buf = bytearray(memoryview(buf)[low:] if low else buf)
        elif low:
            del buf[:low]  # the consumed prefix goes before the buffer grows (at most one memmove)
        if low:
            self._shift(low)
        buf += data
        return len(data)

    def _shift(self, low: int) -> None:
        """The first ``low`` bytes left the storage: every reader's position moves back."""
        first = self._first
        if first is not None:
            first.pos -= low
            for r in self._others:
                r.pos -= low

    def max_read_avail(self) -> int:
        return len(self._buf) - self._low()

    def write_avail(self) -> int:
        """How many bytes may still be added before the water mark is reached."""
        avail = self.water_mark - len(self._buf) + self._low()
        down = self.downstream
        if down is not None:
            avail -= down.max_read_avail()
        return avail if avail > 0 else 0

    def high_water(self) -> bool:
        held = len(self._buf) - self._low()
        down = self.downstream
        if down is not None:
            held += down.max_read_avail()
        return held >= self.water_mark

    def _trim(self) -> None:
        # Drop consumed bytes when everything was consumed (the storage goes) or when the consumed
        # prefix is large; otherwise defer, so small consumes do not memmove the tail each time.
        low = self._low()
        buf = self._buf
        if low == len(buf):
            self._buf = _EMPTY
        elif low > 65536:
            if isinstance(buf, bytes):
                self._buf = bytearray(memoryview(buf)[low:])
            else:
                del buf[:low]
        else:
            return
        self._shift(low)


class IOBufferReader:
    """A consumer's position in a MIOBuffer."""

    __slots__ = ("mbuf", "pos")

    def __init__(self, mbuf: MIOBuffer, pos: int) -> None:
        self.mbuf = mbuf
        self.pos = pos

    def read_avail(self) -> int:
        return len(self.mbuf._buf) - self.pos

    def peek(self, n: int = -1) -> memoryview:
        """A view of up to n available bytes (all when n < 0); valid until the next consume/write."""
        buf = self.mbuf._buf
        end = len(buf) if n < 0 else min(len(buf), self.pos + n)
        return memoryview(buf)[self.pos : end]

    def read(self, n: int = -1) -> bytes:
        mbuf = self.mbuf
        buf = mbuf._buf
        if self.pos == 0 and (n < 0 or n >= len(buf)) and mbuf._first is self and not mbuf._others:
            # Everything, one reader: the buffer empties (what consume() would do); kept bytes
            # are handed over as they are, a bytearray is copied once.
            mbuf._buf = _EMPTY
            return buf if isinstance(buf, bytes) else bytes(buf)
        end = len(buf) if n < 0 else min(len(buf), self.pos + n)
        data = bytes(buf[self.pos : end])
        self.consume(end - self.pos)
        return data

    def consume(self, n: int) -> None:
        self.pos += n
        self.mbuf._trim()


class VIO:
    """One direction of I/O on a VConnection (ATS VIO)."""

    READ: Final = 1
    WRITE: Final = 2

    __slots__ = ("buffer", "cont", "nbytes", "ndone", "op", "reader", "vc")

    def __init__(self, op: int) -> None:
        self.op = op
        self.cont: Continuation | None = None
        self.nbytes = 0
        self.ndone = 0
        self.buffer: MIOBuffer | None = None  # read VIO: where the VC puts bytes
        self.reader: IOBufferReader | None = None  # write VIO: where the VC takes bytes from
        self.vc: Any = None

    def reenable(self) -> None:
        """Tell the VConnection the consumer/producer made room or data: continue the I/O."""
        if self.vc is not None:
            self.vc.reenable(self)

    def disable(self) -> None:
        if self.vc is not None:
            self.vc.disable(self)
