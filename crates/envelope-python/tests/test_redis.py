"""A real redis-server, called through redis-py inside an envelope: paused, its calls time out and the breaker
opens; then calls fail fast without touching the socket; resumed, the probes close it again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import envelope

BOUND = 10.0

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + BOUND
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server starts within the bound"
            time.sleep(0.01)
    try:
        yield proc, port
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(BOUND)


def classify(exc: BaseException) -> str:
    """redis-py's timeouts are not the built-in TimeoutError: say what they are."""
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    return envelope.classify_exception(exc)


def test_a_paused_redis_opens_the_breaker_calls_fail_fast_and_recovery_closes_it(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = server
    # The envelope owns the retries: redis-py's own (three, with backoff, by default) are turned off.
    client = redis.Redis(port=port, socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
    breaker = envelope.CircuitBreaker("redis", window=4, min_calls=4, failure_rate=50, open_for=0.2, half_open_calls=2)
    env = envelope.Envelope("redis", breaker=breaker, classify=classify)
    assert env.call(client.set, "k", "v") is True

    os.kill(proc.pid, signal.SIGSTOP)
    # The window holds the success above and three timeouts: 75 % failed, the breaker opens.
    for _ in range(3):
        with pytest.raises(redis.TimeoutError):
            env.call(client.get, "k")
    assert breaker.state == "open"
    began = time.monotonic()
    with pytest.raises(envelope.CircuitOpen):
        env.call(client.get, "k")
    assert time.monotonic() - began < 0.05, "an open breaker answers at once, without waiting on the socket"

    os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + BOUND
    while breaker.state != "closed":
        assert time.monotonic() < deadline, f"the breaker closes once redis answers again ({breaker.state})"
        try:
            env.call(client.get, "k")
        except (envelope.CircuitOpen, redis.TimeoutError):
            time.sleep(0.01)
    assert env.call(client.get, "k") == b"v"
