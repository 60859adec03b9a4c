"""The rules' judgement on synthetic inputs: loss curves, monitor samples and step timings made to order.

Each rule gets a case it must flag and a healthy case it must leave alone (a false alarm with rules-stop
kills a good job). Real training runs that drive the rules are in test_rules.py.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from imgclf.debugging import rules

STEPS = 735  # the healthy run of issue #14 (loss_not_decreasing fired at step 269 there)


def decay(seed: int, noise: float = 0.05, steps: int = STEPS) -> list[float]:
    """A healthy curve: exponential decay from 3.0 to a plateau at 0.5, with `noise` relative batch noise."""
    rng = random.Random(seed)
    return [(0.5 + 2.5 * math.exp(-i / 80)) * (1 + noise * rng.gauss(0, 1)) for i in range(steps)]


def first_finding(rule: rules.Rule, losses: list[float], mode: str = "TRAIN") -> rules.Finding | None:
    feed = rule.train_loss if mode == "TRAIN" else rule.eval_loss
    return next((f for f in (feed(step, 1, loss) for step, loss in enumerate(losses)) if f), None)


@pytest.mark.parametrize("seed", range(20))
def test_loss_not_decreasing_is_quiet_on_healthy_decay_to_a_noisy_plateau(seed):
    rule = rules.LossNotDecreasing()
    assert first_finding(rule, decay(seed)) is None
    assert rule.evaluated


def test_loss_not_decreasing_is_quiet_on_a_long_noisy_plateau():
    # A converged model: the loss stops falling and only batch noise moves it. That is not an issue.
    rng = random.Random(1)
    assert first_finding(rules.LossNotDecreasing(), [0.7 * (1 + 0.1 * rng.gauss(0, 1)) for _ in range(3000)]) is None


def test_loss_not_decreasing_flags_divergence():
    rng = random.Random(2)
    healthy_then_diverging = decay(2)[:300] + [0.6 * math.exp(i / 60) * (1 + 0.05 * rng.gauss(0, 1))
                                               for i in range(300)]
    finding = first_finding(rules.LossNotDecreasing(), healthy_then_diverging)
    assert finding is not None and 300 < finding.step < 400, finding
    assert "above the best earlier window" in finding.message


def test_loss_not_decreasing_flags_nan_and_watches_the_chosen_mode():
    losses = decay(3)[:50] + [math.nan] * 10
    assert "nan" in first_finding(rules.LossNotDecreasing(), losses).message
    assert first_finding(rules.LossNotDecreasing(mode="EVAL"), losses) is None  # TRAIN losses are not its mode
    assert first_finding(rules.LossNotDecreasing(mode="EVAL"), losses, mode="EVAL").step == 59


def test_loss_not_decreasing_diff_percent_asks_for_progress():
    rng = random.Random(4)
    flat = [1.0 * (1 + 0.01 * rng.gauss(0, 1)) for _ in range(100)]
    assert first_finding(rules.LossNotDecreasing(), flat) is None
    assert "not 1% below" in first_finding(rules.LossNotDecreasing(diff_percent=1.0), flat).message
    with pytest.raises(Exception, match="TRAIN or EVAL"):
        rules.LossNotDecreasing(mode="GLOBAL")


# --- NotEvaluated -----------------------------------------------------------------------------------------------

def test_a_rule_that_never_judged_says_not_evaluated_and_why():
    rs = rules.RuleSet([rules.LossNotDecreasing(num_steps=10), rules.LowGpuUtilization(), rules.ExplodingTensor()])
    for step in range(5):
        rs.train_loss(step, 1, 1.0)
    rs.system([{"t": 0, "cpu": 10.0, "iowait": 0.0, "gpu": [50.0], "gpu_memory": [10.0]}] * 20, [], True)
    got = {r["name"]: r for r in rs.to_json()}
    assert got["exploding_tensor"]["status"] == rules.NO_ISSUES and got["exploding_tensor"]["reason"] is None
    assert got["loss_not_decreasing"]["status"] == rules.NOT_EVALUATED
    assert "fewer than num_steps=10" in got["loss_not_decreasing"]["reason"]
    assert got["low_gpu_utilization"]["status"] == rules.NOT_EVALUATED  # 20 samples, all within patience=1000
    assert "within patience=1000" in got["low_gpu_utilization"]["reason"]


# --- system rules: monitor samples and step timings ---------------------------------------------------------------

def samples(n: int, gpu: list[float] | None = None, **values) -> list[dict]:
    """n monitor samples; `gpu` the utilisation of each GPU (memory in gpu_memory=...)."""
    base = {"cpu": 30.0, "iowait": 0.0, "memory": 20.0, "cpu_cores": [30.0] * 8,
            "disk_read_mb_s": 1.0, "disk_write_mb_s": 0.5, "net_recv_mb_s": 0.1, "net_sent_mb_s": 0.1}
    if gpu is not None:
        base |= {"gpu": gpu, "gpu_memory": [40.0] * len(gpu)}
    return [{"t": i / 2, "time": 1e9 + i / 2, **base, **values} for i in range(n)]


def steps(durations: list[float], start: float = 1e9) -> list[dict]:
    return [{"step": i, "time": start + sum(durations[:i]), "data": 0.01, "forward": d / 2, "backward": d / 3,
             "optimizer": 0.0, "total": d} for i, d in enumerate(durations)]


def test_cpu_bottleneck_sees_one_pinned_core_on_an_eight_core_host():
    pinned = samples(100, gpu=[2.0], cpu=12.5 + 7 * 0.0, cpu_cores=[100.0] + [0.0] * 7)  # total: 12.5%
    rule = rules.CpuBottleneck(patience=0)
    finding = rule.system(pinned, [], True)
    assert finding is not None and finding.evidence["share"] == 100.0
    assert rule.system(samples(100, gpu=[2.0], cpu_cores=[40.0] * 8), [], True) is None


def test_step_outlier():
    rng = random.Random(5)
    normal = [0.1 + 0.002 * rng.gauss(0, 1) for _ in range(400)]
    rule = rules.StepOutlier()
    assert rule.system([], steps(normal), False) is None and rule.evaluated
    stalls = normal[:]
    for i in range(20, 400, 20):  # 19 stalls of 1 s
        stalls[i] = 1.0
    finding = rule.system([], steps(stalls), False)
    assert finding is not None and finding.evidence["outliers"] == 19
    few = normal[:]
    few[100] = few[200] = 1.0
    assert rules.StepOutlier().system([], steps(few), False) is None  # n_outliers=10 tolerated
    fresh = rules.StepOutlier()
    assert fresh.system([], steps([0.1]), False) is None and not fresh.evaluated


def test_max_initialization_time():
    rule = rules.MaxInitializationTime()
    rule.process_start = 1e9
    assert rule.system([], steps([0.1] * 3, start=1e9 + 5 * 60), False) is None and rule.evaluated
    late = rule.system([], steps([0.1] * 3, start=1e9 + 25 * 60), False)
    assert late is not None and late.evidence["seconds"] == pytest.approx(1500)
    stuck = rules.MaxInitializationTime()
    stuck.process_start -= 30 * 60  # no step after 30 minutes
    assert "had not started" in stuck.system([], [], False).message
    waiting = rules.MaxInitializationTime()
    waiting.process_start = time.time() - 60  # a job one minute old (not the test process: pytest may be older)
    assert waiting.system([], [], False) is None and not waiting.evaluated


def test_io_bottleneck():
    rule = rules.IoBottleneck(patience=0)
    stalled = samples(60, gpu=[3.0], iowait=80.0) + samples(40, gpu=[90.0])
    assert rule.system(stalled, [], True).evidence["share"] == 60.0
    assert rule.system(samples(40, gpu=[3.0], iowait=80.0) + samples(60, gpu=[90.0]), [], True) is None
    assert rule.system(stalled, [], False) == rules.NOT_APPLICABLE


def test_gpu_memory_increase():
    rule = rules.GpuMemoryIncrease(patience=0)
    leak = [{**s, "gpu_memory": [20.0 + i * 0.1]} for i, s in enumerate(samples(200, gpu=[90.0]))]
    finding = rule.system(leak, [], True)
    assert finding is not None and finding.evidence["window_mean"] - finding.evidence["lowest"] > 5
    steady = [{**s, "gpu_memory": [40.0 + (i % 3)]} for i, s in enumerate(samples(200, gpu=[90.0]))]
    assert rules.GpuMemoryIncrease(patience=0).system(steady, [], True) is None


def test_batch_size():
    rule = rules.BatchSize(patience=0)
    idle = samples(100, gpu=[30.0], cpu=20.0)
    assert rule.system(idle, [], True).evidence["gpu_p95"] == 30.0
    busy = [{**s, "gpu_memory": [85.0]} for s in idle]  # memory full: a larger batch would not fit
    assert rules.BatchSize(patience=0).system(busy, [], True) is None


def test_load_balancing():
    rule = rules.LoadBalancing(patience=0)
    assert rule.system(samples(100, gpu=[95.0, 20.0]), [], True).evidence["gpus"] == [0, 1]
    assert rules.LoadBalancing(patience=0).system(samples(100, gpu=[95.0, 91.0]), [], True) is None
    assert rules.LoadBalancing(patience=0).system(samples(100, gpu=[95.0]), [], True) == rules.NOT_APPLICABLE
    assert rules.LoadBalancing(patience=0).system([], [], False) == rules.NOT_APPLICABLE


# --- overfit with label smoothing: like with like ----------------------------------------------------------------

def test_overfit_compares_the_smoothed_training_loss_with_the_smoothed_validation_loss():
    # label-smoothing=0.2 on 5 classes: a perfect model's smoothed loss is about 0.5, its plain loss about 0.1
    record = {"epoch": 2, "train_loss": 0.52, "valid_loss": 0.15, "valid_loss_smoothed": 0.54}
    rule = rules.Overfit()
    rule.epoch_end([{**record, "epoch": 1, "valid_loss_smoothed": 0.53}])
    assert rule.epoch_end([record]) is None  # 4% apart under the same criterion
    worse = {**record, "epoch": 3, "valid_loss_smoothed": 0.80}
    assert rule.epoch_end([worse]).evidence["label_smoothed"]


def test_evaluate_reports_the_validation_loss_under_the_training_criterion():
    import torch
    from imgclf.training.evaluate import evaluate
    from torch import nn

    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.2)
    ev = evaluate(model, batches, 3, torch.device("cpu"), train_criterion=smoothing)
    with torch.no_grad():
        assert ev.smoothed_loss == pytest.approx(smoothing(model(x), y).item(), rel=1e-5)
        assert ev.loss == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-5)
    assert evaluate(model, batches, 3, torch.device("cpu")).smoothed_loss is None


def test_vanishing_gradient_leaves_zero_initialised_gates_alone_at_the_first_step_only():
    """timm's ResNets zero-initialise each block's last BatchNorm: at step 0 the convolutions inside a block get
    gradients of exactly zero, and the first update opens them. Healthy: no finding. The same zeros later, and
    tiny non-zero gradients at step 0, are findings."""
    def stats(step: int) -> dict:
        return {"step": step, "epoch": 1, "gradients": {"layer1.0.conv1.weight": {"mean_abs": 0.0},
                                                       "layer1.0.bn2.weight": {"mean_abs": 0.02},
                                                       "fc.weight": {"mean_abs": 0.1}}}
    rule = rules.VanishingGradient()
    assert rule.layer_stats(stats(0)) is None and rule.evaluated
    assert "1 exactly zero at the first step" in rule.note
    later = rule.layer_stats(stats(100))
    assert later is not None and later.evidence["smallest"] == {"layer1.0.conv1.weight": 0.0}
    tiny = stats(0)
    tiny["gradients"]["layer1.0.conv1.weight"]["mean_abs"] = 1e-9
    assert rules.VanishingGradient().layer_stats(tiny).evidence["count"] == 1
