"""The AWS scripts' entry points (imgclf.cli.<name>.main) in this process, against the moto server: bad input is
refused with exit 2 and one line naming it before anything is sent; AWS_REGION is a region source; an answer
that is not AWS's exits 3; a Completed job's model URI survives an unreadable report archive."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading

import pytest
from imgclf.aws import invocations
from imgclf.cli import batch_predict, deploy, predict, train, tune, upload_data
from imgclf.exit_codes import EXIT_AWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

from tests.aws_helpers import ROLE, client, offline_env, output_tarball, sagemaker_backend

DATA = "s3://dogs-inputs/data"
MODEL_DATA = "s3://dogs-inputs/m/model.tar.gz"
DEPLOY = ["--name", "dogs", "--model-data", MODEL_DATA, "--image-tag", "latest", "--role", ROLE, "--dry-run"]
BATCH = ["--input", "s3://dogs-inputs/photos", "--model-data", MODEL_DATA, "--image-tag", "latest", "--role", ROLE,
         "--dry-run"]


@pytest.fixture
def aws(aws_env, monkeypatch) -> str:
    """This process talks to the moto server (the scripts read os.environ); returns its URL."""
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    return aws_env["AWS_ENDPOINT_URL"]


@pytest.fixture
def offline(monkeypatch) -> None:
    """No AWS access at all: a dry run still prints its requests."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in offline_env().items():
        monkeypatch.setenv(key, value)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def refused_at_parse(main, argv, capsys) -> str:
    """argparse's refusal: exit 2 and its `error:` line (the one place stderr names the flag)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_aws_region_alone_is_the_region(aws, monkeypatch, capsys, caplog):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert train.main(["--data", DATA, "--role", ROLE, "--job-name", "region-from-env", "--no-wait"]) == EXIT_OK, \
        errors(caplog)
    assert capsys.readouterr().out.strip() == "region-from-env"
    assert "region-from-env" in sagemaker_backend().training_jobs


@pytest.fixture
def not_aws():
    """An HTTP server that is not AWS: http.server, which answers POST with a 501 HTML page."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--data", DATA, "--role", ROLE, "--no-wait"]),
    (tune.main, ["--data", DATA, "--role", ROLE, "--no-wait"]),
])
def test_an_answer_that_is_not_aws_exits_3_with_one_line(aws, not_aws, monkeypatch, caplog, main, argv):
    monkeypatch.setenv("AWS_ENDPOINT_URL", not_aws)
    assert main(argv) == EXIT_AWS
    [line] = errors(caplog)
    assert line.startswith("AWS: the answer is not AWS's") and "AWS_ENDPOINT_URL" in line and "\n" not in line


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--attach", "some-job"]),
    (tune.main, ["--attach", "some-tuning-job"]),
    (deploy.main, DEPLOY),
    (batch_predict.main, BATCH),
])
@pytest.mark.parametrize("interval", ["-5", "0", "nan"])
def test_poll_interval_must_be_positive(offline, capsys, main, argv, interval):
    line = refused_at_parse(main, [*argv, "--poll-interval", interval], capsys)
    assert "--poll-interval" in line and "give a positive number of seconds" in line


@pytest.mark.parametrize("best_out", ["folder", "file/best.json"])
def test_tune_best_out_is_checked_before_the_tuning_job_is_created(aws, tmp_path, monkeypatch, caplog, best_out):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    argv = ["--data", DATA, "--role", ROLE, "--job-name", "hpo-bad-best-out", "--best-out", best_out]
    assert tune.main(argv) == EXIT_USAGE
    [line] = errors(caplog)
    assert line.startswith(f"--best-out {best_out}")
    assert "hpo-bad-best-out" not in sagemaker_backend().hyper_parameter_tuning_jobs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


@pytest.mark.parametrize("argv, message", [
    (["--max-parallel", "0"], "--max-parallel 0: must be from 1 to --max-jobs (10)"),
    (["--max-jobs", "0"], "--max-jobs 0: give at least 1 training job"),
])
def test_tune_job_limits_are_refused_not_replaced(offline, caplog, argv, message):
    assert tune.main(["--data", DATA, "--role", ROLE, "--dry-run", *argv]) == EXIT_USAGE
    assert errors(caplog) == [message]


