"""The local search's bookkeeping (imgclf.search.local_search) on a real Optuna study in SQLite, with the training
run replaced by a function of the hyperparameters: heartbeats and retries of lost trials, what counts toward
--max-jobs, interrupts, plots. The real runs through `tune.py --local` are in tests/integration/test_tune_local.py."""

from __future__ import annotations

import logging
import sqlite3
import warnings
from pathlib import Path

import optuna
import pytest
from imgclf.search import local_search
from imgclf.search.local_search import Options, Search, TrialFailed
from optuna.trial import TrialState

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeats, plots

SPACE = {"lr": {"type": "continuous", "min": 0.001, "max": 0.01, "scaling": "Logarithmic"},
         "batch-size": {"type": "categorical", "values": [16, 32]}}
STUDY = "unit"


def search(tmp_path: Path, max_jobs: int) -> Search:
    data = tmp_path / "data"
    for split in ("train", "valid"):
        (data / split / "a").mkdir(parents=True, exist_ok=True)
    options = Options(data=str(data), output=str(tmp_path / "hpo"), weights=None, study_name=STUDY, storage=None,
                      pruner="none", pruner_startup_trials=3, prune_from_epoch=1, no_early_stopping=False,
                      enqueue=[], seed=0, strategy="Random", objective="loss", max_jobs=max_jobs, timeout=None,
                      verbose=False, best_out=tmp_path / "best.json")
    return Search(options, SPACE, {})


def add_orphan(storage_url: str, study_name: str, params: dict, dists: dict, output: str,
               heartbeat_age: str | None, reported: dict[int, float] | None = None) -> int:
    """A RUNNING trial written as a search process on another machine writes it (its output folder there, the
    epochs it `reported`, its heartbeats), whose last heartbeat is `heartbeat_age` old (an SQLite modifier such as
    '-1 hour'): it died then. `dists`: the search space's distributions. Returns the trial's number."""
    with warnings.catch_warnings():  # heartbeat_interval is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=local_search.HEARTBEAT_S)
    study = optuna.load_study(study_name=study_name, storage=storage)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.RUNNING, params=params, distributions=dists, user_attrs={"output": output},
        intermediate_values=reported))
    number = len(study.trials) - 1
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
    storage.record_heartbeat(trial_id)
    if heartbeat_age:
        with sqlite3.connect(storage_url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
                       (heartbeat_age, trial_id))
    storage.engine.dispose()
    return number


@pytest.fixture
def trained(monkeypatch) -> dict[int, list[str]]:
    """Search.train replaced: the loss is the lr (no process). Returns {number: the files in its checkpoints folder
    when it started} of the trials it ran, in order."""
    ran: dict[int, list[str]] = {}

    def train(self, trial, out, value):
        ran[trial.number] = sorted(p.name for p in (out / "checkpoints").glob("*"))
        return trial.params["lr"]

    monkeypatch.setattr(Search, "train", train)
    return ran


def add_complete(s: Search, lr: float, batch_size: int = 16) -> None:
    s.study.add_trial(optuna.trial.create_trial(
        params={"lr": lr, "batch-size": batch_size}, distributions=s.dists, value=lr))


def test_a_trial_orphaned_on_another_machine_is_retried_and_not_counted(tmp_path, trained, caplog):
    s = search(tmp_path, max_jobs=2)
    add_complete(s, 0.002)
    # Its search process died an hour ago on a machine that shares this file system: its checkpoint is visible.
    elsewhere = tmp_path / "other-machine" / "trial-1"
    (elsewhere / "checkpoints").mkdir(parents=True)
    (elsewhere / "checkpoints" / "last.pt").write_bytes(b"state")
    orphan = add_orphan(s.storage_url, STUDY, {"lr": 0.005, "batch-size": 32}, s.dists, str(elsewhere),
                        "-1 hour")

    with caplog.at_level(logging.INFO, "imgclf.search.local_search"):
        s.run()

    trials = s.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE], trials
    retry = trials[2]
    # Had the orphan counted (RUNNING, or FAIL), the study would have held --max-jobs 2 and nothing would have run.
    assert trained == {retry.number: ["last.pt"]}  # resumed from the orphan's checkpoint
    assert retry.user_attrs["retry_of"] == orphan and retry.params == trials[orphan].params
    assert f"trial {orphan} sent no heartbeat for {local_search.GRACE_S} s" in caplog.text


