"""`scripts/tune.py --local`: a real Optuna search of real local-mode training runs, interrupted and resumed.

One search of 3 counted trials (timm's tiny test_resnet, 32 px, 2 epochs, a named study, weights from a --weights
file) covers: an enqueued trial that completes, an absurd learning rate that the successive-halving pruner stops
after epoch 1, a trial that fails with its reason (an unknown model), an interruption by SIGTERM, a trial orphaned
by a search process on another machine (RUNNING, its heartbeat an hour old), the resume that retries both lost
trials without counting them, and the plots. Usage errors are checked without training. The bookkeeping's
corner cases are unit tests (tests/unit/test_local_search.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from imgclf.aws import jobs
from imgclf.config import hyperparameter_strings
from imgclf.search import local_search
from optuna.trial import TrialState

from tests.conftest import REPO
from tests.unit.test_local_search import add_orphan

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

TUNE = [sys.executable, str(REPO / "scripts" / "tune.py")]
MODEL = "timm/test_resnet"  # the job's mechanics are the subject: the smallest model
SPACE = {
    "lr": {"type": "continuous", "min": 0.001, "max": 0.01, "scaling": "Logarithmic"},
    "batch-size": {"type": "categorical", "values": [16, 32]},
    "epochs": {"type": "categorical", "values": [2, 3]},
    "model": {"type": "categorical", "values": [MODEL, "bogus"]},  # bogus: a trial that fails
}
STATIC = {"pretrained": "true", "image-size": "32", "num-workers": "0", "freeze": "none", "augment": "false",
          "debugging": "false"}
GOOD = {"lr": 0.003, "batch-size": 16, "epochs": 2, "model": MODEL}
BOGUS = {**GOOD, "model": "bogus"}
ORPHAN = {"lr": 0.002, "batch-size": 32, "epochs": 2, "model": MODEL}
# What the orphan reported before its machine was lost: a valid loss far worse than GOOD's after epoch 1 (about 1.5).
# Its retry carries the report, and the pruner stops it after epoch 1 whatever its own training makes of it.
ORPHAN_REPORTED = {1: 3.0}
STUDY = "small-lr"


@pytest.fixture
def data_without_test(sample_dataset, tmp_path) -> Path:
    """The session's sample data without its test split: no test evaluation per trial (faster)."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / split).symlink_to(sample_dataset / split, target_is_directory=True)
    return data


def weights_file(tmp_path: Path) -> Path:
    """A timm state_dict of the model (random, not pretrained: the test only needs it loaded)."""
    path = tmp_path / "test_resnet-random.pth"
    if not path.exists():
        import timm
        import torch
        from imgclf import models

        torch.save(timm.create_model(models.timm_name(MODEL)).state_dict(), path)
    return path


def tune_command(data: Path, tmp_path: Path, space: dict = SPACE) -> list[str]:
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(space))
    cmd = [*TUNE, "--local", "--data", str(data), "--output", str(tmp_path / "hpo"), "--search-space",
           str(space_file), "--objective", "loss", "--max-jobs", "3", "--study-name", STUDY, "--pruner", "halving",
           "--weights", str(weights_file(tmp_path)), "--seed", "0", "--best-out", str(tmp_path / "best.json"),
           "--enqueue", ",".join(f"{k}={v}" for k, v in GOOD.items()), "--enqueue", f"lr=5.0,model={MODEL}",
           "--enqueue", ",".join(f"{k}={v}" for k, v in BOGUS.items())]
    for key, value in STATIC.items():
        cmd += ["--hp", f"{key}={value}"]
    return cmd


def load(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'hpo' / 'study.db'}"
    return optuna.load_study(study_name=STUDY, storage=storage)