def test_tune_fewer_jobs_than_the_default_parallelism_runs_them_all_at_once(offline, capsys):
    assert tune.main(["--data", DATA, "--role", ROLE, "--dry-run", "--max-jobs", "1"]) == EXIT_OK
    [sent] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sent["request"]["HyperParameterTuningJobConfig"]["ResourceLimits"] == {
        "MaxNumberOfTrainingJobs": 1, "MaxParallelTrainingJobs": 1}


def _job_with_output(aws: str, name: str, archive: bytes) -> None:
    """A Completed training job (moto ends jobs at once) whose output.tar.gz is `archive`."""
    assert train.main(["--data", DATA, "--role", ROLE, "--job-name", name, "--no-wait"]) == EXIT_OK
    s3 = client("s3", aws)
    s3.create_bucket(Bucket="dogs-inputs")
    s3.put_object(Bucket="dogs-inputs", Key=f"imgclf/output/{name}/output/output.tar.gz", Body=archive)


@pytest.mark.parametrize("archive", [b"garbage, not gzip", output_tarball({"../../evil.txt": b"x"})],
                         ids=["not-gzip", "outside"])
def test_an_unreadable_report_archive_is_a_warning_and_the_model_uri_is_printed(aws, tmp_path, capsys, caplog,
                                                                                 archive):
    name = f"reports-{len(archive)}"
    _job_with_output(aws, name, archive)
    capsys.readouterr()
    reports = tmp_path / "deep" / "reports"
    assert train.main(["--attach", name, "--poll-interval", "0.1", "--no-logs", "--reports-dir", str(reports)]) \
        == EXIT_OK, errors(caplog)
    model = sagemaker_backend().training_jobs[name].model_artifacts["S3ModelArtifacts"]
    assert capsys.readouterr().out.strip() == model
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("no reports:") for r in caplog.records)
    assert not (tmp_path / "evil.txt").exists() and not errors(caplog)


def test_reports_dir_is_checked_before_the_training_job_is_created(aws, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    argv = ["--data", DATA, "--role", ROLE, "--job-name", "bad-reports-dir", "--reports-dir", str(tmp_path / "a-file")]
    assert train.main(argv) == EXIT_USAGE
    assert errors(caplog) == [f"--reports-dir {tmp_path / 'a-file'} is a file: give a folder"]
    assert "bad-reports-dir" not in sagemaker_backend().training_jobs


@pytest.mark.parametrize("main, argv", [(deploy.main, DEPLOY), (batch_predict.main, BATCH)])
@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k: IMGCLF_TOP_K=0: must be at least 1"),
    (["--top-k", "-3"], "--top-k: IMGCLF_TOP_K=-3: must be at least 1"),
    (["--workers", "-1"], "--workers: SAGEMAKER_MODEL_SERVER_WORKERS=-1: must be 0-1024"),
    (["--env", "IMGCLF_TOP_K=abc"], "--env: environment variable IMGCLF_TOP_K='abc' is not an integer"),
    (["--env", "IMGCLF_SERVE_DTYPE=float16"], "--env: IMGCLF_SERVE_DTYPE='float16': use float32 or int8 or bfloat16"),
    (["--workers", "2", "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=4"],
     "--workers 2 and --env SAGEMAKER_MODEL_SERVER_WORKERS=4: give one of them"),
])
def test_serving_environment_the_container_would_refuse_exits_2(offline, capsys, caplog, main, argv, flags,
                                                                 message):
    assert main([*argv, *flags]) == EXIT_USAGE
    [line] = errors(caplog)
    assert line.startswith(message)
    assert capsys.readouterr().out == ""  # no request printed


