"""A client's cancel stops the work on the public model (docs/CANCELLATION.md): stock tritonclient
gRPC stream cancel and closed HTTP SSE connections. Four long streams each time; afterwards the
server's processes are idle within 2 s, the KV cache is back where it was, hardly any token was
generated after the cancel, and the next request gives the same answer as before."""

from __future__ import annotations

import json
import queue
import threading
import time
from functools import partial

import psutil
import pytest
import requests
from helpers import MODEL, _inputs, infer_http, metrics, wait_for

LONG = {"text_input": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True, "temperature": 0.0,
        "stream": True}


def group_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the server and every process under it (the Python stubs)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def idle_within(pid: int, seconds: float, window: float = 0.5, busy_share: float = 0.15) -> float | None:
    """Seconds until a ``window`` in which the process group used under ``busy_share`` of one core
    (None when that does not happen within ``seconds``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        before = group_cpu_seconds(pid)
        time.sleep(window)
        if group_cpu_seconds(pid) - before < busy_share * window:
            return time.monotonic() - start
    return None


@pytest.fixture
def baseline(server):
    """The server at rest: KV usage, and the answer to a fixed request (compared after the cancel)."""
    assert wait_for(lambda: metrics(server)["tritonvl_num_requests_running"] == 0, timeout=30)
    answer = infer_http(server.http_url, text_input="after cancel", max_tokens=6)
    return {"kv": metrics(server)["tritonvl_kv_cache_usage_ratio"], "answer": answer["output_ids"]}


def check_stopped(server, baseline, tokens_at_cancel: float) -> None:
    took = idle_within(server.proc.pid, 2.0)
    assert took is not None, "the server's processes were still busy 2 s after the cancel"
    m = metrics(server)
    # 4 streams, a step or two each between the cancel and the stop (4000 tokens each if ignored)
    assert m["tritonvl_generation_tokens_total"] - tokens_at_cancel <= 40
    assert wait_for(lambda: metrics(server)["tritonvl_kv_cache_usage_ratio"] == baseline["kv"], timeout=2)
    assert metrics(server)["tritonvl_num_requests_running"] == 0
    assert infer_http(server.http_url, text_input="after cancel", max_tokens=6)["output_ids"] == baseline["answer"]


def test_grpc_stream_cancel_stops_generation(server, baseline):
    import tritonclient.grpc as grpcclient

    clients = []
    for i in range(4):
        got: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
        client.async_stream_infer(MODEL, _inputs(grpcclient, {**LONG, "text_input": f"{LONG['text_input']} {i}"}))
        clients.append((client, got))
    for _, got in clients:
        for _ in range(3):
            result, error = got.get(timeout=120)
            assert error is None, error
    assert metrics(server)["tritonvl_kv_cache_usage_ratio"] > baseline["kv"]
    for client, _ in clients:
        client.stop_stream(cancel_requests=True)  # what tritonclient offers to cancel a stream
    tokens_at_cancel = metrics(server)["tritonvl_generation_tokens_total"]
    for client, _ in clients:
        client.close()
    check_stopped(server, baseline, tokens_at_cancel)


def test_closed_sse_connections_stop_generation(server, baseline):
    sessions, started = [], threading.Barrier(5, timeout=120)

    def read_some(i: int) -> None:
        r = requests.post(f"http://{server.http_url}/v2/models/{MODEL}/generate_stream",
                          json={**LONG, "text_input": f"{LONG['text_input']} sse {i}"}, stream=True, timeout=120)
        sessions.append(r)
        events = 0
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                assert "error" not in json.loads(line[5:]), line
                events += 1
                if events == 3:
                    break
        started.wait()

    threads = [threading.Thread(target=read_some, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    for t in threads:
        t.join()
    assert metrics(server)["tritonvl_kv_cache_usage_ratio"] > baseline["kv"]
    for r in sessions:
        r.close()  # the client goes away mid-stream
    tokens_at_cancel = metrics(server)["tritonvl_generation_tokens_total"]
    check_stopped(server, baseline, tokens_at_cancel)
