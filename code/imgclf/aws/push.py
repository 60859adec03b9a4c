"""`make push` (scripts/push_images.py): the images `make build` made go to Amazon ECR.

The docker (or podman) command tags and pushes them, its output read as it comes (PushProgress); the ECR calls
make sure each repository exists with scan on push and a lifecycle policy, log docker in with an ECR token, and
read the pushed images' scan findings (their request builders and the findings' reading are imgclf.aws.ecr's).
"""

from __future__ import annotations

import logging
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from imgclf.aws import ecr, scripting
from imgclf.aws.images import REPOSITORIES
from imgclf.aws.scripting import Access
from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_OK

log = logging.getLogger("imgclf.aws")
IMAGES = tuple(REPOSITORIES)  # train-cpu, train-gpu, serve, serve-gpu


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
        self.image = image
        self.layers: dict[str, str] = {}  # layer id -> pushed, there, busy or waiting
        self.digest: str | None = None

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
            assert proc.stdout is not None  # stdout=PIPE
            for text in proc.stdout:
                lines.put(text)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        progress = PushProgress(image)
        tail: list[str] = []
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


def push_images(access: Access, *, images: Sequence[str], tags: Sequence[str], prefix: str, keep: int,
                account: str | None, docker: str, scan_timeout: float, repository_tags: Sequence[tuple[str, str]] = (),
                allow_critical: bool = False) -> int:
    """Push the local images <prefix>-<image>:<tags[0]> to ECR as every tag in `tags`, then print their scan
    findings (raising CriticalFindings for a CRITICAL one unless allow_critical)."""
    api = scripting.make_api(access)  # missing credentials or an unknown region stop here, before anything runs
    engine = Docker(docker, api.dry_run)
    engine.check_running()
    for image in images:
        engine.check_image(f"{ecr.repository_name(prefix, image)}:{tags[0]}")

    account = account or scripting.account_of(api)
    host = ecr.registry(account, scripting.region_of(api))
    for image in images:
        ensure_repository(api, ecr.repository_name(prefix, image), keep, account,
                          scripting.tags_from(repository_tags))  # ECR spells them Key/Value too
    login(api, engine, host, account)
    pushed = []  # (repository, first tag, digest or None): every tag of an image is the same digest
    for image in images:
        name = ecr.repository_name(prefix, image)
        digest = None
        for tag in tags:
            engine.run("tag", f"{name}:{tags[0]}", f"{host}/{name}:{tag}")
            digest = engine.push(f"{host}/{name}:{tag}") or digest
        pushed.append((name, tags[0], digest))
    if api.dry_run:
        log.info("dry run: nothing pushed, so no scan findings to read")
        return EXIT_OK
    ecr.check_scan_findings(api, account, pushed, timeout=scan_timeout, allow_critical=allow_critical)
    return EXIT_OK
