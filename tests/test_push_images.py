"""scripts/push_images.py against a moto server: repositories, scan and lifecycle settings, token, dry run, errors."""

from __future__ import annotations

import importlib.util
import json
import uuid

import boto3
import pytest
from imgclf.aws import ecr
from imgclf.aws.images import REPOSITORIES
from imgclf.aws.session import Api

from tests.aws_helpers import ACCOUNT, REGION, SCRIPTS, client, dry_run_requests, failed, offline_env, run_script

spec = importlib.util.spec_from_file_location("push_images", SCRIPTS / "push_images.py")
push_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(push_images)


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
    push_images.ensure_repository(api, name, keep=5, account=ACCOUNT)
    repo = ecr_client.describe_repositories(repositoryNames=[name])["repositories"][0]
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repo["encryptionConfiguration"]["encryptionType"] == "AES256"
    policy = json.loads(ecr_client.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
    assert policy["rules"][0]["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan",
                                               "countNumber": 5}
    assert policy["rules"][0]["action"] == {"type": "expire"}

    # Again on an existing repository whose scanning someone turned off: on again, new policy, no error.
    ecr_client.put_image_scanning_configuration(repositoryName=name, imageScanningConfiguration={"scanOnPush": False})
    push_images.ensure_repository(api, name, keep=3, account=ACCOUNT)
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
    progress = push_images.PushProgress("imgclf-serve:abc")
    changed = [progress.feed(line) for line in DOCKER_PUSH.splitlines()]
    assert changed.count(True) == 7  # 3 Preparing, exists, Pushing, Pushed, Mounted (Waiting: still waiting)
    assert progress.summary(12) == ("pushing imgclf-serve:abc: 3/3 layers done (1 uploaded, 2 already in the "
                                    "registry), 0 uploading, 12 s")
    assert progress.digest == "sha256:8c9f3b0e1d2a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"


def test_push_progress_reads_a_real_podman_push(tmp_path):
    """A real engine push (podman, to a directory: no registry can run here) through the same parser."""
    import shutil
    import subprocess
    import tarfile

    if not shutil.which("podman"):
        pytest.skip("no podman")
    (tmp_path / "f.txt").write_text("hi")
    with tarfile.open(tmp_path / "layer.tar", "w") as tar:
        tar.add(tmp_path / "f.txt", arcname="f.txt")
    image = f"localhost/{unique_prefix()}:1"
    imported = subprocess.run(["podman", "import", str(tmp_path / "layer.tar"), image], capture_output=True,
                              text=True, timeout=120)
    if imported.returncode != 0:
        pytest.skip(f"podman cannot import here: {imported.stderr[-300:]}")
    try:
        pushed = subprocess.run(["podman", "push", image, f"dir:{tmp_path / 'out'}"], capture_output=True, text=True,
                                timeout=120)
    finally:
        subprocess.run(["podman", "rmi", image], capture_output=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    progress = push_images.PushProgress(image)
    assert any([progress.feed(line) for line in (pushed.stdout + pushed.stderr).splitlines()])
    assert len(progress.layers) == 1  # one blob: the imported layer (the config is no layer)


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