@pytest.mark.parametrize("main, argv, field", [
    (train.main, ["--data", DATA, "--role", ROLE, "--dry-run"], "ResourceConfig.InstanceType"),
    (tune.main, ["--data", DATA, "--role", ROLE, "--dry-run"], "TrainingJobDefinition.ResourceConfig.InstanceType"),
    (deploy.main, DEPLOY, "ProductionVariants[0].InstanceType"),
    (batch_predict.main, BATCH, "TransformResources.InstanceType"),
])
def test_an_instance_type_aws_does_not_have_exits_2_before_anything_is_printed(offline, capsys, caplog, main, argv,
                                                                                field):
    assert main([*argv, "--instance-type", "ml.c5.xlarg"]) == EXIT_USAGE
    [line] = errors(caplog)
    assert f"{field} 'ml.c5.xlarg' is not one of the" in line and "did you mean ml.c5.xlarge" in line, line
    assert capsys.readouterr().out == ""  # deploy and batch: not even the model


@pytest.mark.parametrize("main, name, field", [
    (train.main, "bad name_", "TrainingJobName"),
    (tune.main, "bad name", "HyperParameterTuningJobName"),
    (tune.main, "hpo-", "HyperParameterTuningJobName"),
    (batch_predict.main, "batch_1", "TransformJobName"),
])
def test_a_job_name_sagemaker_refuses_exits_2(offline, capsys, caplog, main, name, field):
    argv = BATCH if main is batch_predict.main else ["--data", DATA, "--role", ROLE, "--dry-run"]
    assert main([*argv, "--job-name", name]) == EXIT_USAGE
    [line] = errors(caplog)
    assert f"{field} {name!r} is not a SageMaker job name" in line
    assert capsys.readouterr().out == ""


def test_a_job_name_sagemaker_refuses_is_not_sent(aws, caplog):
    assert train.main(["--data", DATA, "--role", ROLE, "--job-name", "bad name_", "--no-wait"]) == EXIT_USAGE
    assert "bad name_" not in sagemaker_backend().training_jobs


@pytest.mark.parametrize("flags", [["--timeout", "-1"], ["--timeout", "0"], ["--async-wait", "0"]])
def test_predict_waits_must_be_positive(tmp_path, capsys, flags):
    line = refused_at_parse(predict.main, [str(tmp_path), "--url", "http://127.0.0.1:9", *flags], capsys)
    assert flags[0] in line and "give a positive number of seconds" in line


def test_predict_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"not sent")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(invocations, "via_url", lambda url, timeout: interrupted)
    assert predict.main([str(image), "--url", "http://127.0.0.1:9"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("workers", ["0", "-1", "33", "many"])
def test_upload_workers_outside_1_to_32_are_refused(tmp_path, capsys, workers):
    line = refused_at_parse(upload_data.main, [str(tmp_path), "s3://b/p", "--workers", workers], capsys)
    assert "--workers" in line and "from 1 to 32" in line


@pytest.mark.parametrize("flags, message", [
    (["--delete", "--model-data", MODEL_DATA], "--model-data: --delete deletes the endpoint"),
    (["--model-data", MODEL_DATA, "--image-tag", "latest", "--data-capture-percent", "500"],
     "--data-capture-percent goes with --data-capture S3URI"),
])
def test_deploy_flags_that_would_be_ignored_exit_2(offline, caplog, flags, message):
    assert deploy.main(["--name", "dogs", "--role", ROLE, "--dry-run", *flags]) == EXIT_USAGE
    [line] = errors(caplog)
    assert line.startswith(message)


def test_any_region_goes_with_endpoint_url_as_with_aws_endpoint_url(aws, monkeypatch, caplog):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    argv = ["--data", DATA, "--role", ROLE, "--dry-run", "--region", "mars-1", "--endpoint-url", aws]
    assert train.main(argv) == EXIT_OK
    assert not [r for r in caplog.records if "without AWS access" in r.getMessage()]  # the session was made


@pytest.mark.parametrize("argv, message", [
    (["--attach", "some-job", "--data", DATA, "--hp", "epochs=3"],
     "--data, --hp: --attach waits for a job that exists"),
    (["--channel", "train=s3://bkt/t", "--channel", "train=s3://bkt/t2", "--dry-run"],
     "--channel train: given twice"),
])
def test_train_flags_that_would_be_ignored_exit_2(offline, caplog, argv, message):
    assert train.main(["--role", ROLE, *argv]) == EXIT_USAGE
    [line] = errors(caplog)
    assert line.startswith(message)
