"""MIOBuffer / IOBufferReader: what the VConnections and state machines rely on."""

from __future__ import annotations

from iocore.eventsystem.iobuffer import MIOBuffer


def test_bytes_written_into_an_empty_buffer_come_back_whole_and_uncopied() -> None:
    buf = MIOBuffer()
    reader = buf.alloc_reader()
    data = b"GET / HTTP/1.1\r\n\r\n"
    buf.write(data)
    assert reader.read_avail() == len(data)
    out = reader.read()
    assert out is data  # the socket read is handed on as it is
    assert reader.read_avail() == 0
    buf.write(b"next")
    assert reader.read() == b"next"


def test_second_write_after_kept_bytes_appends() -> None:
    buf = MIOBuffer()
    reader = buf.alloc_reader()
    buf.write(b"head\r\n")
    buf.write(bytearray(b"body"))
    buf.write(memoryview(b"-more"))
    assert bytes(reader.peek()) == b"head\r\nbody-more"
    reader.consume(6)
    assert reader.read() == b"body-more"


def test_partial_consume_of_kept_bytes_then_write() -> None:
    buf = MIOBuffer()
    reader = buf.alloc_reader()
    buf.write(b"abcdef")
    with reader.peek(3) as view:
        assert bytes(view) == b"abc"
    reader.consume(3)
    assert reader.read_avail() == 3
    buf.write(b"gh")
    assert reader.read(2) == b"de"
    assert reader.read() == b"fgh"
    assert reader.read_avail() == 0


def test_large_consumed_prefix_of_kept_bytes_is_dropped() -> None:
    buf = MIOBuffer()
    reader = buf.alloc_reader()
    big = bytes(range(256)) * 400  # 102,400 bytes
    buf.write(big)
    reader.consume(70_000)  # past the 64 KiB trim threshold: the prefix goes
    assert reader.read_avail() == len(big) - 70_000
    assert reader.pos == 0
    assert reader.read() == big[70_000:]


def test_water_mark_counts_kept_bytes() -> None:
    buf = MIOBuffer(water_mark=10)
    reader = buf.alloc_reader()
    buf.write(b"0123456789")
    assert buf.high_water()
    assert buf.write_avail() == 0
    reader.consume(4)
    assert not buf.high_water()
    assert buf.write_avail() == 4


def test_downstream_bytes_share_the_water_mark() -> None:
    """An origin read buffer whose bytes go on into a client write buffer: the producer may add
    only what keeps the two together under the one water mark."""
    up = MIOBuffer(water_mark=10)
    up_reader = up.alloc_reader()
    down = MIOBuffer(water_mark=10)
    down_reader = down.alloc_reader()
    up.downstream = down
    up.write(b"0123")
    down.write(up_reader.read())  # moved on, not yet sent: still counts
    assert up.write_avail() == 6
    down.write(b"456789")
    assert up.high_water() and up.write_avail() == 0
    down_reader.consume(7)
    assert up.write_avail() == 7 and not up.high_water()
    up.downstream = None
    assert up.write_avail() == 10


def test_two_readers_each_see_everything() -> None:
    buf = MIOBuffer()
    a = buf.alloc_reader()
    b = buf.alloc_reader()
    buf.write(b"shared")
    assert a.read() == b"shared"
    assert b.read_avail() == 6  # not dropped until every reader consumed it
    buf.write(b"+")
    assert b.read() == b"shared+"
    assert a.read() == b"+"
    assert buf.max_read_avail() == 0


def test_dealloc_all_readers_leaves_no_cycle_and_a_usable_reader() -> None:
    import gc

    gc.collect()
    gc.disable()  # what is freed below is freed by reference counting alone
    try:
        buf = MIOBuffer(1024)
        reader = buf.alloc_reader()
        buf.write(b"abc")
        buf.dealloc_all_readers()
        assert buf.readers == ()
        assert reader.read(1) == b"a"  # a late consume on the owner's side does not raise
        del buf, reader
        assert not [o for o in gc.get_objects() if type(o) is MIOBuffer]
    finally:
        gc.enable()
