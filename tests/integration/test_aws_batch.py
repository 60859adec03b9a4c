"""scripts/batch_predict.py as a subprocess against a moto server (and offline dry runs): the model and
CreateTransformJob requests, then the summary built from the <image>.out answers under the output prefix.

moto completes a transform job at once and writes no answers: the test puts them where SageMaker writes them
(<output>/<input path>.out) before the script reads them. The real serving image answers them in
tests/images/test_images.py (the SDK's local mode).
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from imgclf.aws.images import image_tag_default

from tests.aws_helpers import ACCOUNT, ROLE, client, dry_run_requests, failed, offline_env, put_ecr_image, run_script

MODEL_DATA = "s3://dogs-batch/imgclf/output/job-1/output/model.tar.gz"
SERVE_REPOSITORY = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve"


def answer(class_name: str, probability: float) -> bytes:
    return json.dumps({"predictions": [{"top_k": [{"label": class_name, "class_name": class_name, "index": 0,
                                                   "probability": probability}]}]}).encode()


def test_transform_job_and_summary_from_the_answers(aws_env, moto_server):
    digest = put_ecr_image(moto_server, "imgclf-serve", [image_tag_default()], layer="serve-batch")
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="dogs-batch")
    for key in ("photos/a.jpg", "photos/sub/b.png", "photos/c.jpg"):
        s3.put_object(Bucket="dogs-batch", Key=key, Body=b"image bytes")
    output = "s3://dogs-batch/scored/run-1"
    # What SageMaker writes: one answer per input object, <output>/<path under the input prefix>.out.
    s3.put_object(Bucket="dogs-batch", Key="scored/run-1/a.jpg.out", Body=answer("001.Affenpinscher", 0.93))
    s3.put_object(Bucket="dogs-batch", Key="scored/run-1/sub/b.png.out", Body=answer("002.Afghan_hound", 0.5))
    s3.put_object(Bucket="dogs-batch", Key="scored/run-1/c.jpg.out", Body=json.dumps(
        {"code": 400, "type": "BadRequest", "message": "c.jpg is not an image"}).encode())

    result = run_script("batch_predict.py", "--input", "s3://dogs-batch/photos", "--output", output,
                        "--model-data", MODEL_DATA, "--role", "imgclf-sagemaker", "--job-name", "batch-1",
                        "--instance-type", "ml.c5.xlarge", "--instance-count", "2", "--max-concurrent", "4",
                        "--invocation-timeout", "120", "--top-k", "1", "--tag", "project=dogs",
                        "--poll-interval", "0.1", env=aws_env)
    assert result.returncode == 0, failed(result)
    assert result.stdout.strip() == f"{output}/summary.csv"
    assert "2 image(s) scored, 1 refused" in result.stderr

    sm = client("sagemaker", moto_server)
    job = sm.describe_transform_job(TransformJobName="batch-1")
    assert job["BatchStrategy"] == "SingleRecord" and job["MaxPayloadInMB"] == 6
    assert job["MaxConcurrentTransforms"] == 4
    assert job["TransformInput"]["SplitType"] == "None"
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {"S3DataType": "S3Prefix",
                                                                   "S3Uri": "s3://dogs-batch/photos/"}
    assert job["TransformOutput"]["S3OutputPath"] == output
    assert job["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 2}
    model = sm.describe_model(ModelName=job["ModelName"])
    assert job["ModelName"].startswith("imgclf-batch-")
    assert model["PrimaryContainer"]["Image"] == f"{SERVE_REPOSITORY}@{digest}"  # by digest, as deploy.py
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA
    assert model["PrimaryContainer"]["Environment"] == {"IMGCLF_TOP_K": "1"}
    assert model["ExecutionRoleArn"] == ROLE

    summary = s3.get_object(Bucket="dogs-batch", Key="scored/run-1/summary.csv")["Body"].read().decode()
    rows = list(csv.reader(io.StringIO(summary)))
    assert rows == [["file", "class_name", "probability", "error"],
                    ["a.jpg", "001.Affenpinscher", "0.930000", ""],
                    ["c.jpg", "", "", "c.jpg is not an image"],
                    ["sub/b.png", "002.Afghan_hound", "0.500000", ""]]

    # The same model again: it is reused, not created twice.
    again = run_script("batch_predict.py", "--input", "s3://dogs-batch/photos", "--output", output,
                       "--model-data", MODEL_DATA, "--role", ROLE, "--job-name", "batch-2", "--top-k", "1",
                       "--poll-interval", "0.1", env=aws_env)
    assert again.returncode == 0, failed(again)
    assert f"model {job['ModelName']} exists" in again.stderr


def test_dry_run_offline_prints_validated_requests_with_the_default_output():
    result = run_script("batch_predict.py", "--input", "s3://dogs-batch/photos/", "--model-data", MODEL_DATA,
                        "--role", ROLE, "--job-name", "dry-batch", "--dry-run", "--volume-kms-key", "key-1",
                        "--output-kms-key", "key-2", "--invocation-retries", "1", env=offline_env())
    assert result.returncode == 0, failed(result)
    model, job = dry_run_requests(result.stdout)
    assert (model["operation"], job["operation"]) == ("CreateModel", "CreateTransformJob")
    r = job["request"]
    assert r["ModelName"] == model["request"]["ModelName"]
    assert r["TransformOutput"] == {"S3OutputPath": "s3://dogs-batch/imgclf/batch/dry-batch", "KmsKeyId": "key-2",
                                    "Accept": "application/json", "AssembleWith": "None"}
    assert r["TransformResources"]["VolumeKmsKeyId"] == "key-1"
    assert r["ModelClientConfig"] == {"InvocationsMaxRetries": 1}
    assert "MaxConcurrentTransforms" not in r  # SageMaker then asks the container's /execution-parameters


@pytest.mark.parametrize("args, message", [
    (["--input", "photos"], "is not an S3 URI"),
    (["--input", "s3://dogs-batch/photos", "--max-payload", "0"], "max payload 0 MB: must be 1-100"),
    (["--input", "s3://dogs-batch/photos", "--instance-type", "m5.large"], "SageMaker types start with ml."),
    (["--input", "s3://dogs-batch/photos", "--invocation-retries", "5"], "invocation retries 5: must be 0-3"),
    (["--input", "s3://dogs-batch/photos", "--local", "--dry-run"], "choose one"),
    # batch transform's GPU hosts (R470, R535) are older than the R580 the serve-gpu image needs
    (["--input", "s3://dogs-batch/photos", "--instance-type", "ml.g5.xlarge"], "older than the R580"),
])
def test_bad_batch_input_exits_2(args, message):
    result = run_script("batch_predict.py", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run", *args,
                        env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr
