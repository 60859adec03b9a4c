"""scripts/push_images.py against a moto server: repositories, scan and lifecycle settings, token, dry run, errors."""

from __future__ import annotations

import json
import re
import uuid

import boto3
import pytest
from imgclf.aws import ecr, push
from imgclf.aws.images import REPOSITORIES
from imgclf.aws.session import Api

from tests.aws_helpers import (
    ACCOUNT,
    REGION,
    client,
    dry_run_requests,
    failed,
    offline_env,
    put_ecr_image,
    run_script,
)


@pytest.fixture
def api(moto_server) -> Api:
    session = boto3.Session(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    return Api(session, endpoint_url=moto_server)


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_default_names_are_the_repositories_the_other_scripts_use():
    assert {i: ecr.repository_name(ecr.DEFAULT_PREFIX, i) for i in REPOSITORIES} == REPOSITORIES


def test_ensure_repository_creates_it_with_scan_on_push_and_lifecycle(api, moto_server):
    ecr_client = client("ecr", moto_server)
    name = f"{unique_prefix()}-serve"
    push.ensure_repository(api, name, keep=5, account=ACCOUNT)
    repo = ecr_client.describe_repositories(repositoryNames=[name])["repositories"][0]
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repo["encryptionConfiguration"]["encryptionType"] == "AES256"
    policy = json.loads(ecr_client.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
    assert policy["rules"][0]["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan",
                                               "countNumber": 5}
    assert policy["rules"][0]["action"] == {"type": "expire"}

    # Again on an existing repository whose scanning someone turned off: on again, new policy, no error.
    ecr_client.put_image_scanning_configuration(repositoryName=name, imageScanningConfiguration={"scanOnPush": False})
    push.ensure_repository(api, name, keep=3, account=ACCOUNT)
    repo = ecr_client.describe_repositories(repositoryNames=[name])["repositories"][0]
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    policy = json.loads(ecr_client.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
    assert policy["rules"][0]["selection"]["countNumber"] == 3
    assert len(ecr_client.describe_repositories()["repositories"]) >= 1


def test_authorization_token_gives_docker_credentials(api):
    answer = api.call("ecr", "GetAuthorizationToken", {}, mutates=False)
    user, password, endpoint = ecr.docker_credentials(answer["authorizationData"][0])
    assert user == "AWS" and password
    assert endpoint == f"https://{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    assert endpoint.removeprefix("https://") == ecr.registry(ACCOUNT, REGION)
    assert ecr.registry(ACCOUNT, "cn-north-1").endswith(".amazonaws.com.cn")


def test_dry_run_prints_every_request_and_command_and_sends_nothing(aws_env, moto_server):
    prefix = unique_prefix()
    result = run_script("push_images.py", "train-cpu", "serve", "--prefix", prefix, "--tag", "abc123",
                        "--tag", "latest", "--keep", "7", "--dry-run", env={**aws_env, "DOCKER_HOST": "unix:///nope"})
    assert result.returncode == 0, failed(result)
    requests = dry_run_requests(result.stdout)
    assert [(r["operation"], r["request"].get("repositoryName")) for r in requests] == [
        ("CreateRepository", f"{prefix}-train-cpu"), ("PutLifecyclePolicy", f"{prefix}-train-cpu"),
        ("CreateRepository", f"{prefix}-serve"), ("PutLifecyclePolicy", f"{prefix}-serve"),
        ("GetAuthorizationToken", None)]
    assert {r["request"].get("registryId") for r in requests[:-1]} == {ACCOUNT}
    assert requests[0]["request"]["imageScanningConfiguration"] == {"scanOnPush": True}
    assert json.loads(requests[1]["request"]["lifecyclePolicyText"]) == ecr.lifecycle_policy(7)
    host = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"  # the caller's account, read from STS (moto)
    commands = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert commands[0] == f"$ docker login --username AWS --password-stdin https://{host}"
    assert commands[1:] == [
        f"$ docker tag {prefix}-train-cpu:abc123 {host}/{prefix}-train-cpu:abc123",
        f"$ docker push {host}/{prefix}-train-cpu:abc123",
        f"$ docker tag {prefix}-train-cpu:abc123 {host}/{prefix}-train-cpu:latest",
        f"$ docker push {host}/{prefix}-train-cpu:latest",
        f"$ docker tag {prefix}-serve:abc123 {host}/{prefix}-serve:abc123",
        f"$ docker push {host}/{prefix}-serve:abc123",
        f"$ docker tag {prefix}-serve:abc123 {host}/{prefix}-serve:latest",
        f"$ docker push {host}/{prefix}-serve:latest"]
    names = [r["repositoryName"] for r in client("ecr", moto_server).describe_repositories()["repositories"]]
    assert not [n for n in names if n.startswith(prefix)], "a dry run created repositories"


def test_dry_run_works_without_aws_access():
    result = run_script("push_images.py", "serve", "--tag", "v1", "--region", "eu-west-1", "--dry-run",
                        env=offline_env())
    assert result.returncode == 0, failed(result)
    assert "$ docker push 000000000000.dkr.ecr.eu-west-1.amazonaws.com/imgclf-serve:v1" in result.stdout
    assert "dry run without AWS access" in result.stderr


def test_docker_not_running_is_said_clearly_before_anything_is_created(aws_env, moto_server, tmp_path):
    prefix = unique_prefix()
    env = {**aws_env, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = run_script("push_images.py", "serve", "--prefix", prefix, "--tag", "x", env=env)
    assert result.returncode == 2, failed(result)
    assert "Docker is not running" in result.stderr and "Traceback" not in result.stderr
    names = [r["repositoryName"] for r in client("ecr", moto_server).describe_repositories()["repositories"]]
    assert not [n for n in names if n.startswith(prefix)]
    missing = run_script("push_images.py", "serve", "--tag", "x", "--docker", str(tmp_path / "docker"), env=env)
    assert missing.returncode == 2 and "not found: install Docker" in missing.stderr, failed(missing)


def test_missing_credentials_and_unknown_region_are_said_clearly():
    no_credentials = run_script("push_images.py", "--tag", "x", "--region", "us-east-1", env=offline_env())
    assert no_credentials.returncode == 3 and "no AWS credentials" in no_credentials.stderr, failed(no_credentials)
    env = {**offline_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    bad_region = run_script("push_images.py", "--tag", "x", "--region", "mars-1", env=env)
    assert bad_region.returncode == 3 and "unknown region 'mars-1'" in bad_region.stderr, failed(bad_region)
    for result in (no_credentials, bad_region):
        assert "Traceback" not in result.stderr


def test_bad_arguments_are_refused():
    unknown = run_script("push_images.py", "serve", "gpu", "--tag", "x", "--dry-run", env=offline_env())
    assert unknown.returncode == 2 and "unknown image gpu" in unknown.stderr
    keep = run_script("push_images.py", "--tag", "x", "--keep", "0", "--dry-run", env=offline_env())
    assert keep.returncode == 2 and "keep at least 1" in keep.stderr
    with pytest.raises(ValueError):
        ecr.lifecycle_policy(0)


def test_another_account_gets_the_repositories_the_login_and_the_pushes(aws_env):
    other = "111122223333"
    result = run_script("push_images.py", "serve", "--prefix", unique_prefix(), "--tag", "abc", "--account", other,
                        "--dry-run", env=aws_env)
    assert result.returncode == 0, failed(result)
    requests = dry_run_requests(result.stdout)
    assert [r["request"]["registryId"] for r in requests[:-1]] == [other, other]  # create, lifecycle
    assert requests[-1] == {"service": "ecr", "operation": "GetAuthorizationToken",
                            "request": {"registryIds": [other]}}
    host = f"{other}.dkr.ecr.{REGION}.amazonaws.com"
    commands = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert commands[0] == f"$ docker login --username AWS --password-stdin https://{host}"
    assert all(host in c for c in commands)


# What `docker push` prints when its output is not a terminal (docker 24-27), and a tag that looks like a layer.
DOCKER_PUSH = """The push refers to repository [111122223333.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve]
5f70bf18a086: Preparing
a0b1c2d3e4f5: Preparing
0123456789ab: Preparing
a0b1c2d3e4f5: Waiting
5f70bf18a086: Layer already exists
0123456789ab: Pushing
0123456789ab: Pushed
a0b1c2d3e4f5: Mounted from imgclf-train-cpu
3f2a9c1b7d4e: digest: sha256:8c9f3b0e1d2a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c size: 1573
"""


def test_push_progress_counts_docker_layers():
    progress = push.PushProgress("imgclf-serve:abc")
    changed = [progress.feed(line) for line in DOCKER_PUSH.splitlines()]
    assert changed.count(True) == 7  # 3 Preparing, exists, Pushing, Pushed, Mounted (Waiting: still waiting)
    assert progress.summary(12) == ("pushing imgclf-serve:abc: 3/3 layers done (1 uploaded, 2 already in the "
                                    "registry), 0 uploading, 12 s")
    assert progress.digest == "sha256:8c9f3b0e1d2a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"


FAKE_DOCKER = """#!{python}
# A docker CLI for the test: the engine's answers, and for `push` the lines docker prints, slowly.
import sys, time
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
if args[0] == "info":
    print("24.0.7")
elif args[0] == "login":
    sys.stdin.read()
elif args[0] == "push":
    for line in {lines!r}:
        print(line, flush=True)
        time.sleep(0.3)
"""


def test_push_reports_progress_while_it_runs_and_logs_in_to_the_registry_pushed_to(aws_env, moto_server, tmp_path):
    import sys

    other, prefix = "111122223333", unique_prefix()
    docker, calls = tmp_path / "docker", tmp_path / "calls.txt"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, log=str(calls), lines=DOCKER_PUSH.splitlines()))
    docker.chmod(0o755)
    result = run_script("push_images.py", "serve", "--prefix", prefix, "--tag", "abc", "--account", other,
                        "--docker", str(docker), "--repository-tag", "project=dogs", env=aws_env)
    assert result.returncode == 0, failed(result)
    host = f"{other}.dkr.ecr.{REGION}.amazonaws.com"
    assert f"login --username AWS --password-stdin https://{host}" in calls.read_text()
    ecr_client = client("ecr", moto_server)
    [repo] = ecr_client.describe_repositories(registryId=other, repositoryNames=[f"{prefix}-serve"])["repositories"]
    assert repo["registryId"] == other
    assert {"Key": "project", "Value": "dogs"} in ecr_client.list_tags_for_resource(
        resourceArn=repo["repositoryArn"])["tags"]
    progress = [line for line in result.stderr.splitlines() if "layers done" in line]
    assert progress, result.stderr
    assert progress[-1].endswith("pushed as sha256:8c9f3b0e1d2a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c")
    assert "3/3 layers done (1 uploaded, 2 already in the registry)" in progress[-1]


# ---- Scan findings of the pushed images -------------------------------------------------------------------------

def set_scan_findings(endpoint: str, repository: str, digest: str, status: str, findings: dict | None = None,
                      registry: str = ACCOUNT) -> None:
    """What the moto server answers DescribeImageScanFindings for this image (moto's own API for it)."""
    import requests

    result = {"registryId": registry, "repositoryName": repository, "imageId": {"imageDigest": digest},
              "imageScanStatus": {"status": status, "description": f"the scan is {status}"}}
    if findings is not None:
        result["imageScanFindings"] = findings
    answer = requests.post(f"{endpoint}/moto-api/static/ecr/scan-finding-results",
                           json={"results": [result], "region": REGION, "account_id": registry}, timeout=30)
    assert answer.status_code == 201, answer.text


def basic_finding(severity: str, cve: str, package: str, version: str) -> dict:
    """A finding as basic scanning (scan on push) gives it."""
    return {"name": cve, "severity": severity, "uri": f"https://nvd.nist.gov/vuln/detail/{cve}",
            "attributes": [{"key": "package_name", "value": package}, {"key": "package_version", "value": version},
                           {"key": "CVSS3_SCORE", "value": "9.8"}]}


CRITICAL_SCAN = {"findingSeverityCounts": {"CRITICAL": 1, "HIGH": 1, "MEDIUM": 4},
                 "findings": [basic_finding("MEDIUM", "CVE-2024-0003", "zlib", "1:1.2.13"),
                              basic_finding("HIGH", "CVE-2024-0002", "libssl3", "3.0.11-1"),
                              basic_finding("CRITICAL", "CVE-2024-0001", "openssl", "3.0.11-1")]}


def pushed_image(moto_server: str, repository: str, layer: str) -> str:
    """An image in the moto server's ECR, scanned (moto does not scan on push): its digest."""
    digest = put_ecr_image(moto_server, repository, ["abc"], layer)
    client("ecr", moto_server).start_image_scan(repositoryName=repository, imageId={"imageDigest": digest})
    return digest


def fake_docker(tmp_path, digest: str | None):
    """A docker CLI whose push prints what docker prints, with the digest of the image in moto (None: as podman,
    which prints no digest)."""
    import sys

    lines = [line for line in DOCKER_PUSH.splitlines() if "digest:" not in line]
    if digest:
        lines.append(f"abc: digest: {digest} size: 1573")
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, log=str(tmp_path / "calls.txt"), lines=lines))
    docker.chmod(0o755)
    return docker


def test_push_prints_the_scan_findings_and_fails_on_critical_unless_allowed(aws_env, moto_server, tmp_path):
    prefix = unique_prefix()
    repository = f"{prefix}-serve"
    digest = pushed_image(moto_server, repository, layer=prefix)
    set_scan_findings(moto_server, repository, digest, "COMPLETE", CRITICAL_SCAN)
    docker = fake_docker(tmp_path, digest)
    args = ("push_images.py", "serve", "--prefix", prefix, "--tag", "abc", "--docker", str(docker),
            "--scan-timeout", "5")

    refused = run_script(*args, env=aws_env)
    assert refused.returncode == 1, failed(refused)
    lines = refused.stdout.splitlines()
    assert lines[0] == f"{repository}@{digest}: scan COMPLETE: 1 CRITICAL, 1 HIGH, 4 MEDIUM"
    assert lines[1] == ("  CRITICAL CVE-2024-0001  openssl 3.0.11-1  https://nvd.nist.gov/vuln/detail/CVE-2024-0001")
    assert lines[2].startswith("  HIGH     CVE-2024-0002  libssl3 3.0.11-1")
    assert "zlib" not in refused.stdout  # MEDIUM: counted, not listed
    assert f"CRITICAL scan findings in {repository}@{digest} (1)" in refused.stderr
    assert "--allow-critical" in refused.stderr and "Traceback" not in refused.stderr

    allowed = run_script(*args, "--allow-critical", env=aws_env)
    assert allowed.returncode == 0, failed(allowed)
    assert allowed.stdout.splitlines()[:2] == lines[:2]
    assert "accepted (--allow-critical)" in allowed.stderr


def test_push_without_a_scan_says_so_in_one_line_and_succeeds(aws_env, moto_server, tmp_path):
    """No scan (moto, like a repository whose scan on push is off, has none); the digest read back from ECR, as
    after a podman push, which prints none."""
    prefix = unique_prefix()
    repository = f"{prefix}-serve"
    digest = put_ecr_image(moto_server, repository, ["abc"], layer=prefix)
    result = run_script("push_images.py", "serve", "--prefix", prefix, "--tag", "abc", "--docker",
                        str(fake_docker(tmp_path, None)), "--scan-timeout", "1", env=aws_env)
    assert result.returncode == 0, failed(result)
    assert result.stdout.splitlines() == [
        f"{repository}@{digest}: scan findings not checked: NOT_FOUND: ECR has no scan of it (scan on push is off "
        "for the repository, or the registry's scanning filters leave it out)"]


@pytest.mark.parametrize("status", ["IN_PROGRESS", "FAILED", "UNSUPPORTED_IMAGE"])
def test_a_scan_that_is_running_failed_or_unsupported_is_one_line_and_no_failure(api, moto_server, status):
    import io
    import time

    repository = f"{unique_prefix()}-train-gpu"
    digest = pushed_image(moto_server, repository, layer=repository)
    set_scan_findings(moto_server, repository, digest, status, {"findingSeverityCounts": {"CRITICAL": 3}})
    out, started = io.StringIO(), time.monotonic()
    [report] = ecr.check_scan_findings(api, ACCOUNT, [(repository, "abc", digest)], timeout=1.0,
                                       allow_critical=False, out=out, poll=0.2)
    assert time.monotonic() - started < 10  # the wait is bounded
    assert not report.checked and report.critical == 0
    [line] = out.getvalue().splitlines()
    assert line.startswith(f"{repository}@{digest}: scan findings not checked: {status}: ")
    # the time waited, at least the 1 s timeout (more when the machine is busy: CI saw 2 s)
    expected = (r"still IN_PROGRESS after [1-9] s \(--scan-timeout\)" if status == "IN_PROGRESS"
                else f"the scan is {status}")
    assert re.search(expected, line), line


def test_enhanced_findings_and_moto_default_findings_are_read(api, moto_server):
    import io

    enhanced = {"findingSeverityCounts": {"CRITICAL": 1, "LOW": 2}, "enhancedFindings": [
        {"severity": "CRITICAL", "title": "CVE-2023-44487 - netty-codec-http2", "packageVulnerabilityDetails": {
            "vulnerabilityId": "CVE-2023-44487", "sourceUrl": "https://nvd.nist.gov/vuln/detail/CVE-2023-44487",
            "vulnerablePackages": [{"name": "io.netty:netty-codec-http2", "version": "4.1.91.Final"}]}}]}
    first, second = (f"{unique_prefix()}-serve", f"{unique_prefix()}-train-cpu")
    digest = pushed_image(moto_server, first, layer=first)
    set_scan_findings(moto_server, first, digest, "ACTIVE", enhanced)
    pushed_image(moto_server, second, layer=second)  # no custom result: moto's default, one HIGH finding
    out = io.StringIO()
    with pytest.raises(ecr.CriticalFindings, match=f"{first}@{digest} \\(1\\)"):
        ecr.check_scan_findings(api, ACCOUNT, [(first, "abc", digest), (second, "abc", None)], timeout=5,
                                allow_critical=False, out=out)
    lines = out.getvalue().splitlines()
    assert lines[:2] == [f"{first}@{digest}: scan ACTIVE: 1 CRITICAL, 2 LOW",
                         "  CRITICAL CVE-2023-44487  io.netty:netty-codec-http2 4.1.91.Final  "
                         "https://nvd.nist.gov/vuln/detail/CVE-2023-44487"]
    assert lines[2].startswith(f"{second}@sha256:") and lines[2].endswith(": scan COMPLETE: 1 HIGH")
    assert lines[3].startswith("  HIGH     CVE-9999-9999  moto_fake 9.9.9")


def test_scan_findings_are_read_page_by_page():
    """All pages of findings are read (maxResults 1000); the severity counts come from the first page."""
    pages = {None: {"imageScanStatus": {"status": "COMPLETE"}, "nextToken": "2", "imageScanFindings": {
                 "findingSeverityCounts": {"HIGH": 2}, "findings": [basic_finding("HIGH", "CVE-1", "a", "1")]}},
             "2": {"imageScanStatus": {"status": "COMPLETE"}, "imageScanFindings": {
                 "findings": [basic_finding("HIGH", "CVE-2", "b", "2")]}}}

    class Pages:
        def call(self, service, operation, params, mutates=True):
            assert (service, operation, mutates, params["maxResults"]) == ("ecr", "DescribeImageScanFindings",
                                                                          False, 1000)
            return pages[params.get("nextToken")]

    report = ecr.read_scan(Pages(), ACCOUNT, "imgclf-serve", "sha256:" + "0" * 64, deadline=0)
    assert [f.name for f in report.findings] == ["CVE-1", "CVE-2"] and report.counts == {"HIGH": 2}
