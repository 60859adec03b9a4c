"""scripts/train.py fetches rules.json and the report while the job runs (from its TensorBoard S3 path), then
the final ones from output.tar.gz; against a moto server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.aws_helpers import ROLE, SCRIPTS, client, failed, output_tarball, run_script, sagemaker_backend


def _rules(status: str, overfit: str) -> bytes:
    finding = {"message": "valid loss 40% above train loss", "step": None, "epoch": 3, "evidence": {}}
    return json.dumps({"job_status": status, "epochs": 3, "steps": 24, "rules": [
        {"name": "overfit", "status": overfit, "finding": finding if overfit == "IssuesFound" else None},
        {"name": "exploding_tensor", "status": "NoIssuesFound", "finding": None}]}).encode()


def _wait_for_file(path, proc, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} never came; exit {proc.returncode}"
        time.sleep(0.1)


def test_train_fetches_live_rules_while_running_then_the_final_ones(aws_env, moto_server, tmp_path):
    name = "job-with-live-rules"
    created = run_script("train.py", "--data", "s3://live-bucket/dogImages", "--role", ROLE, "--job-name", name,
                         "--no-wait", env=aws_env)
    assert created.returncode == 0, failed(created)
    job = sagemaker_backend().training_jobs[name]
    assert job.tensor_board_output_config == {"S3OutputPath": f"s3://live-bucket/imgclf/output/{name}/tensorboard",
                                              "LocalPath": "/opt/ml/output/tensorboard"}
    job.training_job_status, job.secondary_status = "InProgress", "Training"
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="live-bucket")
    live = f"imgclf/output/{name}/tensorboard/"
    s3.put_object(Bucket="live-bucket", Key=live + "rules.json", Body=_rules("InProgress", "NoIssuesFound"))
    s3.put_object(Bucket="live-bucket", Key=live + "events.out.tfevents.1.algo-1", Body=b"events")

    reports = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train.py"), "--attach", name, "--poll-interval", "0.2",
                             "--no-logs", "--reports-dir", str(reports)], env=aws_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_file(reports / "rules.json", proc)  # fetched while the job runs
        assert json.loads((reports / "rules.json").read_text())["job_status"] == "InProgress"
        # the next evaluation finds an issue, and the live report appears
        s3.put_object(Bucket="live-bucket", Key=live + "rules.json", Body=_rules("InProgress", "IssuesFound"))
        s3.put_object(Bucket="live-bucket", Key=live + "profiler-report.html", Body=b"<html>live</html>")
        _wait_for_file(reports / "profiler-report.html", proc)
        deadline = time.monotonic() + 30
        while json.loads((reports / "rules.json").read_text())["rules"][0]["status"] != "IssuesFound":
            assert time.monotonic() < deadline, "the updated rules.json was not fetched"
            time.sleep(0.1)
        assert not (reports / "events.out.tfevents.1.algo-1").exists()  # only the reports are fetched

        final = output_tarball({"rules.json": _rules("Completed", "IssuesFound"),
                                "profiler-report.html": b"<html>final"})
        s3.put_object(Bucket="live-bucket", Key=f"imgclf/output/{name}/output/output.tar.gz", Body=final)
        job.training_job_status, job.secondary_status = "Completed", "Completed"
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, failed(result)
    assert stderr.count("rule overfit: IssuesFound (epoch 3): valid loss 40% above train loss") == 1
    assert json.loads((reports / "rules.json").read_text())["job_status"] == "Completed"
    assert (reports / "profiler-report.html").read_text() == "<html>final"
