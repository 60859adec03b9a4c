"""The GPU image's builds and the start-up check of the drivers each accepts, with fake driver version strings and a
fake torch CUDA build (torch.version.cuda, availability, arch list): no GPU needed."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from imgclf import instances
from imgclf.training import cuda_check

CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU128_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # PyPI's torch 2.10.0 (CUDA 12.8)
BUILD_OF = {b.name: b for b in instances.GPU_BUILDS}


def fake_torch(monkeypatch, build: str | None, available: bool, capability=(9, 0), archs=None):
    """This process's torch as the given build of the GPU image (None: a CPU build) on a GPU of `capability`."""
    spec = BUILD_OF.get(build)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.version, "cuda", spec.cuda if spec else None)
    monkeypatch.setattr(torch, "__version__", spec.torch if spec else "2.14.1+cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    default = CU128_ARCHS if build == "cu128" else CU130_ARCHS
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: default if archs is None else archs)


@pytest.mark.parametrize("driver, build", [
    ("590.44.01", "cu130"), ("580.65.06", "cu130"),  # R580+: the default build (the newest torch)
    ("575.57.08", "cu128"), ("570.172.08", "cu128"),  # CUDA 12.8's own driver branch
    ("550.163.01", "cu128"), ("535.183.01", "cu128"), ("525.60.13", "cu128"),  # minor version compatibility
    ("520.61.05", None), ("470.256.02", None), ("418.40.04", None),  # older than any CUDA 12 driver
    ("N/A", None), ("", None), (None, None), ("535", "cu128"), (" 550.54.15\n", "cu128"),
])
def test_the_build_for_each_driver(driver, build):
    chosen = instances.gpu_build_for(driver)
    assert (chosen.name if chosen else None) == build


def test_the_builds_table():
    assert [b.name for b in instances.GPU_BUILDS] == ["cu130", "cu128"] and instances.DEFAULT_BUILD.tag == "latest"
    cu128 = BUILD_OF["cu128"]
    assert (cu128.cuda, cu128.min_driver, cu128.native_driver, cu128.tag) == ("12.8", 525, 570, "latest-cu128")
    assert (instances.MIN_DRIVER, instances.CUDA_LINE) == (580, "13.0")
    assert [instances.min_driver_for(c) for c in ("13.0", "13.2", "12.8", "12.4", "11.8", "14.0", "")] == \
        [580, 580, 525, 525, 450, None, None]
    # The hosts AWS documents: R535 (p5, g6) and R550 (p5e, p5en) need the cu128 build; R470 runs neither.
    assert {instances.documented_build(f) for f in ("p5", "g6", "p5e", "p5en")} == {"R535: cu128", "R550: cu128"}
    assert instances.documented_build("g5") == "R470: none (R525 or newer needed)"
    assert instances.documented_build("g6e") == "none documented"
    assert set(instances.DOCUMENTED_DRIVERS) <= set(instances.GPU_FAMILIES)
    table = instances.markdown_table()
    assert "| p5 | NVIDIA H100 | 9.0 | train-gpu | R535: cu128 |" in table
    assert "| cu130 (default) | 2.14.1 | 13.0 | R580 or newer |" in table
    assert "| cu128 | 2.10.0 | 12.8 | R525 or newer (older than R570: through CUDA minor version" in table
    assert "`make build-train-gpu-cu128`" in table and "`latest-cu128`" in table


@pytest.mark.parametrize("build, driver, expected", [
    # the default build on SageMaker's R535/R550 hosts: fails, naming the cu128 build and how to use it
    ("cu130", "535.183.01", ["driver 535.183.01, older than the R580 series that CUDA 13.0 (PyTorch 2.14.1)",
                             "The cu128 build of the GPU image (PyTorch 2.10.0, CUDA 12.8) runs on R525 and newer",
                             "make build-train-gpu-cu128 push-train-gpu-cu128", "--image-tag latest-cu128"]),
    ("cu130", "550.54.15", ["driver 550.54.15, older than the R580", "The cu128 build"]),
    ("cu130", "575.57.08", ["R580", "The cu128 build"]),
    # older than anything: no build to name
    ("cu130", "470.256.02", ["older than the R580 series", "no build of the GPU image runs on it",
                             "oldest driver one runs on is R525", "choose an instance family"]),
    ("cu128", "470.256.02", ["driver 470.256.02, older than the R525 series that CUDA 12.8 (PyTorch 2.10.0)",
                             "no build of the GPU image runs on it"]),
    ("cu128", "520.61.05", ["older than the R525 series"]),
    # drivers the build accepts: CUDA is unavailable for another reason, said as such
    ("cu128", "535.183.01", ["has NVIDIA GPUs and driver 535.183.01, but torch.cuda.is_available() is False"]),
    ("cu128", "580.65.06", ["driver 580.65.06, but torch.cuda.is_available() is False"]),
    ("cu130", "580.65.06", ["driver 580.65.06, but torch.cuda.is_available() is False"]),
    ("cu130", "unknown", ["driver unknown, but torch.cuda.is_available() is False"]),
])
def test_a_driver_too_old_for_the_build_names_the_build_that_runs(monkeypatch, build, driver, expected):
    fake_torch(monkeypatch, build, available=False)
    reason = cuda_check.problem("ml.p5.48xlarge", 8, driver, None)
    assert reason and reason.startswith("this ml.p5.48xlarge has NVIDIA")
    for fragment in expected:
        assert fragment in reason, reason
    if "is False" in expected[0]:
        assert "older than" not in reason


@pytest.mark.parametrize("build, driver, note", [
    ("cu128", "535.183.01", "535.183.01 (older than CUDA 12.8's R570: through CUDA minor version compatibility)"),
    ("cu128", "550.163.01", "driver 550.163.01 (older than CUDA 12.8's R570"),
    ("cu128", "570.172.08", "driver 570.172.08"),
    ("cu128", "590.44.01", "driver 590.44.01"),
    ("cu130", "580.65.06", "driver 580.65.06"),
])
def test_each_build_passes_on_the_drivers_it_supports(monkeypatch, caplog, build, driver, note):
    """check() as the job calls it: NVML's answer (faked), then the log line naming CUDA, GPUs and driver."""
    fake_torch(monkeypatch, build, available=True)
    monkeypatch.setattr(cuda_check, "nvml_gpus", lambda: (8, driver, None))
    with caplog.at_level(logging.INFO, logger=cuda_check.__name__):
        cuda_check.check("ml.p5.48xlarge")
    line = caplog.records[-1].getMessage()
    assert line.startswith(f"CUDA {BUILD_OF[build].cuda} (PyTorch {BUILD_OF[build].torch}): 8 GPU(s)"), line
    assert note in line, line
    assert ("minor version compatibility" in line) == (int(driver.split(".")[0]) < BUILD_OF[build].native_driver)


def test_nvml_driver_string_reaches_the_check(monkeypatch):
    """The driver version as NVML gives it (bytes in older nvidia-ml-py) through check() to the failure reason."""
    class NVMLError(Exception):
        pass

    calls = []
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"535.183.01", nvmlDeviceGetCount=lambda: 1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert cuda_check.nvml_gpus() == (1, "535.183.01", None) and calls == ["init", "shutdown"]
    fake_torch(monkeypatch, "cu130", available=False)
    with pytest.raises(cuda_check.CudaUnusableError, match=r"driver 535\.183\.01, older than the R580 .*cu128"):
        cuda_check.check("ml.g6.xlarge")

    def not_loaded():
        raise NVMLError("Driver Not Loaded")
    monkeypatch.setattr(fake, "nvmlInit", not_loaded)
    assert cuda_check.nvml_gpus() == (0, None, "NVML: Driver Not Loaded")
    with pytest.raises(cuda_check.CudaUnusableError, match=r"no NVIDIA driver is visible .*Driver Not Loaded"):
        cuda_check.check("ml.g6.xlarge")
    fake_torch(monkeypatch, None, available=False)
    cuda_check.check("ml.m5.xlarge")  # a CPU instance, no driver: CPU training, nothing to say


@pytest.mark.parametrize("archs, capability, runs", [
    (CU130_ARCHS, (7, 5), True), (CU130_ARCHS, (8, 9), True),  # sm_86 machine code runs on 8.9 (L4, L40S)
    (CU130_ARCHS, (7, 0), False), (CU128_ARCHS, (7, 0), True),  # V100: CUDA 13 dropped it, 12.8 has it
    (CU130_ARCHS, (12, 1), True),  # PTX (compute_120) that the driver compiles
    (["sm_80"], (9, 0), False), (["sm_90a"], (9, 0), True), (["sm_90a"], (10, 0), False),
    (["sm_100f"], (10, 3), True), (["compute_90"], (8, 6), False), (["compute_80"], (8, 6), True), ([], (9, 0), False),
])
def test_kernels_for_the_gpu(archs, capability, runs):
    assert cuda_check.has_kernels_for(archs, capability) is runs


def test_a_gpu_without_kernels_in_this_build(monkeypatch):
    fake_torch(monkeypatch, "cu130", available=True, capability=(7, 0))
    reason = cuda_check.problem("ml.p5.48xlarge", 1, "580.65.06", None)
    assert "has compute capability 7.0" in reason and "kernels for sm_75, sm_80" in reason and "CUDA 13.0" in reason
    fake_torch(monkeypatch, "cu128", available=True, capability=(7, 0))
    assert cuda_check.problem("ml.p5.48xlarge", 1, "535.183.01", None) is None
    fake_torch(monkeypatch, "cu130", available=True, capability=(7, 0), archs=[])  # no arch list: the table's minimum
    assert "compute capability 7.5+" in cuda_check.problem(None, 1, "580.65.06", None)
