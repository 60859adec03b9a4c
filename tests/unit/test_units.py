"""In-process unit tests of pieces the end-to-end tests reach only through real processes: request parsing
(input_fn), the serving settings, the epoch sampler, the running sums and the coordinated stop, search-space
parsing, the tune.py flag scopes, and the training-side rules on synthetic data."""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
from http import HTTPStatus
from pathlib import Path

import pytest
import torch
from imgclf import flags
from imgclf.debugging import rules
from imgclf.errors import HyperparameterError, RuleStop, TrainingInterrupted, UserError
from imgclf.search.space import (
    DEFAULT_SEARCH_SPACE,
    check_disjoint,
    load_search_space,
    objective_regex,
    parameter_ranges,
    parse_range,
)
from imgclf.serving.inference import (
    ImageRequest,
    RequestError,
    input_fn,
    media_type,
    parse_top_k,
    top_k_from_attributes,
)
from imgclf.serving.settings import MB, SETTINGS_ENV, ServingSettings, SettingsError
from imgclf.training.distributed import SINGLE
from imgclf.training.loop import coordinated_stop
from imgclf.training.metrics import RunningSums, metrics_line
from imgclf.training.sampling import EpochSampler
from PIL import Image


def jpeg(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 100, 50)).save(buf, "JPEG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- input_fn: content types, JSON and base64 forms, limits ------------------------------------------------

@pytest.mark.parametrize("content_type", ["image/jpeg", "Image/JPEG; charset=binary", "image/png", "image/webp",
                                          "application/x-image", "application/octet-stream"])
def test_raw_image_bytes_are_one_image(content_type):
    body = jpeg()
    assert input_fn(body, content_type) == ImageRequest([body])


def test_json_forms_of_base64_images():
    one, two = jpeg(8), jpeg(16)
    wrapped = "\n".join(b64(two)[i:i + 20] for i in range(0, len(b64(two)), 20))  # `base64` wraps lines
    doc = {"instances": [{"b64": b64(one)}, b64(two), {"b64": "data:image/jpeg;base64," + b64(one)},
                         {"b64": wrapped}], "top_k": 2}
    request = input_fn(json.dumps(doc), "application/json")
    assert request.images == [one, two, one, two] and request.top_k == 2
    single = input_fn(json.dumps({"b64": b64(one)}).encode(), "application/json; charset=utf-8")
    assert single.images == [one] and single.top_k is None


@pytest.mark.parametrize(("body", "content_type", "status", "words"), [
    (b"a,b", "text/csv", HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "text/csv"),
    (b"xx", None, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "(none)"),
    (b"", "image/jpeg", HTTPStatus.BAD_REQUEST, "empty request body"),
    (b"{", "application/json", HTTPStatus.BAD_REQUEST, "not valid JSON"),
    (b'{"images": []}', "application/json", HTTPStatus.BAD_REQUEST, "no 'instances' list"),
    (b'{"instances": []}', "application/json", HTTPStatus.BAD_REQUEST, "non-empty list"),
    (b'{"instances": [{"url": "x"}]}', "application/json", HTTPStatus.BAD_REQUEST, "instances[0]: object without"),
    (b'{"instances": [42]}', "application/json", HTTPStatus.BAD_REQUEST, "got int"),
    (b'{"instances": ["@@"]}', "application/json", HTTPStatus.BAD_REQUEST, "invalid base64"),
    (b'{"instances": ["QUJD"], "top_k": 0}', "application/json", HTTPStatus.BAD_REQUEST, "must be at least 1"),
    (b'{"instances": ["QUJD"], "top_k": true}', "application/json", HTTPStatus.BAD_REQUEST, "not a positive"),
])
def test_bad_requests_name_the_problem(body, content_type, status, words):
    with pytest.raises(RequestError) as e:
        input_fn(body, content_type)
    assert e.value.status_code == status and words in e.value.message


def test_limits_come_from_the_settings():
    small = ServingSettings(max_payload_bytes=100, max_images=2)
    with pytest.raises(RequestError, match="over the 100 byte limit") as e:
        input_fn(b"x" * 101, "image/jpeg", small)
    assert e.value.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    three = json.dumps({"instances": ["QUJD"] * 3})
    with pytest.raises(RequestError, match="3 images in one request; at most 2"):
        input_fn(three, "application/json", small)
    assert len(input_fn(three, "application/json").images) == 3  # the default allows 64


def test_headers():
    assert media_type(" Application/JSON ; charset=utf-8") == "application/json"
    assert top_k_from_attributes("trace=abc; Top-K=3") == 3
    assert top_k_from_attributes("trace=abc") is None and top_k_from_attributes(None) is None
    assert parse_top_k(" 7 ", "x") == 7
    with pytest.raises(RequestError, match="top_k='zero'"):
        top_k_from_attributes("top_k=zero")


# --- serving settings ---------------------------------------------------------------------------------------

def test_settings_from_the_environment_and_their_checks():
    assert ServingSettings.from_environment({}) == ServingSettings()
    got = ServingSettings.from_environment({"IMGCLF_TOP_K": "3", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2",
                                            "IMGCLF_SERVE_DTYPE": " BFloat16 ", "IMGCLF_MAX_IMAGES": ""})
    assert (got.top_k, got.max_payload_bytes, got.dtype, got.max_images) == (3, 2 * MB, "bfloat16", 64)
    with pytest.raises(SettingsError, match="IMGCLF_TOP_K='three' is not an integer"):
        ServingSettings.from_environment({"IMGCLF_TOP_K": "three"})
    with pytest.raises(SettingsError, match="IMGCLF_SERVE_DTYPE='fp8'"):
        ServingSettings.from_environment({"IMGCLF_SERVE_DTYPE": "fp8"})
    with pytest.raises(SettingsError, match="IMGCLF_TOP_K=0: must be at least 1"):
        ServingSettings(top_k=0)
    # multi-model-server reads its numbers as Java ints; SageMaker's payloads stop at 1 GB (asynchronous inference)
    for variable, value, said in (("IMGCLF_BATCH_SIZE", "99999999999", "must be 0-1024"),
                                  ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "99999999999", "must be 1-3600 (seconds)"),
                                  ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "1025", "must be 1-1024 (MB)")):
        with pytest.raises(SettingsError, match=re.escape(f"{variable}={value}: {said}")):
            ServingSettings.from_environment({variable: value})
    assert ServingSettings.from_environment({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1024"}).max_payload_bytes == 1024 * MB
    with pytest.raises(Exception, match="cannot assign"):
        got.top_k = 4  # frozen


def test_workers_get_the_settings_serve_read():
    settings = ServingSettings.from_environment({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "3", "IMGCLF_TOP_K": "2"})
    handed = settings.for_workers()
    worker_env = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "6", "IMGCLF_TOP_K": "9", **handed}
    assert ServingSettings.load(worker_env) == settings  # what serve read, not what it rewrote
    with pytest.raises(SettingsError, match=SETTINGS_ENV):
        ServingSettings.load({SETTINGS_ENV: "{not json"})


# --- the epoch sampler ----------------------------------------------------------------------------------------

def test_sampler_order_is_fixed_by_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    first = [i for i, _ in a]
    assert first == [i for i, _ in b] and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert [i for i, _ in a] != first
    assert [i for i, _ in EpochSampler(5, seed=3, shuffle=False)] == [0, 1, 2, 3, 4]
    seeds = [s for _, s in EpochSampler(10, seed=3)]
    assert len(set(seeds)) == 10 and all(0 <= s < 2**63 for s in seeds)


def test_sampler_skip_resumes_mid_epoch():
    whole = list(EpochSampler(10, seed=1))
    resumed = EpochSampler(10, seed=1)
    resumed.set_epoch(0, skip=4)
    assert list(resumed) == whole[4:] and len(resumed) == 6
    # stopped on the epoch's last batch: batches x batch size (3 x 4) passes the 10 samples; nothing is left
    resumed.set_epoch(0, skip=12)
    assert list(resumed) == [] and len(resumed) == 0


def test_sampler_shards_interleave_to_the_single_process_order():
    order = [i for i, _ in EpochSampler(7, seed=5)]
    ranks = [EpochSampler(7, seed=5, rank=r, world_size=3) for r in range(3)]
    shards = [[i for i, _ in s] for s in ranks]
    assert all(len(s) == 3 == len(r) for s, r in zip(shards, ranks))  # padded: same steps on every rank
    interleaved = [shards[r][k] for k in range(3) for r in range(3)]
    assert interleaved[:7] == order and interleaved[7:] == order[:2]  # padding repeats the start


# --- running sums and the coordinated stop ----------------------------------------------------------------------

def test_running_sums_add_and_merge():
    sums = RunningSums()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    sums.add(0.5, logits, torch.tensor([0, 1, 1]))
    assert (sums.loss, sums.correct, sums.seen) == (1.5, 2, 3)
    total = RunningSums(1.0, 1, 2).merge(sums)
    assert total == RunningSums(2.5, 3, 5) and total.accuracy == 0.6 and total.mean_loss == 0.5
    assert sums.all_ranks(SINGLE) == sums and RunningSums().accuracy == 0.0
    assert metrics_line({"epoch": 2}, valid_accuracy=0.5) == "epoch=2 valid_accuracy=0.500000"


def test_coordinated_stop_prefers_a_rule_then_sigterm():
    def rule_stops():
        raise RuleStop("overfit")

    interrupted = TrainingInterrupted("sigterm")
    assert coordinated_stop(SINGLE, lambda: None) is None
    assert coordinated_stop(SINGLE, lambda: None, lambda: interrupted) is interrupted
    assert str(coordinated_stop(SINGLE, rule_stops, lambda: interrupted)) == "overfit"
    with pytest.raises(ValueError):  # anything else is a bug, not a stop
        coordinated_stop(SINGLE, lambda: int("x"))


# --- search space ----------------------------------------------------------------------------------------------

def test_parse_range_forms():
    assert parse_range("lr", "0.0001:0.1:log") == {"type": "continuous", "min": "0.0001", "max": "0.1",
                                                   "scaling": "Logarithmic"}
    assert parse_range("epochs", "2:9")["type"] == "integer"
    assert parse_range("freeze", "head, none,") == {"type": "categorical", "values": ["head", "none"]}
    with pytest.raises(HyperparameterError, match="unknown hyperparameter"):
        parse_range("learning-rate", "1:2")
    with pytest.raises(HyperparameterError, match="MIN:MAX"):
        parse_range("lr", "0.1:1:cubic")


def test_parameter_ranges_are_checked_with_the_schema():
    ranges = parameter_ranges(DEFAULT_SEARCH_SPACE)
    assert ranges["ContinuousParameterRanges"] == [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                                    "ScalingType": "Logarithmic"}]
    assert {"Name": "batch-size", "Values": ["128", "256"]} in ranges["CategoricalParameterRanges"]
    assert "IntegerParameterRanges" not in ranges
    bad = {"lr": {"type": "integer", "min": 1, "max": 2}, "epochs": {"type": "integer", "min": 5, "max": 2},
           "batch-size": {"type": "categorical", "values": []}, "seed": {"type": "normal"},
           "momentum": {"type": "continuous", "min": 0, "max": 1, "scaling": "Logarithmic"}, "nope": {}}
    with pytest.raises(HyperparameterError) as e:
        parameter_ranges(bad)
    for words in ("lr is float", "min 5 must be below max 2", "non-empty list", "'normal'", "min > 0",
                  "nope: unknown"):
        assert words in str(e.value)
    with pytest.raises(HyperparameterError, match="freeze"):
        parameter_ranges({"freeze": {"type": "categorical", "values": ["head", "sideways"]}})


