"""ECR for `make push` (scripts/push_images.py): request builders (plain dicts, validated by botocore when sent),
and the reading of the pushed images' scan findings."""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from imgclf.exit_codes import JobFailed

log = logging.getLogger("imgclf.aws")

# Repository names are <prefix>-<image>; with the default prefix they are imgclf.aws.images.REPOSITORIES.
DEFAULT_PREFIX = "imgclf"
DEFAULT_KEEP = 20


def repository_name(prefix: str, image: str) -> str:
    return f"{prefix}-{image}"


def registry(account: str, region: str) -> str:
    """The registry host of an account in a region (China regions live under amazonaws.com.cn)."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}"


# <account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:<tag>|@<digest>]
IMAGE_URI = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                       r"(?P<repository>[a-z0-9._/-]+?)(?::(?P<tag>[\w.-]+)|@(?P<digest>sha256:[0-9a-f]{64}))?")


def create_repository(name: str, account: str, tags: list[dict[str, str]] | None = None) -> dict:
    """Scan on push (basic scanning: known CVEs in OS packages), encrypted at rest, tags may move (`latest`).
    registryId: the registry of `account` (default would be the caller's, whatever --account says)."""
    request: dict[str, object] = {"registryId": account, "repositoryName": name,
                                  "imageScanningConfiguration": {"scanOnPush": True},
               "imageTagMutability": "MUTABLE", "encryptionConfiguration": {"encryptionType": "AES256"}}
    if tags:
        request["tags"] = tags
    return request


def put_image_scanning_configuration(name: str, account: str) -> dict:
    """For a repository that already exists: turn scan on push on (again)."""
    return {"registryId": account, "repositoryName": name, "imageScanningConfiguration": {"scanOnPush": True}}


def describe_image_request(uri: str) -> dict | None:
    """DescribeImages for the tag of an ECR image URI; None when the URI is not a tagged ECR image."""
    match = IMAGE_URI.fullmatch(uri)
    if not match or not match["tag"]:
        return None
    return {"registryId": match["account"], "repositoryName": match["repository"],
            "imageIds": [{"imageTag": match["tag"]}]}


def digest_uri(uri: str, digest: str) -> str:
    """The tagged URI with its tag replaced by the digest: <registry>/<repository>@sha256:..."""
    return uri.rsplit(":", 1)[0] + "@" + digest


def lifecycle_policy(keep: int) -> dict:
    """Expire all but the `keep` most recently pushed images, tagged or not."""
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 image")
    return {"rules": [{
        "rulePriority": 1,
        "description": f"keep the last {keep} images",
        "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
        "action": {"type": "expire"},
    }]}


def put_lifecycle_policy(name: str, keep: int, account: str) -> dict:
    return {"registryId": account, "repositoryName": name,
            "lifecyclePolicyText": json.dumps(lifecycle_policy(keep), sort_keys=True)}


def docker_credentials(authorization_data: dict) -> tuple[str, str, str]:
    """(username, password, registry URL) from one GetAuthorizationToken authorizationData entry."""
    user, sep, password = base64.b64decode(authorization_data["authorizationToken"]).decode().partition(":")
    if not sep:
        raise ValueError("ECR authorization token is not base64 'user:password'")
    return user, password, authorization_data["proxyEndpoint"]


# ---- Scan findings of the pushed images ------------------------------------------------------------------------
# Basic scanning (scan on push) answers DescribeImageScanFindings with `findings` (package_name / package_version
# in `attributes`); enhanced scanning (Amazon Inspector) with `enhancedFindings` (packageVulnerabilityDetails).

SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "INFORMATIONAL", "UNDEFINED", "UNTRIAGED")
LISTED_SEVERITIES = ("CRITICAL", "HIGH")  # each finding of these is printed with its package
MAX_LISTED = 50  # per image; the counts still cover all
SCAN_DONE = ("COMPLETE", "ACTIVE")  # ACTIVE: enhanced scanning, findings available and kept current
SCAN_RUNNING = ("IN_PROGRESS", "PENDING")
SCAN_POLL_SECONDS = 10.0
# A scan on push is registered a moment after the push ends: ScanNotFoundException for this long means "no scan".
SCAN_NOT_FOUND_GRACE = 60.0


