"""Push the images `make build` made to Amazon ECR (what `make push` runs).

    python scripts/push_images.py [train-cpu train-gpu serve] --tag TAG [--tag latest] [--keep 20]
                                  [--region R] [--profile P] [--account ID] [--dry-run]
                                  [--scan-timeout 300] [--allow-critical]

For each image: make sure the ECR repository <prefix>-<image> exists with scan on push on and a lifecycle
policy that keeps the last --keep images; then log Docker in with an ECR authorization token, and tag and
push the local image <prefix>-<image>:<first tag> as every --tag. Then wait for ECR's scan of each pushed
digest (at most --scan-timeout seconds in all) and print its findings: counts per severity, and each CRITICAL
and HIGH finding with its package. Exit 1 when a pushed image has a CRITICAL finding, unless --allow-critical
(the images are pushed either way); no scan, a failed or unsupported scan, or one still running at the
timeout is said in one line and is not a failure. --dry-run prints each AWS request (as validated JSON) and
each docker command, and runs none of them.
"""

from __future__ import annotations

import argparse
import logging
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
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


class PushProgress:
    """Layer counts from the lines `docker push` (or `podman push`) prints, so a multi-GB push shows it moves.

    docker:  `5f70bf18a086: Preparing` / `Waiting` / `Pushing` / `Pushed` / `Layer already exists` /
             `Mounted from imgclf-train-gpu`, and at the end `<tag>: digest: sha256:... size: 1234`
    podman:  `Copying blob sha256:5f70...`, `Copying blob 5f70... done`, `Copying blob 5f70... skipped: already exists`
    """

    DOCKER = re.compile(r"^(?P<layer>[0-9a-f]{12}): (?P<status>.+?)\s*$")
    PODMAN = re.compile(r"^Copying blob (?:sha256:)?(?P<layer>[0-9a-f]{12})[0-9a-f]*\s*(?P<status>.*?)\s*\|?\s*$")
    DIGEST = re.compile(r"digest: (?P<digest>sha256:[0-9a-f]{64})")
    DONE = ("Pushed", "done")
    THERE = ("Layer already exists", "Mounted from", "skipped")

    def __init__(self, image: str):
        self.image, self.layers, self.digest = image, {}, None

    def feed(self, line: str) -> bool:
        """Take one output line; True when a layer changed state."""
        if match := self.DIGEST.search(line):  # `<tag>: digest: ...`: a 12-hex tag (git sha) is no layer
            self.digest = match["digest"]
            return False
        match = self.DOCKER.match(line) or self.PODMAN.match(line)
        if not match:
            return False
        status = match["status"]
        state = ("pushed" if status.startswith(self.DONE) else "there" if status.startswith(self.THERE)
                 else "busy" if status.startswith(("Pushing", "Retrying")) or not status else "waiting")
        changed = self.layers.get(match["layer"]) != state
        self.layers[match["layer"]] = state
        return changed

    def summary(self, seconds: float) -> str:
        counts = {s: sum(1 for v in self.layers.values() if v == s) for s in ("pushed", "there", "busy")}
        return (f"pushing {self.image}: {counts['pushed'] + counts['there']}/{len(self.layers)} layers done "
                f"({counts['pushed']} uploaded, {counts['there']} already in the registry), {counts['busy']} "
                f"uploading, {seconds:.0f} s")


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

    def push(self, image: str, report_every: float = 30.0) -> str | None:
        """`docker push`, its output read as it comes: a line per layer state change (at most every few seconds)
        and one every `report_every` seconds while nothing changes, so a long upload does not look hung.
        Returns the pushed digest when the engine prints it (docker does, podman does not)."""
        if self.dry_run:
            self.run("push", image)
            return None
        log.info("%s", shlex.join([self.exe, "push", image]))
        proc = subprocess.Popen([self.exe, "push", image], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:  # a thread, so that the loop below can report while no line arrives
            for text in proc.stdout:
                lines.put(text)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        progress, tail = PushProgress(image), []
        started = reported = time.monotonic()
        while True:
            try:
                line = lines.get(timeout=report_every)
            except queue.Empty:
                line = ""
            if line is None:
                break
            tail = (tail + [line.rstrip()])[-5:] if line.strip() else tail
            changed = progress.feed(line)
            now = time.monotonic()
            if (changed and now - reported >= 5) or now - reported >= report_every:
                log.info("%s", progress.summary(now - started))
                reported = now
        if proc.wait() != 0:
            detail = [t for t in tail if t.strip()]
            raise AwsError(f"`{self.exe} push {image}` failed (exit {proc.returncode}): "
                           f"{detail[-1] if detail else 'no output'}")
        log.info("%s; pushed%s", progress.summary(time.monotonic() - started),
                 f" as {progress.digest}" if progress.digest else "")
        return progress.digest

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


def ensure_repository(api: Api, name: str, keep: int, account: str,
                      tags: list[dict[str, str]] | None = None) -> None:
    """Create the repository in `account`'s registry, or switch scan on push back on if it exists; then set the
    lifecycle policy."""
    try:
        api.call("ecr", "CreateRepository", ecr.create_repository(name, account, tags))
        if not api.dry_run:
            log.info("created repository %s in registry %s", name, account)
    except AwsError as e:
        if e.code != "RepositoryAlreadyExistsException":
            raise
        api.call("ecr", "PutImageScanningConfiguration", ecr.put_image_scanning_configuration(name, account))
        log.info("repository %s exists; scan on push is on", name)
    api.call("ecr", "PutLifecyclePolicy", ecr.put_lifecycle_policy(name, keep, account))


def login(api: Api, docker: Docker, host: str, account: str) -> None:
    """Docker login to the registry pushed to (`host`), with a 12-hour ECR token for it. The token's proxyEndpoint
    is the caller's own registry, which is not the one pushed to when --account names another account."""
    answer = api.call("ecr", "GetAuthorizationToken", {"registryIds": [account]})
    if api.dry_run:
        docker.run("login", "--username", "AWS", "--password-stdin", f"https://{host}")
        return
    user, password, _ = ecr.docker_credentials(answer["authorizationData"][0])
    docker.run("login", "--username", user, "--password-stdin", f"https://{host}", stdin=password, timeout=120)


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--repository-tag", action="append", type=scripting.key_value, default=[],
                        metavar="KEY=VALUE", help="tag the repositories it creates (repeat; AWS resource tags)")
    parser.add_argument("--scan-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="wait at most this long in all for ECR's scans of the pushed images (default: 300)")
    parser.add_argument("--allow-critical", action="store_true",
                        help="exit 0 even when a pushed image has CRITICAL scan findings (they are still printed)")
    scripting.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = scripting.parse_args(parser, argv)
    if args.keep < 1:
        parser.error(f"--keep {args.keep}: keep at least 1 image")
    if args.scan_timeout < 0:
        parser.error(f"--scan-timeout {args.scan_timeout:g}: give 0 or more seconds")
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
    tags = [{"Key": k, "Value": v} for k, v in args.repository_tag]  # ECR spells them Key/Value too
    for image in images:
        ensure_repository(api, ecr.repository_name(args.prefix, image), args.keep, account, tags)
    login(api, docker, host, account)
    pushed = []  # (repository, first tag, digest or None): every tag of an image is the same digest
    for image in images:
        name = ecr.repository_name(args.prefix, image)
        digest = None
        for tag in args.tag:
            docker.run("tag", f"{name}:{args.tag[0]}", f"{host}/{name}:{tag}")
            digest = docker.push(f"{host}/{name}:{tag}") or digest
        pushed.append((name, args.tag[0], digest))
    if args.dry_run:
        log.info("dry run: nothing pushed, so no scan findings to read")
        return 0
    ecr.check_scan_findings(api, account, pushed, timeout=args.scan_timeout, allow_critical=args.allow_critical)
    return 0


if __name__ == "__main__":
    scripting.run(main)
