"""The job's output as SageMaker keeps it, read back with imgclf.trial (local, S3 on a moto server, the CLI).

The folders are made from the session's real training run: local mode's reports/ is the job's output/data,
packed here into output.tar.gz as SageMaker packs it, next to model.tar.gz and nothing else.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from imgclf import trial as trials
from imgclf.aws.training import metric_definitions
from PIL import Image

from tests.aws_helpers import client

JOB = "imgclf-resnet18-20261128-120000"


def sagemaker_upload(trained_out: Path, dest: Path) -> Path:
    """<dest>/<job>/output/{model,output}.tar.gz: what SageMaker writes to S3OutputPath, from model/ and
    output/data alone (output.tar.gz holds output/data's contents at its root)."""
    folder = dest / JOB / "output"
    folder.mkdir(parents=True)
    shutil.copy(trained_out / "model.tar.gz", folder / "model.tar.gz")
    with tarfile.open(folder / "output.tar.gz", "w:gz") as tar:
        for item in sorted((trained_out / "reports").iterdir()):
            tar.add(item, arcname=item.name)
    return folder


@pytest.fixture(scope="module")
def uploaded(trained, tmp_path_factory) -> Path:
    return sagemaker_upload(trained[0], tmp_path_factory.mktemp("s3"))


def test_what_sagemaker_uploads_holds_everything_and_rebuilds_the_loss_curves(trained, uploaded):
    out, _ = trained
    with tarfile.open(uploaded / "output.tar.gz") as tar:
        names = tar.getnames()
    for wanted in ("rules.json", "profiler-report.html", "metrics.json", "tensors/scalars.jsonl",
                   "tensors/layers.jsonl", "profiler/system.jsonl", "profiler/steps.jsonl",
                   "profiler/top_operators.json"):
        assert wanted in names, (wanted, names)
    assert any(re.fullmatch(r"profiler/.+\.pt\.trace\.json\.gz", n) for n in names), names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), names

    t = trials.create_trial(uploaded / "model.tar.gz")  # the model's URI leads to output.tar.gz beside it
    loss = t.tensor("CrossEntropyLoss_output_0")
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    steps = json.loads((out / "reports" / "rules.json").read_text())["steps"]
    assert steps == 5 * 8  # the demo's 5 epochs of 120 images in batches of 16
    assert loss.steps(trials.modes.TRAIN) == list(range(0, steps, 10)) == t.tensor("loss").steps("train")
    assert loss.steps("EVAL") == list(range(5 * 3))  # every batch of the 5 validations (40 images)
    assert t.steps("TRAIN") == sorted({*range(0, steps, 10), 0})  # lr too; layer statistics at step 0
    # the evaluation losses of each epoch average to the validation loss that epoch reported
    evals = loss.values("EVAL")
    for epoch, record in enumerate(metrics["history"]):
        batches = [evals[3 * epoch + i] for i in range(3)]
        mean = (16 * batches[0] + 16 * batches[1] + 8 * batches[2]) / 40
        assert mean == pytest.approx(record["valid_loss"], rel=1e-4), (epoch, batches, record)
    assert t.job_status == "Completed" and {r["name"] for r in t.rules()} >= {"overfit", "exploding_tensor"}
    assert "weight_norm/fc.weight" in t.tensor_names() and t.tensor("lr").value(0) == pytest.approx(0.001)