def test_a_trial_running_on_another_machine_is_left_to_it_and_counted(tmp_path, trained):
    s = search(tmp_path, max_jobs=3)
    add_complete(s, 0.002)
    running = add_orphan(s.storage_url, STUDY, {"lr": 0.005, "batch-size": 32}, s.dists,
                         "/elsewhere/trial-1", None)

    s.run()

    trials = s.study.trials
    assert list(trained) == [2] and len(trials) == 3, trials  # 1 complete + 1 running + 1 run here = --max-jobs 3
    assert trials[running].state == TrialState.RUNNING
    assert "retry_of" not in trials[2].user_attrs


def test_failed_trials_do_not_count_but_one_process_starts_at_most_max_jobs(tmp_path, monkeypatch):
    def train(self, trial, out, value):
        raise TrialFailed("out of memory")

    monkeypatch.setattr(Search, "train", train)
    s = search(tmp_path, max_jobs=2)
    s.run()
    assert [(t.state, t.user_attrs["fail_reason"]) for t in s.study.trials] == [(TrialState.FAIL, "out of memory")] * 2
    # the next run starts two more: the failed ones left --max-jobs unmet
    search(tmp_path, max_jobs=2).run()
    assert len(s.study.trials) == 4


def test_an_interrupted_trial_is_queued_again_and_runs_first(tmp_path, monkeypatch, trained):
    def interrupted(self, trial, out, value):
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.pt").write_bytes(b"state")
        trial.report(0.5, 1)
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(Search, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path, max_jobs=2).run()
    s = search(tmp_path, max_jobs=2)
    first, queued = s.study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"].startswith("interrupted")
    assert (Path(first.user_attrs["output"]) / "checkpoints").is_dir()  # kept for the retry
    assert queued.state == TrialState.WAITING and queued.user_attrs == {"retry_of": 0}

    s.run()

    trials = s.study.trials
    assert trained == {1: ["last.pt"], 2: []}  # the retry first, from the checkpoint; then a new trial
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == first.params and trials[1].intermediate_values == {1: 0.5}
    assert not (Path(first.user_attrs["output"]) / "checkpoints").exists()  # moved to the retry
    assert not (Path(trials[1].user_attrs["output"]) / "checkpoints").exists()  # removed once it completed


def test_plots_are_html_and_png_with_one_plotly_js(tmp_path):
    s = search(tmp_path, max_jobs=4)
    for lr, batch_size in ((0.002, 16), (0.004, 32), (0.008, 16), (0.003, 32)):
        add_complete(s, lr, batch_size)

    s.write_plots()

    plots = tmp_path / "hpo" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted(
        [f"{name}.{ext}" for name in local_search.PLOTS for ext in ("html", "png")] + ["plotly.min.js"])
    for name in local_search.PLOTS:
        html = (plots / f"{name}.html").read_text()
        assert html.startswith("<html>") and html.rstrip().endswith("</html>"), html[:200]
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in html
        assert len(html) < 200_000  # plotly.js (4 MB) is in plotly.min.js, once
        assert (plots / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "Plotly" in (plots / "plotly.min.js").read_text()[:5000]


def test_param_importances_is_skipped_with_its_reason(tmp_path, caplog):
    s = search(tmp_path, max_jobs=4)
    add_complete(s, 0.002)
    add_complete(s, 0.004)  # two trials, but only lr differs

    with caplog.at_level(logging.INFO, "imgclf.search.local_search"):
        s.write_plots()

    assert "no param_importances: it needs 2 completed trials and 2 hyperparameters that differ between them " \
           "(2 completed; differing: lr)" in caplog.text
    assert not (tmp_path / "hpo" / "plots" / "param_importances.html").exists()
    assert (tmp_path / "hpo" / "plots" / "parallel_coordinate.png").stat().st_size > 0