class CriticalFindings(JobFailed):
    """A pushed image has CRITICAL scan findings and --allow-critical was not given (exit 1)."""


@dataclass(frozen=True)
class Finding:
    severity: str
    name: str  # the vulnerability, e.g. CVE-2023-44487
    package: str | None = None
    version: str | None = None
    uri: str | None = None

    def line(self) -> str:
        package = " ".join(p for p in (self.package, self.version) if p) or "(package not named)"
        return f"  {self.severity:<8} {self.name}  {package}" + (f"  {self.uri}" if self.uri else "")


@dataclass
class ScanReport:
    """What ECR says about one pushed image; `checked` only when the scan completed."""

    image: str  # <repository>@<digest>, or <repository>:<tag> when the digest is unknown
    status: str  # ECR's imageScanStatus.status (COMPLETE, FAILED, UNSUPPORTED_IMAGE, ...), or NOT_FOUND / ERROR
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        return self.status in SCAN_DONE

    @property
    def critical(self) -> int:
        return self.counts.get("CRITICAL", 0) if self.checked else 0

    def lines(self) -> list[str]:
        if not self.checked:  # no scan, scan failed, unsupported, still running: one line, not a failure
            return [f"{self.image}: scan findings not checked: {self.status}" + (f": {self.detail}" if self.detail
                                                                              else "")]
        order = {s: i for i, s in enumerate(SEVERITIES)}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items(), key=lambda c: order.get(c[0], 99))
                           if n)
        lines = [f"{self.image}: scan {self.status}: {counts or 'no findings'}"]
        listed = sorted((f for f in self.findings if f.severity in LISTED_SEVERITIES),
                        key=lambda f: (order[f.severity], f.name, f.package or ""))
        lines += [f.line() for f in listed[:MAX_LISTED]]
        if len(listed) > MAX_LISTED:
            lines.append(f"  ... and {len(listed) - MAX_LISTED} more CRITICAL/HIGH: aws ecr "
                         "describe-image-scan-findings lists them all")
        return lines


def describe_image_scan_findings_request(account: str, repository: str, digest: str,
                                         next_token: str | None = None) -> dict:
    request = {"registryId": account, "repositoryName": repository, "imageId": {"imageDigest": digest},
               "maxResults": 1000}
    if next_token:
        request["nextToken"] = next_token
    return request


def findings_of(scan_findings: dict) -> list[Finding]:
    """The findings of one DescribeImageScanFindings page (its `imageScanFindings`), basic and enhanced."""
    found = []
    for f in scan_findings.get("findings", []):
        attributes = {a.get("key"): a.get("value") for a in f.get("attributes", [])}
        found.append(Finding(f.get("severity", "UNDEFINED"), f.get("name", "?"), attributes.get("package_name"),
                             attributes.get("package_version"), f.get("uri")))
    for f in scan_findings.get("enhancedFindings", []):
        details = f.get("packageVulnerabilityDetails", {})
        name = details.get("vulnerabilityId") or f.get("title") or f.get("findingArn", "?")
        packages = details.get("vulnerablePackages") or [{}]
        found += [Finding(f.get("severity", "UNDEFINED"), name, p.get("name"), p.get("version"),
                          details.get("sourceUrl")) for p in packages]
    return found


def pushed_digest(api, account: str, repository: str, tag: str) -> str:
    """The digest ECR holds for repository:tag (podman's push prints none)."""
    answer = api.call("ecr", "DescribeImages", {"registryId": account, "repositoryName": repository,
                                                "imageIds": [{"imageTag": tag}]}, mutates=False)
    return answer["imageDetails"][0]["imageDigest"]


