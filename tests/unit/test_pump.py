"""The response pump: order kept, deltas of one request merged, nothing lost, errors end requests."""

import threading

import numpy as np

from tritonvl.handlers.tritonserver.pump import ResponsePump, merge


def out(text: str, ids: list[int], n: int) -> dict:
    return {"text_output": np.array([text.encode()], dtype=np.object_), "output_ids": np.array(ids, np.int32),
            "num_output_tokens": np.array([n], np.uint32)}


def test_merge_concatenates_text_and_ids_and_keeps_newest_counts():
    m = merge(out("ab", [1, 2], 2), {**out("c", [3], 3), "finish_reason": np.array([b"stop"], np.object_)})
    assert m["text_output"][0] == b"abc" and m["output_ids"].tolist() == [1, 2, 3]
    assert m["num_output_tokens"][0] == 3 and m["finish_reason"][0] == b"stop"


def test_pump_delivers_everything_in_order_even_when_it_lags():
    pump = ResponsePump()
    got = {k: [] for k in "xy"}
    gate = threading.Event()

    def sender(key):
        def send(outputs, final):
            gate.wait(5)  # the first send blocks, so later deltas pile up and merge
            got[key].append((outputs["text_output"][0].decode(), outputs["output_ids"].tolist(), final))
        return send

    sx, sy = sender("x"), sender("y")
    for i in range(50):
        pump.data(sx, out(str(i % 10), [i], i + 1), final=i == 49)
        pump.data(sy, out("y", [100 + i], i + 1), final=False)
    errors = []
    pump.error(lambda exc: errors.append(str(exc)), ValueError("boom"))
    gate.set()
    pump.flush()
    text = "".join(t for t, _, _ in got["x"])
    assert text == "".join(str(i % 10) for i in range(50))
    assert [i for _, ids, _ in got["x"] for i in ids] == list(range(50))
    assert [f for _, _, f in got["x"]] == [False] * (len(got["x"]) - 1) + [True]
    assert [i for _, ids, _ in got["y"] for i in ids] == [100 + i for i in range(50)]
    assert len(got["x"]) < 50  # merged while the sender lagged
    assert errors == ["boom"]
