"""`cost_models.hardware`: presets, validation, JSON round trips and NVML detection with fakes."""

from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import pytest

from cost_models.hardware import PRESETS, Hardware, Link, detect, get_preset


def one_line_value_error(excinfo: pytest.ExceptionInfo[ValueError], bad: str) -> None:
    """The error is a single line and names the bad value."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert bad in message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_validates_and_round_trips(name: str) -> None:
    preset = get_preset(name)
    assert preset.name == name
    assert preset.source
    again = Hardware.from_dict(json.loads(json.dumps(preset.to_dict())))
    assert again == preset
    assert dataclasses.replace(preset) == preset  # __post_init__ accepts it again


def test_datasheet_numbers() -> None:
    assert PRESETS["a100-80g-nvlink"].flops("bfloat16") == 312e12
    assert PRESETS["a100-80g-nvlink"].memory_bandwidth == 2.039e12
    assert PRESETS["h100-sxm"].memory_bandwidth == 3.35e12
    assert PRESETS["h200"].memory_bandwidth == 4.8e12
    assert PRESETS["cpu"].memory_bandwidth == 2e10


def test_flops_dtype_names() -> None:
    a100 = PRESETS["a100-80g-nvlink"]
    assert a100.flops("torch.bfloat16") == a100.flops("bfloat16") == 312e12
    assert a100.flops("float32") == 19.5e12  # plain fp32, not tf32
    assert a100.flops("tf32") == 156e12
    with pytest.raises(ValueError) as excinfo:
        a100.flops("int8")
    one_line_value_error(excinfo, "int8")
    with pytest.raises(ValueError) as excinfo:
        PRESETS["cpu"].flops("torch.float16")
    one_line_value_error(excinfo, "float16")


def test_unknown_preset() -> None:
    with pytest.raises(ValueError) as excinfo:
        get_preset("tpu-v9")
    one_line_value_error(excinfo, "tpu-v9")
    assert "h100-sxm" in str(excinfo.value)


def test_link_choice() -> None:
    hw = PRESETS["h100-sxm"]
    assert hw.link(8) is hw.intra_node
    assert hw.link(16, nodes_spanned=2) is hw.inter_node
    with pytest.raises(ValueError, match="group_size"):
        hw.link(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_bytes", 0), ("memory_bandwidth", -1.0), ("devices_per_node", 0)],
)
def test_validation_names_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PRESETS["cpu"], **{field: value})


def test_validation_links_and_peaks() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        Link(bandwidth=0.0, latency=1e-6)
    with pytest.raises(ValueError, match="bfloat16"):
        dataclasses.replace(PRESETS["cpu"], peak_flops={"bfloat16": -1.0})


def test_from_dict_errors_name_key() -> None:
    d = PRESETS["h200"].to_dict()
    del d["memory_bandwidth"]
    with pytest.raises(ValueError) as excinfo:
        Hardware.from_dict(d)
    one_line_value_error(excinfo, "memory_bandwidth")
    d = PRESETS["h200"].to_dict()
    d["intra_node"] = {"bandwidth": 1e9}
    with pytest.raises(ValueError) as excinfo:
        Hardware.from_dict(d)
    one_line_value_error(excinfo, "intra_node")


def test_detect_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    hw = detect()
    assert hw.name == "cpu"
    assert hw.memory_bytes > 0
    assert "detected" in hw.source
    assert Hardware.detect() == hw


class FakeNVMLError(Exception):
    pass


def fake_pynvml(*, init_fails: bool = False, name: bytes | str = b"NVIDIA H100 80GB HBM3"):
    """A stand-in for the `pynvml` module that records whether nvmlShutdown was called."""
    calls: list[str] = []

    def init() -> None:
        if init_fails:
            raise FakeNVMLError("Driver Not Loaded")
        calls.append("init")

    module = SimpleNamespace(
        NVMLError=FakeNVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 8,
        nvmlDeviceGetHandleByIndex=lambda index: ("handle", index),
        nvmlDeviceGetName=lambda handle: name,
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=85899345920),
    )
    return module, calls


def test_detect_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    hw = detect()
    assert hw.name == "h100-sxm"
    assert hw.memory_bytes == 85899345920
    assert hw.devices_per_node == 8
    assert hw.flops("bfloat16") == PRESETS["h100-sxm"].flops("bfloat16")
    assert "NVIDIA H100 80GB HBM3" in hw.source
    assert calls == ["init", "shutdown"]


def test_detect_unknown_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_pynvml(name="NVIDIA L4")
    monkeypatch.setitem(sys.modules, "pynvml", module)
    hw = detect()
    assert "unknown GPU NVIDIA L4" in hw.source
    assert hw.peak_flops == PRESETS["h100-sxm"].peak_flops
    assert calls == ["init", "shutdown"]


def test_detect_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_pynvml(init_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    hw = detect()
    assert hw.name == "cpu"
    assert "Driver Not Loaded" in hw.source
    assert calls == []
