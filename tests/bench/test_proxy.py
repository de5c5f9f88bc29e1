"""The shaping proxy adds the round-trip time and caps the bandwidth, on loopback only."""

import socket
import threading
import time

import pytest

from fedsplit.bench.proxy import ShapingProxy, TokenBucket


@pytest.fixture
def echo_server():
    """A TCP echo server on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(10)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()
    stop.set()
    sock.close()


def round_trip(address: str, payload: bytes) -> float:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        conn.sendall(payload)
        received = 0
        while received < len(payload):
            received += len(conn.recv(65536))
        return time.perf_counter() - start


def test_proxy_adds_the_round_trip_time(echo_server):
    with ShapingProxy(echo_server, rtt_ms=80) as proxy:
        round_trip(proxy.address, b"x")  # connect and warm up
        seconds = round_trip(proxy.address, b"hello")
    assert 0.08 <= seconds < 0.5


def test_proxy_caps_the_bandwidth(echo_server):
    payload = b"\0" * 200_000  # 1.6 Mbit each way at 8 Mbit/s: >= 0.2 s even when both directions overlap
    with ShapingProxy(echo_server, bandwidth_mbps=8, burst_bytes=1024) as proxy:
        seconds = round_trip(proxy.address, payload)
        assert proxy.bytes["up"] == proxy.bytes["down"] == len(payload)
    assert 0.2 <= seconds < 3.0


def test_token_bucket_keeps_the_long_run_rate():
    bucket = TokenBucket(rate=1000.0, burst=100.0)
    start = bucket.stamp
    departures = [bucket.departure(100, now=start) for _ in range(10)]
    assert departures == sorted(departures)
    # 1000 bytes at 1000 B/s, the first 100 from the burst
    assert departures[-1] - start == pytest.approx(0.9)


def test_proxy_refuses_a_target_off_loopback():
    with pytest.raises(ValueError, match="loopback"):
        ShapingProxy(("10.0.0.1", 80))
