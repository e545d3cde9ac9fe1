"""TTFT and per-token histograms on Triton's metrics endpoint grow by exactly what was generated:
one TTFT observation per request, one TPOT observation per token after the first."""

from __future__ import annotations

from helpers import joined, metrics, stream_grpc, wait_for

TTFT = "tritonvl_time_to_first_token_seconds"
TPOT = "tritonvl_time_per_output_token_seconds"


def test_ttft_and_tpot_histograms_count_requests_and_tokens(server):
    before = metrics(server)
    lengths = (3, 5, 8)
    for i, n in enumerate(lengths):
        out = joined(stream_grpc(server.grpc_url, text_input=f"Count {i}", max_tokens=n, ignore_eos=True,
                                 stream=True))
        assert out["num_output_tokens"] == n

    def grown():
        m = metrics(server)
        return (m.get(f"{TTFT}_count", 0) - before.get(f"{TTFT}_count", 0),
                m.get(f"{TPOT}_count", 0) - before.get(f"{TPOT}_count", 0))

    want = (len(lengths), sum(n - 1 for n in lengths))
    assert wait_for(lambda: grown() == want, timeout=10) or grown() == want, grown()
    after = metrics(server)
    assert after[f"{TTFT}_sum"] > before.get(f"{TTFT}_sum", 0)
    assert after[f"{TPOT}_sum"] > before.get(f"{TPOT}_sum", 0)
