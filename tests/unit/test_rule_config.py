"""Rule configuration (names, parameters, stop lists) and the system rules on given samples, in process."""

from __future__ import annotations

import json

import pytest
from imgclf.debugging import rules
from imgclf.errors import HyperparameterError


def test_configure_selects_rules_and_parameters(tmp_path):
    path = tmp_path / "Config" / "Rules.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"overfit": {"ratio_threshold": 2, "stop": True}}))
    rs = rules.configure("overfit,exploding_tensor", str(path), "exploding_tensor")
    got = {r.rule.name: r.rule for r in rs.results}
    assert set(got) == {"overfit", "exploding_tensor"}
    assert got["overfit"].ratio_threshold == 2.0 and got["overfit"].stop and got["exploding_tensor"].stop
    assert rules.configure("none").results == []
    assert len(rules.configure("all").results) == len(rules.RULES)


@pytest.mark.parametrize(("names", "config", "stop", "message"), [
    ("overfit,typo_rule", "", "", "unknown rule(s) typo_rule"),
    ("all", '{"overfit": {"ratio": 1}}', "", "rule overfit has no parameter 'ratio'"),
    ("all", '{"overfit": {"patience": "2"}}', "", "overfit.patience='2' must be a int"),
    ("all", '{"overfit": ', "", "not valid JSON"),
    ("all", "/no/such/rules.json", "", "no such file"),
    ("overfit", "", "exploding_tensor", "which rules='overfit' does not enable"),
])
def test_configure_rejects_bad_configuration(names, config, stop, message):
    with pytest.raises(HyperparameterError, match=None) as e:
        rules.configure(names, config, stop)
    assert message in str(e.value)


def _samples(gpu: list[float], cpu: float = 50.0) -> list[dict]:
    return [{"t": i / 2, "cpu": cpu, "iowait": 0.0, "gpu": [g]} for i, g in enumerate(gpu)]


def test_low_gpu_utilization_underused_fluctuating_and_busy():
    rule = rules.LowGpuUtilization(patience=0, window=100)
    assert rule.system(_samples([30.0] * 100), [], True).evidence["p95"] == 30.0
    assert "fluctuates" in rule.system(_samples([95.0, 0.0] * 50), [], True).message
    assert rule.system(_samples([90.0] * 100), [], True) is None
    assert rule.system([], [], False) == rules.NOT_APPLICABLE


def test_cpu_bottleneck_and_dataloader_wait():
    rule = rules.CpuBottleneck(patience=0)
    assert rule.system(_samples([2.0] * 60 + [90.0] * 40, cpu=99.0), [], True).evidence["share"] == 60.0
    assert rule.system(_samples([2.0] * 40 + [90.0] * 60, cpu=99.0), [], True) is None
    wait = rules.DataloaderWait(patience=2)
    steps = [{"step": i, "data": 0.6, "forward": 0.2, "backward": 0.2, "optimizer": 0.0, "total": 1.0}
             for i in range(10)]
    assert wait.system([], steps, False).evidence["share"] == pytest.approx(60.0)
    assert wait.system([], [{**s, "data": 0.1} for s in steps], False) is None
