"""scripts/predict.py as a subprocess: the --endpoint path against a moto server, and its exit codes.

The --url path against a real model server is tested in test_serving.py (which owns the one server).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import requests

from tests.conftest import REPO, free_port
from tests.photos import DOG

RESPONSE = {"predictions": [{"top_k": [
    {"label": "Affenpinscher", "class_name": "001.Affenpinscher", "index": 0, "probability": 0.9312},
    {"label": "Brussels griffon", "class_name": "038.Brussels_griffon", "index": 37, "probability": 0.0411},
]}]}


def run_predict(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def plain_ppm(path, value: int):
    """An image whose bytes are ASCII (plain PPM): moto's server mode cannot take binary InvokeEndpoint bodies."""
    path.write_text("P3\n2 2\n255\n" + f"{value} 0 0 " * 4 + "\n")
    return path


def queue_endpoint_results(moto_url: str, bodies: list[str]) -> None:
    """moto answers InvokeEndpoint from this queue (one entry per distinct request body)."""
    results = [{"Body": body, "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic"}
               for body in bodies]
    response = requests.post(f"{moto_url}/moto-api/static/sagemaker/endpoint-results",
                             json={"region": "us-east-1", "results": results}, timeout=10)
    assert response.status_code == 201, response.text


def test_endpoint_prints_top_k_table(moto_server, aws_env, tmp_path):
    queue_endpoint_results(moto_server, [json.dumps(RESPONSE)])
    image = plain_ppm(tmp_path / "dog.ppm", 10)
    result = run_predict(str(image), "--endpoint", "imgclf-dogs", "--region", "us-east-1", "--top-k", "2",
                         env=aws_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(image)
    assert lines[1].split() == ["1.", "Affenpinscher", "93.12%", "(class", "0:", "001.Affenpinscher)"]
    assert "Brussels griffon" in lines[2] and "4.11%" in lines[2]


def test_endpoint_json_and_unexpected_response(moto_server, aws_env, tmp_path):
    queue_endpoint_results(moto_server, [json.dumps(RESPONSE)])
    result = run_predict(str(plain_ppm(tmp_path / "a.ppm", 20)), "--endpoint", "imgclf-dogs", "--json", env=aws_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == RESPONSE
    # a new body with the queue empty gets moto's static text, not our JSON: exit 1 with a message
    odd = run_predict(str(plain_ppm(tmp_path / "b.ppm", 30)), "--endpoint", "imgclf-dogs", env=aws_env)
    assert odd.returncode == 1 and "unexpected response" in odd.stderr


def _no_aws_env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true", **extra}


def test_missing_credentials_and_region_are_usage_errors(tmp_path):
    no_creds = run_predict(str(DOG), "--endpoint", "x", "--region", "us-east-1", env=_no_aws_env(tmp_path))
    assert no_creds.returncode == 2 and "no AWS credentials" in no_creds.stderr and "Traceback" not in no_creds.stderr
    no_region = run_predict(str(DOG), "--endpoint", "x", env=_no_aws_env(tmp_path))
    assert no_region.returncode == 2 and "no AWS region" in no_region.stderr


@pytest.mark.parametrize("args,code,message", [
    (["missing.jpg", "--url", "http://127.0.0.1:8080"], 2, "no such image file"),
    ([str(DOG), "--url", "ftp://example"], 2, "give http://HOST:PORT"),
    ([str(DOG)], 2, "one of the arguments --url --endpoint is required"),
    ([str(DOG), "--url", "http://127.0.0.1:8080", "--top-k", "0"], 2, "must be at least 1"),
])
def test_usage_errors(args, code, message):
    result = run_predict(*args)
    assert result.returncode == code and message in result.stderr, result.stderr


def test_unreachable_server_exit_code():
    result = run_predict(str(DOG), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert result.returncode == 3 and "cannot reach" in result.stderr and "imgclf.local serve" in result.stderr


def test_endpoint_request_carries_the_image_and_top_k(tmp_path):
    """What InvokeEndpoint sends, seen by a recording endpoint: the file's bytes, its Content-Type, top_k=2 in the
    custom attributes that SageMaker passes to the container."""
    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, dict(self.headers), body))
            answer = json.dumps(RESPONSE).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = plain_ppm(tmp_path / "dog.ppm", 10)
    env = _no_aws_env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        result = run_predict(str(image), "--endpoint", "imgclf-dogs", "--region", "us-east-1", "--top-k", "2",
                             env=env)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    [(path, headers, body)] = seen
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/endpoints/imgclf-dogs/invocations" and body == image.read_bytes()
    assert headers["x-amzn-sagemaker-custom-attributes"] == "top_k=2"
    assert headers["content-type"] == "application/x-image"  # what predict.py sends for a suffix it does not map


def test_target_model_of_a_multi_model_endpoint(moto_server, aws_env, tmp_path):
    queue_endpoint_results(moto_server, [json.dumps(RESPONSE)])
    image = plain_ppm(tmp_path / "site.ppm", 40)
    result = run_predict(str(image), "--endpoint", "breeds-per-site", "--target-model", "site-a/model.tar.gz",
                         env=aws_env)
    assert result.returncode == 0, result.stderr
    assert "Affenpinscher" in result.stdout
    for args, said in ((["--url", "http://127.0.0.1:1"], "put the model in the URL"),
                       (["--endpoint", "x", "--local"], "local mode hosts no multi-model endpoints")):
        refused = run_predict(str(image), *args, "--target-model", "a.tar.gz", env=aws_env)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr


def test_async_endpoint_round_trip_and_failure(moto_server, aws_env, tmp_path):
    """--async: the image uploaded under the prefix, InvokeEndpointAsync, the answer read from the output object
    (moto writes the queued result there), or the failure object's message with exit 1."""
    from tests.aws_helpers import client

    client("s3", moto_server).create_bucket(Bucket="dogs-async")
    failure = {"code": 413, "type": "RequestEntityTooLarge", "message": "image of 90000000 pixels is over the limit"}
    response = requests.post(f"{moto_server}/moto-api/static/sagemaker/async-endpoint-results", timeout=10, json={
        "region": "us-east-1", "results": [{"data": json.dumps(RESPONSE)},
                                           {"is_failure": True, "data": json.dumps(failure)}]})
    assert response.status_code == 201, response.text
    args = ["--endpoint", "dogs-async", "--async", "s3://dogs-async/inputs/", "--async-wait", "30"]
    result = run_predict(str(plain_ppm(tmp_path / "a.ppm", 50)), *args, env=aws_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:3] == ["1.", "Affenpinscher", "93.12%"]
    uploaded = client("s3", moto_server).list_objects_v2(Bucket="dogs-async", Prefix="inputs/")["Contents"]
    assert len(uploaded) == 1 and uploaded[0]["Size"] == (tmp_path / "a.ppm").stat().st_size
    refused = run_predict(str(plain_ppm(tmp_path / "b.ppm", 60)), *args, env=aws_env)
    assert refused.returncode == 1 and "refused: image of 90000000 pixels is over the limit" in refused.stderr
    for bad, said in ((["--url", "http://127.0.0.1:1", "--async", "s3://b/x/"], "--async goes with --endpoint"),
                      (["--endpoint", "e", "--async", "b/x"], "give the S3 prefix")):
        usage = run_predict(str(DOG), *bad, env=aws_env)
        assert usage.returncode == 2 and said in usage.stderr, usage.stderr