def test_search_space_file_objectives_and_overlap(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": {"type": "continuous", "min": 0.01, "max": 0.1}}))
    assert load_search_space(path)["lr"]["max"] == 0.1
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected"):
        load_search_space(path)
    metric, direction, regex = objective_regex("loss")
    assert (metric, direction) == ("valid:loss", "Minimize") and "valid_loss=" in regex
    with pytest.raises(HyperparameterError, match="lr: both tuned and static"):
        check_disjoint({"lr": {}}, {"lr": 0.1, "epochs": 3})


def test_flags_of_the_other_path_are_named():
    parser = argparse.ArgumentParser()
    flags.only_for(flags.CLOUD, parser.add_argument("--test-spot", action="store_true"))
    flags.only_for(flags.LOCAL, parser.add_argument("--test-storage"))
    parser.add_argument("--test-shared")
    args = parser.parse_args(["--test-spot", "--test-shared", "x"])
    assert flags.given_elsewhere(vars(args), flags.LOCAL) == ["--test-spot"]
    assert flags.given_elsewhere(vars(args), flags.CLOUD) == []


# --- rules on synthetic data ------------------------------------------------------------------------------------

def record(epoch: int, train_loss: float, valid_loss: float) -> dict:
    return {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss}


def test_loss_not_decreasing_compares_windows():
    rule = rules.LossNotDecreasing(num_steps=2)
    findings = [rule.train_loss(step, 1, loss) for step, loss in enumerate([4.0, 4.02, 1.0, 1.02, 3.0, 3.02])]
    assert findings[:5] == [None] * 5  # windows 4.01, then 1.01: falling; then 3.01, far beyond its noise
    assert "above the best earlier window" in findings[5].message and findings[5].step == 5
    assert rules.LossNotDecreasing(num_steps=1).train_loss(0, 1, math.nan) is not None


def test_overfit_needs_patience_epochs_of_gap_above_the_best():
    rule = rules.Overfit(patience=2, ratio_threshold=0.1)
    assert rule.epoch_end([record(1, 1.0, 1.0)]) is None
    assert rule.epoch_end([record(2, 0.5, 1.2)]) is None  # gap, above the best: 1 of 2
    finding = rule.epoch_end([record(3, 0.4, 1.3)])
    assert finding.epoch == 3 and finding.evidence["best_valid_loss"] == 1.0


def test_overtraining_and_exploding_tensor():
    rule = rules.Overtraining(patience_train=2, patience_validation=10, delta=0.1)
    results = [rule.epoch_end([record(e, loss, 1.0)]) for e, loss in enumerate([1.0, 0.95, 0.99], start=1)]
    assert results[:2] == [None, None] and "train loss has not improved by 0.1 for 2 epochs" in results[2].message
    exploding = rules.ExplodingTensor()
    assert exploding.train_loss(0, 1, 0.3) is None and exploding.eval_loss(1, 1, math.inf).evidence["mode"] == (
        "evaluation")
    stats = {"step": 4, "epoch": 1, "weights": {"fc.weight": 1.0, "conv.weight": math.nan},
             "activations": {"relu": {"mean": 0.0, "var": math.inf}}}
    assert exploding.layer_stats(stats).evidence["tensors"] == ["weights conv.weight", "activations relu"]
    assert rules.ExplodingTensor(only_nan=True).layer_stats(stats).evidence["count"] == 1


def test_gradient_and_initialisation_rules():
    stats = {"step": 0, "epoch": 1, "gradients": {"a": {"mean_abs": 1e-9}, "b": {"mean_abs": 0.1}},
             "activations": {"x": {"mean": 0.0, "var": 0.01}, "y": {"mean": 0.0, "var": 5.0}},
             "gradient_percentiles": {"p5": 0.0, "p95": 1.0}}
    assert rules.VanishingGradient().layer_stats(stats).evidence["smallest"] == {"a": 1e-9}
    init = rules.PoorWeightInitialization(threshold=10.0, steps=4, patience=2)
    assert "500x" in init.layer_stats(stats).message
    assert init.layer_stats(stats) is None  # checked once
    assert [init.train_loss(s, 1, loss) for s, loss in enumerate([1.0, 1.0, 2.0])] == [None] * 3
    assert "did not fall" in init.train_loss(3, 1, 2.0).message


def test_rule_set_records_the_first_finding_and_stops_when_asked():
    ruleset = rules.RuleSet([rules.ExplodingTensor(stop=True), rules.LossNotDecreasing(num_steps=100)])
    ruleset.train_loss(0, 1, 0.5)
    with pytest.raises(RuleStop, match="exploding_tensor"):
        ruleset.train_loss(1, 1, math.nan)
    result = ruleset.results[0]
    assert ruleset.stopped_by == "exploding_tensor" and result.status == rules.ISSUES and result.finding.step == 1


# ---- the GPU family table and the CUDA check at the start of a training job ------------------------------------

def test_cuda_check_names_each_reason_gpus_cannot_be_used(monkeypatch):
    import torch
    from imgclf.training import cuda_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert cuda_check.problem("local", 0, None, "NVML: no library") is None  # no GPU anywhere: CPU training
    assert cuda_check.problem("ml.m5.xlarge", 0, None, "NVML: no library") is None
    no_driver = cuda_check.problem("ml.g5.xlarge", 0, None, "NVML: Driver Not Loaded")
    assert "ml.g5.xlarge has NVIDIA GPUs" in no_driver and "no NVIDIA driver" in no_driver
    old = cuda_check.problem("ml.g5.xlarge", 1, "535.183.01", None)
    assert "driver 535.183.01" in old and "R580" in old
    assert "driver 590.1" in cuda_check.problem(None, 2, "590.1", None)  # NVML counts GPUs: no instance type needed
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in cuda_check.problem("ml.p4d.24xlarge", 8, "580.65", None)


def test_instance_table_and_its_docs_table():
    from imgclf import instances

    assert instances.training_image("ml.g6e.xlarge") == "train-gpu"
    assert instances.training_image("ml.r5.large") == "train-cpu"
    with pytest.raises(instances.InstanceTypeError, match="V100"):
        instances.training_image("ml.p3.16xlarge")
    assert all(float(cc) >= 7.5 for _, cc in instances.GPU_FAMILIES.values())
    table = instances.markdown_table()
    assert "| g4dn | NVIDIA T4 | 7.5 | train-gpu |" in table and "| p3 | NVIDIA V100 |" in table


@pytest.mark.parametrize("cpus, settings, expected", [
    (2, {}, (2, False)),                     # 2 workers x 2 threads: a lone request on both cores, no spinning
    (2, {"workers": 1}, (2, True)),          # threads no more than CPUs: spinning helps
    (2, {"torch_threads": 1}, (1, True)),    # the throughput end: one thread per worker
    (16, {}, (4, False)),                    # up to 4 threads each
    (1, {}, (1, True)),
])
def test_onnx_threads_rule(monkeypatch, cpus, settings, expected):
    from imgclf.serving import runtime

    monkeypatch.setattr(runtime.os, "cpu_count", lambda: cpus)
    assert runtime.onnx_threads(ServingSettings(**settings)) == expected


def test_watchdog_goes_by_the_workers_reports_when_mms_says_healthy(tmp_path, monkeypatch):
    import os

    from imgclf.serving.supervisor import Watchdog, worker_states

    dead = 2**22 + 1  # above Linux's highest possible pid (PID_MAX_LIMIT): never a live process
    me = tmp_path / f"{os.getpid()}.json"
    me.write_text(json.dumps({"loaded": False, "error": "WeightsError: model.safetensors is missing"}))
    (tmp_path / f"{dead}.json").write_text(json.dumps({"loaded": True, "error": None}))
    assert worker_states(tmp_path) == {os.getpid(): "WeightsError: model.safetensors is missing"}
    assert not (tmp_path / f"{dead}.json").exists()  # a dead worker's report is dropped

    watchdog = Watchdog(0, 5, stop_mms=None, worker_states=lambda: worker_states(tmp_path))
    monkeypatch.setattr(watchdog, "status", lambda: "Healthy")
    assert watchdog.problem() == ("the model workers cannot load the model: WeightsError: model.safetensors is "
                                  "missing", True)
    me.write_text(json.dumps({"loaded": False, "error": None}))  # loading
    assert watchdog.problem() == (None, False)
    me.unlink()
    assert watchdog.problem() == ("multi-model-server /ping: Healthy, but no model worker process is alive", False)
    monkeypatch.setattr(watchdog, "status", lambda: "Unhealthy")
    assert watchdog.problem() == ("multi-model-server /ping: Unhealthy", False)


def test_watchdog_gives_its_reason_before_it_stops_mms(monkeypatch):
    """main() reads the reason as soon as MMS exits, so it must be set before the stop (CI saw exit 0 without it)."""
    from imgclf.serving.supervisor import Watchdog

    seen = []
    watchdog = Watchdog(0, 0, stop_mms=lambda reason: seen.append((reason, watchdog.reason)), worker_states=dict)
    monkeypatch.setattr(watchdog, "problem", lambda: ("the model workers cannot load the model: boom", True))
    watchdog.start()
    watchdog.join(timeout=10)
    assert not watchdog.is_alive() and len(seen) == 1 and seen[0][0] == seen[0][1], seen
    assert "cannot load the model: boom" in watchdog.reason


def test_a_search_over_the_loops_settings_trains_heads_by_the_loop():
    from imgclf.search.space import static_hyperparameters

    assert static_hyperparameters(DEFAULT_SEARCH_SPACE, {"model": "vgg16"}) == {"model": "vgg16", "head-solver": "sgd"}
    assert static_hyperparameters(DEFAULT_SEARCH_SPACE, {"head-solver": "lbfgs"}) == {"head-solver": "lbfgs"}
    only_model = {"model": {"type": "categorical", "values": ["resnet18", "vgg16"]}}
    assert static_hyperparameters(only_model, {}) == {}  # nothing of the loop tuned: the solver stays auto


def test_the_serving_device_picks_onnx_runtimes_providers_and_says_why():
    from imgclf.errors import WeightsError
    from imgclf.serving import runtime
    from imgclf.serving.settings import ServingSettings, SettingsError

    cpu_build, gpu_build = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # CUDA first, on the worker's GPU, the CPU as ORT's fallback
    assert runtime.onnx_providers("auto", gpu_build, gpu_id=1)[0] == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    providers, why = runtime.onnx_providers("auto", cpu_build)
    assert providers == cpu_build and "no CUDA execution provider" in why
    assert runtime.onnx_providers("cpu", gpu_build) == (cpu_build, "IMGCLF_SERVE_DEVICE=cpu")
    with pytest.raises(WeightsError, match="IMGCLF_SERVE_DEVICE=cuda, but this ONNX Runtime has no CUDA"):
        runtime.onnx_providers("cuda", cpu_build)
    # onnxruntime-gpu where CUDA cannot run: the CPU, and the reason (the driver's answers, faked here)
    no_driver = runtime.cuda_problem((None, 0, "no NVIDIA driver in this container"), 13000)
    assert runtime.onnx_providers("auto", gpu_build, no_driver) == (cpu_build, "no NVIDIA driver in this container")
    with pytest.raises(WeightsError, match="IMGCLF_SERVE_DEVICE=cuda, but no NVIDIA driver in this container"):
        runtime.onnx_providers("cuda", gpu_build, no_driver)
    old_driver = runtime.cuda_problem((12040, 1, None), 13000)  # R550 (CUDA 12.4) under CUDA 13.0's libraries
    assert old_driver and "supports CUDA 12.4, older than the CUDA 13.0" in old_driver
    assert "al2023-ami-sagemaker-inference-gpu-4-1" in old_driver
    assert runtime.cuda_problem((13000, 8, None), 13000) is None  # R580
    assert runtime.cuda_problem((13020, 1, None), 13000) is None  # newer minor: minor version compatibility
    assert runtime.cuda_problem((12090, 1, None), 12000) is None  # a CUDA 12 build on R575
    assert runtime.cuda_problem((13000, 0, "the NVIDIA driver sees no GPU"), 13000) == "the NVIDIA driver sees no GPU"
    assert runtime.cuda_version_text(12040) == "12.4" and runtime.cuda_version_text(13000) == "13.0"
    if not Path("/dev/nvidiactl").exists():  # this machine, as CI's: no driver, so the reason says so
        assert runtime.driver_cuda()[2].startswith("no NVIDIA driver in this container (libcuda.so.1 not found)")
    # What the session ended up on: ORT falls back to the CPU when CUDA cannot start (no GPU, no driver).
    assert runtime.used_device("auto", gpu_build, gpu_build, "r").startswith("on the GPU")
    assert "could not start CUDA" in runtime.used_device("auto", gpu_build, cpu_build, "r")
    with pytest.raises(WeightsError, match="could not start its CUDA execution provider"):
        runtime.used_device("cuda", gpu_build, cpu_build, "r")
    assert ServingSettings.from_environment({"IMGCLF_SERVE_DEVICE": "CUDA"}).device == "cuda"
    with pytest.raises(SettingsError, match="IMGCLF_SERVE_DEVICE='tpu': use auto or cpu or cuda"):
        ServingSettings.from_environment({"IMGCLF_SERVE_DEVICE": "tpu"})