def test_tensorboard_live_folder_holds_the_same_losses(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    live = out / "tensorboard"  # local mode's live folder: what SageMaker syncs while the job runs
    assert json.loads((live / "rules.json").read_text()) == json.loads((out / "reports" / "rules.json").read_text())
    assert "Job Completed" in (live / "profiler-report.html").read_text()
    acc = EventAccumulator(str(live)).Reload()
    from_events = {e.step: e.value for e in acc.Scalars("loss/train")}
    collected = trials.create_trial(out).tensor("loss").values("TRAIN")
    assert from_events.keys() == collected.keys()
    assert list(from_events.values()) == pytest.approx(list(collected.values()), rel=1e-6)


def test_trial_errors_name_the_problem(tmp_path, uploaded):
    cases = {
        tmp_path / "missing": "no such file or folder",
        tmp_path: "holds no training output",
        uploaded / "nothing.tar.gz": "no such file or folder",
    }
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tarball")
    cases[broken] = "is not a readable .tar.gz"
    alone = tmp_path / "alone" / "model.tar.gz"
    alone.parent.mkdir()
    shutil.copy(uploaded / "model.tar.gz", alone)
    cases[alone] = "its debugging data is in output.tar.gz beside it"
    no_debugging = tmp_path / "no-debugging"  # what a job run with debugging=false uploads
    no_debugging.mkdir()
    (no_debugging / "metrics.json").write_text("{}")
    cases[no_debugging] = "without debugging data"
    for location, message in cases.items():
        with pytest.raises(trials.TrialError, match=re.escape(message)):
            trials.create_trial(location)
    t = trials.create_trial(uploaded / "output.tar.gz")
    with pytest.raises(trials.TrialError, match="no tensor 'CrossEntropyLoss' in .*tensors: loss, lr"):
        t.tensor("CrossEntropyLoss")
    with pytest.raises(trials.TrialError, match="mode 'PREDICT': use TRAIN or EVAL"):
        t.tensor("loss").values("PREDICT")


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf.trial", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # curves, axes and text, not a blank canvas


def test_cli_prints_the_rules_and_plots_the_losses(uploaded, tmp_path):
    png = tmp_path / "plots" / "losses.png"
    result = run_cli(str(uploaded / "output.tar.gz"), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert re.search(r"job Completed, 5 epochs, 40 steps", result.stdout), result.stdout
    assert re.search(r"rules: 0 of \d+ found issues", result.stdout)
    assert re.search(r"^  overfit +NoIssuesFound$", result.stdout, re.M)
    assert_png(png)


@pytest.mark.parametrize("args, message", [
    (["/no/such/job"], "/no/such/job: no such file or folder"),
    (["s3://Not_A_Bucket/x"], "is not an S3 URI"),
    (["OUT", "--plot", "curves.svg"], "give a .png file name"),
])
def test_cli_bad_input_is_one_clear_line(args, message, uploaded):
    result = run_cli(*[str(uploaded / "output.tar.gz") if a == "OUT" else a for a in args])
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


# --- S3 (a moto server) --------------------------------------------------------------------------------------

@pytest.fixture
def s3_job(uploaded, moto_server, aws_env, monkeypatch) -> str:
    """The job's output under s3://trial-bucket/imgclf/output/<job>/ (and the live rules.json), env set."""
    for key, value in aws_env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="trial-bucket")
    for name in ("model.tar.gz", "output.tar.gz"):
        s3.upload_file(str(uploaded / name), "trial-bucket", f"imgclf/output/{JOB}/output/{name}")
    with tarfile.open(uploaded / "output.tar.gz") as tar:
        rules = tar.extractfile("rules.json").read()
    s3.put_object(Bucket="trial-bucket", Key=f"imgclf/output/{JOB}/tensorboard/rules.json", Body=rules)
    return f"s3://trial-bucket/imgclf/output/{JOB}"


def test_trial_reads_s3_uris_and_prefixes(s3_job, uploaded, moto_server):
    local = trials.create_trial(uploaded).tensor("loss")
    for location in (f"{s3_job}/output/model.tar.gz", f"{s3_job}/output/output.tar.gz", s3_job, s3_job + "/"):
        t = trials.create_trial(location)
        loss = t.tensor("CrossEntropyLoss_output_0")
        assert loss.values("TRAIN") == local.values("TRAIN") and loss.values("EVAL") == local.values("EVAL"), location
    live = trials.create_trial(f"{s3_job}/tensorboard")  # a running job's live folder: rules only
    assert live.job_status == "Completed" and live.rules()
    with pytest.raises(trials.TrialError, match="holds no collected tensors"):
        live.tensor("loss")

    s3 = client("s3", moto_server)
    s3.upload_file(str(uploaded / "output.tar.gz"), "trial-bucket", "imgclf/output/other-job/output/output.tar.gz")
    cases = {
        "s3://trial-bucket/imgclf/output": "holds the output of 2 jobs; give one",
        "s3://trial-bucket/imgclf/nothing-here": "no objects there",
        "s3://no-such-bucket-4711/job": "NoSuchBucket",
        "s3://trial-bucket/imgclf/output/gone/output/model.tar.gz": "404",
    }
    for location, message in cases.items():
        with pytest.raises(trials.TrialError, match=re.escape(message)):
            trials.create_trial(location)


def test_cli_reads_s3_and_plots(s3_job, aws_env, tmp_path):
    png = tmp_path / "losses.png"
    result = run_cli(s3_job, "--plot", str(png), env=aws_env)
    assert result.returncode == 0, result.stderr
    assert "job Completed" in result.stdout
    assert_png(png)
    missing = run_cli("s3://no-such-bucket-4711/job", env=aws_env)
    assert missing.returncode == 2 and "NoSuchBucket" in missing.stderr and "Traceback" not in missing.stderr


# --- smdebug users: the reference notebook's reading code, its imports changed ------------------------------

# How the reference project's notebook read Debugger's output with smdebug: the tensor listing and step counts of
# its Debugger cells, then get_data and plot_tensor from AWS's Debugger example notebooks. The lines that use the
# trial API are as written there; plot_tensor's matplotlib styling (colours, labels, plt.show) is left out.
SMDEBUG_NOTEBOOK = """\
from smdebug.trials import create_trial
from smdebug.core.modes import ModeKeys
trial = create_trial(estimator.latest_job_debugger_artifacts_path())
print(trial.tensor_names())
print(len(trial.tensor("CrossEntropyLoss_output_0").steps(mode=ModeKeys.TRAIN)))
print(len(trial.tensor("CrossEntropyLoss_output_0").steps(mode=ModeKeys.EVAL)))

import matplotlib.pyplot as plt
from mpl_toolkits.axes_grid1 import host_subplot


def get_data(trial, tname, mode):
    tensor = trial.tensor(tname)
    steps = tensor.steps(mode=mode)
    vals = []
    for s in steps:
        vals.append(tensor.value(s, mode=mode))
    return steps, vals


def plot_tensor(trial, tensor_name):

    steps_train, vals_train = get_data(trial, tensor_name, mode=ModeKeys.TRAIN)
    print("loaded TRAIN data")
    steps_eval, vals_eval = get_data(trial, tensor_name, mode=ModeKeys.EVAL)
    print("loaded EVAL data")

    host = host_subplot(111)
    par = host.twiny()
    host.plot(steps_train, vals_train, label=tensor_name)
    par.plot(steps_eval, vals_eval, label="val_" + tensor_name)
    plt.legend()


plot_tensor(trial, "CrossEntropyLoss_output_0")
"""
# All that a Debugger user changes (docs/debugging.md, "Moving from smdebug"): the imports, and the location read:
# the job's model.tar.gz (its S3ModelArtifacts; SDK v2: estimator.model_data) instead of its debug-output prefix.
MIGRATION = {"from smdebug.trials import": "from imgclf.trial import",
             "from smdebug.core.modes import": "from imgclf.trial import",
             "estimator.latest_job_debugger_artifacts_path()": "job_output"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_smdebug_notebook_code_runs_with_only_its_imports_changed(where, trained, uploaded, request, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = SMDEBUG_NOTEBOOK
    for old, new in MIGRATION.items():
        source = source.replace(old, new)
    changed = [old for old, new in zip(SMDEBUG_NOTEBOOK.splitlines(), source.splitlines()) if old != new]
    assert changed == SMDEBUG_NOTEBOOK.splitlines()[:3] and "smdebug" not in source  # imports and location only
    job_output = (f"{request.getfixturevalue('s3_job')}/output/model.tar.gz" if where == "s3"
                  else str(uploaded / "model.tar.gz"))
    notebook: dict = {"job_output": job_output}
    plt.close("all")
    capsys.readouterr()  # what the fixtures printed (moto's start line)
    exec(compile(source, "notebook", "exec"), notebook)
    printed = capsys.readouterr().out.splitlines()

    # What the job was told to collect, and what it wrote, read without imgclf.trial.
    reports = trained[0] / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    train_every = metrics["hyperparameters"]["collect-train-interval"]
    eval_every = metrics["hyperparameters"]["collect-eval-interval"]
    assert (train_every, eval_every) == (10, 1)  # the defaults: the reference project's Debugger hook settings
    steps = json.loads((reports / "rules.json").read_text())["steps"]  # training steps run: 5 epochs of 8
    eval_steps = len(metrics["history"]) * 3  # each validation: 40 images in batches of 16
    written = [json.loads(line) for line in (reports / "tensors" / "scalars.jsonl").read_text().splitlines()]
    losses = {(r["mode"], r["step"]): r["value"] for r in written if r["name"] == "loss"}

    ModeKeys, trial = notebook["ModeKeys"], notebook["trial"]
    assert ModeKeys is trials.ModeKeys and {"loss", "lr"} <= set(trial.tensor_names())
    expected = {ModeKeys.TRAIN: list(range(0, steps, train_every)),  # every 10th step: 0, 10, 20, 30
                ModeKeys.EVAL: list(range(0, eval_steps, eval_every))}  # every step: 0 to 14
    counts = [len(expected[ModeKeys.TRAIN]), len(expected[ModeKeys.EVAL])]
    assert counts == [4, 15]
    assert printed == [str(trial.tensor_names()), *map(str, counts), "loaded TRAIN data", "loaded EVAL data"]
    curves = {}
    for mode, mode_steps in expected.items():
        curves[mode] = notebook["get_data"](trial, "CrossEntropyLoss_output_0", mode)
        assert curves[mode][0] == mode_steps, mode
        assert curves[mode][1] == [losses[mode, s] for s in mode_steps], mode  # the job's own records, in order
        assert all(math.isfinite(v) and 0 < v < 20 for v in curves[mode][1]), curves[mode]

    host = plt.gcf().axes[0]  # plot_tensor's figure: training loss on the host axes, evaluation on the twin
    for axes, mode in ((host, ModeKeys.TRAIN), (host.parasites[0], ModeKeys.EVAL)):
        (line,) = axes.lines
        assert (list(line.get_xdata()), list(line.get_ydata())) == (list(curves[mode][0]), list(curves[mode][1]))
    assert [t.get_text() for t in host.get_legend().get_texts()] == ["CrossEntropyLoss_output_0",
                                                                      "val_CrossEntropyLoss_output_0"]
    plt.close("all")


# --- rule results as metrics ---------------------------------------------------------------------------------

def test_rule_metric_lines_match_the_job_metric_definitions(trained):
    _, result = trained
    definitions = {d["Name"]: d["Regex"] for d in metric_definitions(rules=True) if d["Name"].startswith("rule")}
    rules_json = json.loads((trained[0] / "reports" / "rules.json").read_text())
    assert set(definitions) == {"rules:issues", *(f"rule:{r['name']}" for r in rules_json["rules"])}
    for name, regex in definitions.items():
        values = re.findall(regex, result.stdout)
        assert values == ["0"] * 6, (name, values)  # after each of the 5 epochs and at the end: no issue
    assert len(metric_definitions(rules=True)) <= 40  # SageMaker's limit per training job
