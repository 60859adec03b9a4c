"""Push the images `make build` made to Amazon ECR (what `make push` runs).

    python scripts/push_images.py [train-cpu train-gpu serve] --tag TAG [--tag latest] [--keep 20]
                                  [--region R] [--profile P] [--account ID] [--dry-run]

For each image: make sure the ECR repository <prefix>-<image> exists with scan on push on and a lifecycle
policy that keeps the last --keep images; then log Docker in with an ECR authorization token, and tag and
push the local image <prefix>-<image>:<first tag> as every --tag. --dry-run prints each AWS request (as
validated JSON) and each docker command, and runs none of them.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))  # runs from a checkout without install too

from imgclf.aws import ecr, scripting  # noqa: E402
from imgclf.aws.images import REPOSITORIES  # noqa: E402
from imgclf.aws.session import Api, AwsError  # noqa: E402
from imgclf.errors import UserError  # noqa: E402

log = logging.getLogger("push_images")
IMAGES = tuple(REPOSITORIES)  # train-cpu, train-gpu, serve


class DockerUnavailable(UserError):
    """No docker command, or no engine answering it."""


class Docker:
    """Runs docker commands, or in a dry run prints them (secrets go through stdin, never the command line)."""

    def __init__(self, exe: str, dry_run: bool, out=None):
        self.exe, self.dry_run, self.out = exe, dry_run, out or sys.stdout

    def run(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> None:
        cmd = [self.exe, *args]
        if self.dry_run:
            print("$ " + shlex.join(cmd), file=self.out, flush=True)
            return
        log.info("%s", shlex.join(cmd))
        result = subprocess.run(cmd, input=stdin, text=True, capture_output=True, timeout=timeout)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise AwsError(f"`{shlex.join(cmd[:3])} ...` failed (exit {result.returncode}): "
                           f"{detail[-1] if detail else 'no output'}")

    def check_running(self) -> None:
        """`docker info` answers only when the engine runs; the client alone is not enough."""
        if self.dry_run:
            return
        try:
            result = subprocess.run([self.exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                    text=True, timeout=60)
        except FileNotFoundError:
            raise DockerUnavailable(f"docker command {self.exe!r} not found: install Docker "
                                    "(https://docs.docker.com/engine/install/) or pass --docker PATH") from None
        except subprocess.TimeoutExpired:
            raise DockerUnavailable("`docker info` did not answer in 60 s: the Docker engine hangs; restart it") \
                from None
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise DockerUnavailable(f"Docker is not running ({lines[-1] if lines else 'docker info failed'}): "
                                    "start Docker Desktop or `sudo systemctl start docker`, then run again")

    def check_image(self, image: str) -> None:
        if self.dry_run:
            return
        result = subprocess.run([self.exe, "image", "inspect", image], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise UserError(f"no local image {image}: build it first (make build, or make build-<image>)")


def ensure_repository(api: Api, name: str, keep: int) -> None:
    """Create the repository, or switch scan on push back on if it exists; then set the lifecycle policy."""
    try:
        api.call("ecr", "CreateRepository", ecr.create_repository(name))
        if not api.dry_run:
            log.info("created repository %s", name)
    except AwsError as e:
        if e.code != "RepositoryAlreadyExistsException":
            raise
        api.call("ecr", "PutImageScanningConfiguration", ecr.put_image_scanning_configuration(name))
        log.info("repository %s exists; scan on push is on", name)
    api.call("ecr", "PutLifecyclePolicy", ecr.put_lifecycle_policy(name, keep))


def login(api: Api, docker: Docker) -> None:
    """Docker login with a 12-hour ECR token. In a dry run the request is printed and no token exists."""
    answer = api.call("ecr", "GetAuthorizationToken", {})
    if api.dry_run:
        docker.run("login", "--username", "AWS", "--password-stdin", "https://<registry from the token>")
        return
    user, password, endpoint = ecr.docker_credentials(answer["authorizationData"][0])
    docker.run("login", "--username", user, "--password-stdin", endpoint, stdin=password, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="push_images.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=f"which images (default: all: {' '.join(IMAGES)})")
    parser.add_argument("--tag", action="append", required=True,
                        help="tag to push (repeat); the local image <prefix>-<image>:<first tag> is pushed")
    parser.add_argument("--prefix", default=ecr.DEFAULT_PREFIX,
                        help=f"image and repository names are <prefix>-<image> (default: {ecr.DEFAULT_PREFIX})")
    parser.add_argument("--keep", type=int, default=ecr.DEFAULT_KEEP,
                        help=f"the lifecycle policy keeps this many latest images (default: {ecr.DEFAULT_KEEP})")
    parser.add_argument("--account", help="AWS account ID of the registry (default: the caller's, from STS)")
    parser.add_argument("--docker", default="docker", help="the docker command (default: docker)")
    scripting.add_common_args(parser)
    args = scripting.parse_args(parser, argv)
    if args.keep < 1:
        parser.error(f"--keep {args.keep}: keep at least 1 image")
    unknown = [i for i in args.images if i not in IMAGES]
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}: choose from {' '.join(IMAGES)}")
    images = list(dict.fromkeys(args.images or IMAGES))

    api = scripting.make_api(args)  # missing credentials or an unknown region stop here, before anything runs
    docker = Docker(args.docker, args.dry_run)
    docker.check_running()
    for image in images:
        docker.check_image(f"{ecr.repository_name(args.prefix, image)}:{args.tag[0]}")

    account = args.account or scripting.account_of(api)
    host = ecr.registry(account, scripting.region_of(api, args))
    for image in images:
        ensure_repository(api, ecr.repository_name(args.prefix, image), args.keep)
    login(api, docker)
    for image in images:
        name = ecr.repository_name(args.prefix, image)
        for tag in args.tag:
            docker.run("tag", f"{name}:{args.tag[0]}", f"{host}/{name}:{tag}")
            docker.run("push", f"{host}/{name}:{tag}")
            if not args.dry_run:
                log.info("pushed %s/%s:%s", host, name, tag)
    return 0


if __name__ == "__main__":
    scripting.run(main)