@pytest.mark.timeout(900)
def test_local_search_prunes_fails_and_resumes(data_without_test, tmp_path):
    cmd = tune_command(data_without_test, tmp_path)

    # 1. Start the search; stop it with SIGTERM once the first trial's row is printed (the second is running).
    with open(tmp_path / "run1.err", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        rows = []
        for line in proc.stdout:
            rows.append(line)
            if re.match(r"\s*0\s+COMPLETE\s", line):
                break
        deadline = time.monotonic() + 60
        while "INFO trial 1: " not in (tmp_path / "run1.err").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rows += proc.stdout.readlines()
        assert proc.wait(timeout=300) == 130, "".join(rows) + (err.seek(0) or err.read())
        err.seek(0)
        assert "run the same command again to resume" in err.read()
    study = load(tmp_path)
    first = study.trials[0]
    assert first.state == TrialState.COMPLETE and first.params == GOOD, first
    assert (Path(first.user_attrs["output"]) / "model.tar.gz").is_file()
    assert not (Path(first.user_attrs["output"]) / "checkpoints").exists()  # removed once the trial ended
    log = (Path(first.user_attrs["output"]) / "train.log").read_text()
    loaded = rf"pretrained {MODEL} weights loaded from \S*/test_resnet-random\.pth$"
    assert re.search(loaded, log, re.M), log[-3000:]
    interrupted, bogus, queued = study.trials[1:]
    assert interrupted.state == TrialState.FAIL and interrupted.params["lr"] == 5.0
    assert interrupted.user_attrs["fail_reason"] == "interrupted: the search was stopped while it ran"
    assert bogus.state == TrialState.WAITING  # the third --enqueue, not started
    assert queued.state == TrialState.WAITING and queued.user_attrs == {"retry_of": 1}

    # 2. A search process on another machine (or container) died without a word an hour ago, in its trial.
    orphan = add_orphan(f"sqlite:///{tmp_path / 'hpo' / 'study.db'}", STUDY, ORPHAN,
                        local_search.distributions(SPACE), "/other-machine/hpo/trial-4", "-1 hour", ORPHAN_REPORTED)

    # 3. The same command resumes: the lost trials are retried and not counted; the study reaches 3 counted trials
    # (had the orphan counted, the retry of the interrupted trial would have been the last).
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert f"trial {orphan} sent no heartbeat for {local_search.GRACE_S} s" in result.stderr, result.stderr[-5000:]
    trials = load(tmp_path).trials
    assert len(trials) == 6, [(t.number, t.state, t.params) for t in trials]
    assert (trials[0].state, trials[0].value, trials[0].datetime_start) == (
        first.state, first.value, first.datetime_start)  # kept as it was
    assert trials[orphan].state == TrialState.FAIL and "fail_reason" not in trials[orphan].user_attrs
    failed, retry_pruned, retry_orphan = trials[2], trials[3], trials[5]
    assert failed.state == TrialState.FAIL and failed.params == BOGUS
    assert failed.user_attrs["fail_reason"].startswith("HyperparameterError: hyperparameter model='bogus'")
    assert retry_pruned.user_attrs["retry_of"] == 1 and retry_pruned.params == interrupted.params
    assert retry_pruned.state == TrialState.PRUNED, retry_pruned
    assert retry_pruned.last_step == 1 and retry_pruned.value > 1e3  # the valid loss of lr=5 after one epoch
    assert retry_orphan.user_attrs["retry_of"] == orphan and retry_orphan.params == ORPHAN
    assert retry_orphan.state == TrialState.PRUNED and retry_orphan.intermediate_values == ORPHAN_REPORTED
    # The live table: a row per trial, the failure's reason, the lost trial and the pruned epoch in it.
    table = result.stdout
    assert re.search(rf"^\s*{orphan}\s+FAIL\s.*no heartbeat: its search process was lost", table, re.M), table
    assert re.search(r"^\s*2\s+FAIL\s.*model=bogus.*HyperparameterError", table, re.M), table
    assert re.search(r"^\s*3\s+PRUNED\s.*lr=5\b.*pruned after epoch 1.*retry of trial 1", table, re.M), table
    assert re.search(rf"^\s*5\s+PRUNED\s.*retry of trial {orphan}", table, re.M), table

    # 4. The plots, beside the trials: HTML that loads the one plotly.min.js there, and PNG. One trial completed:
    # no param importances (drawn in tests/unit/test_local_search.py), and the log says why.
    plots = tmp_path / "hpo" / "plots"
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000
    for name in ("optimization_history", "parallel_coordinate"):
        html = (plots / f"{name}.html").read_text()
        assert html.startswith("<html>") and '<script charset="utf-8" src="plotly.min.js"></script>' in html
        assert (plots / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in plots.iterdir()) == [
        "optimization_history.html", "optimization_history.png", "parallel_coordinate.html",
        "parallel_coordinate.png", "plotly.min.js"]
    assert "plots: no param_importances: it needs 2 completed trials" in result.stderr

    # 5. The best hyperparameters: the completed trial's, in the file format train.py reads.
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["tuning_job"] == STUDY and best["training_job"] == "trial-0"
    assert best["objective"] == {"Type": "Minimize", "MetricName": "valid:loss", "Value": first.value}
    hps = jobs.hyperparameters_from(tmp_path / "best.json")
    # the search tunes lr: the loop trains the heads (head-solver=sgd), in the best file too
    assert hps == hyperparameter_strings({**STATIC, **GOOD, "head-solver": "sgd"})

    # 6. Resuming with another search space is refused before any trial runs.
    changed = subprocess.run(tune_command(data_without_test, tmp_path, {**SPACE, "epochs": {
        "type": "categorical", "values": [2, 4]}}), capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "different search space" in changed.stderr, changed.stderr


@pytest.mark.parametrize("args, message", [
    (["--local", "--data", "{data}", "--spot"], "--spot: not in local mode (local containers run on this machine"),
    (["--data", "s3://bucket/data", "--storage", "sqlite:///x.db"], "--storage: option(s) of the local search"),
    (["--local", "--data", "{data}", "--param", "batch-size=16,32", "--enqueue", "batch-size=64"],
     "--enqueue batch-size=64: not one of the search space's values 16, 32"),
    (["--local", "--data", "{data}", "--param", "lr=0.01:0.1:log", "--hp", "lr=0.1"], "lr: both tuned and static"),
    (["--local", "--data", "{tmp}"], "expected sub-folders train/ and valid/"),
    (["--local", "--data", "{data}", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
])
def test_usage_errors_exit_2_before_any_trial(args, message, data_without_test, tmp_path):
    args = [a.format(data=data_without_test, tmp=tmp_path) for a in args]
    result = subprocess.run([*TUNE, *args, "--output", str(tmp_path / "hpo")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hpo" / "study.db").exists()