def read_scan(api, account: str, repository: str, digest: str, deadline: float, poll: float = SCAN_POLL_SECONDS,
              not_found_grace: float = SCAN_NOT_FOUND_GRACE, sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> ScanReport:
    """Wait (until `deadline`, a `clock` time) for the image's scan to end, then read all its findings."""
    from imgclf.aws.session import AwsError  # lazy: this module stays importable without boto3

    image, started = f"{repository}@{digest}", clock()
    while True:
        try:
            answer = api.call("ecr", "DescribeImageScanFindings",
                              describe_image_scan_findings_request(account, repository, digest), mutates=False)
        except AwsError as e:
            if e.code != "ScanNotFoundException":
                return ScanReport(image, "ERROR", str(e))
            if clock() >= min(deadline, started + not_found_grace):
                return ScanReport(image, "NOT_FOUND", "ECR has no scan of it (scan on push is off for the "
                                  "repository, or the registry's scanning filters leave it out)")
            sleep(max(0.0, min(poll, deadline - clock())))
            continue
        status = answer.get("imageScanStatus", {}).get("status", "UNKNOWN")
        description = answer.get("imageScanStatus", {}).get("description", "")
        if status in SCAN_RUNNING:
            if clock() >= deadline:
                return ScanReport(image, status, f"still {status} after {clock() - started:.0f} s (--scan-timeout); "
                                  "aws ecr describe-image-scan-findings shows it later")
            log.info("scan of %s: %s", image, status)
            sleep(max(0.0, min(poll, deadline - clock())))
            continue
        if status not in SCAN_DONE:  # FAILED, UNSUPPORTED_IMAGE, SCAN_ELIGIBILITY_EXPIRED, FINDINGS_UNAVAILABLE, ...
            return ScanReport(image, status, description)
        pages = answer.get("imageScanFindings", {})
        counts, findings = dict(pages.get("findingSeverityCounts", {})), findings_of(pages)
        while answer.get("nextToken"):
            answer = api.call("ecr", "DescribeImageScanFindings", describe_image_scan_findings_request(
                account, repository, digest, answer["nextToken"]), mutates=False)
            findings += findings_of(answer.get("imageScanFindings", {}))
        return ScanReport(image, status, description, counts, findings)


def check_scan_findings(api, account: str, pushed: list[tuple[str, str, str | None]], timeout: float,
                        allow_critical: bool, out: TextIO | None = None, **wait) -> list[ScanReport]:
    """Print the scan findings of each pushed (repository, tag, digest or None) image, waiting at most `timeout`
    seconds in all; raise CriticalFindings if any has a CRITICAL finding, unless `allow_critical`."""
    from imgclf.aws.session import AwsError

    out = out or sys.stdout
    clock = wait.get("clock", time.monotonic)
    deadline, reports = clock() + timeout, []
    for repository, tag, digest in pushed:
        if digest is None:
            try:
                digest = pushed_digest(api, account, repository, tag)
            except (AwsError, LookupError) as e:
                reports.append(ScanReport(f"{repository}:{tag}", "ERROR", f"no digest for the pushed tag: {e}"))
                print(*reports[-1].lines(), sep="\n", file=out, flush=True)
                continue
        reports.append(read_scan(api, account, repository, digest, deadline, **wait))
        print(*reports[-1].lines(), sep="\n", file=out, flush=True)
    critical = [r for r in reports if r.critical]
    if critical:
        which = ", ".join(f"{r.image} ({r.critical})" for r in critical)
        if not allow_critical:
            raise CriticalFindings(f"CRITICAL scan findings in {which}: the images are pushed, but update the "
                                   "packages named above and rebuild, or pass --allow-critical to accept them")
        log.warning("CRITICAL scan findings in %s, accepted (--allow-critical)", which)
    return reports
