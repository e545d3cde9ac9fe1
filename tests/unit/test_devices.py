import pytest

from tritonvl.handlers.devices import instance_index, pick_device


@pytest.mark.parametrize("kind,dev_id,name,npu,req,want", [
    ("CPU", "0", "llm_0_0", "", "", "cpu"),
    ("KIND_CPU", "0", "llm_0_1", "", "", "cpu"),
    ("GPU", "0", "llm_0_0", "", "", "cuda:0"),
    ("GPU", "3", "llm_0_3", "", "", "cuda:3"),
    ("KIND_GPU", 1, "llm_0", "", "", "cuda:1"),
    ("GPU", "2", "llm_0_0", "", "cpu", "cpu"),          # the device parameter forces the CPU
    ("CPU", "0", "llm_0_0", "", "cuda", "cuda:0"),
    ("MODEL", "0", "llm_0_0", "0,1,2,3", "", "npu:0"),
    ("MODEL", "0", "llm_0_2", "0,1,2,3", "", "npu:2"),
    ("CPU", "0", "llm_0_5", "4,5", "", "npu:5"),        # round robin over the listed NPUs
    ("CPU", "0", "llm_0_1", "", "npu", "npu:0"),
])
def test_pick_device(kind, dev_id, name, npu, req, want):
    assert pick_device(kind, dev_id, name, npu, req) == want


def test_instance_index():
    assert instance_index("llm_0_7") == 7 and instance_index("weird") == 0


def test_cpu_threads_parameter(monkeypatch):
    import pytest

    from tritonvl.handlers.devices import cpu_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cpu_threads("auto", share=0.5) == 4 and cpu_threads("AUTO") == 8
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert cpu_threads("auto", share=0.5) == 1
    assert cpu_threads("0") == 0 and cpu_threads("3") == 3
    with pytest.raises(ValueError, match="expected a number or auto"):
        cpu_threads("many")
    with pytest.raises(ValueError, match=">= 0"):
        cpu_threads("-2")
