"""Sync a local folder to S3: upload what is missing or different, skip objects with the same size and MD5.

S3's ETag is the MD5 of the object for single-part uploads without KMS encryption; every object we upload
also carries its MD5 in x-amz-meta-md5, which HeadObject reads when the ETag is not an MD5 (multipart, SSE-KMS).
Each file goes up with one PutObject (images are far below its 5 GB limit) with Content-MD5, so S3 rejects a
corrupted transfer.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError

log = logging.getLogger(__name__)

_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


@dataclass(frozen=True)
class LocalFile:
    path: Path
    key: str
    size: int


@dataclass
class SyncSummary:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0

    def line(self, destination: str) -> str:
        return (f"{len(self.uploaded)} file(s) uploaded ({self.uploaded_bytes / 1e6:.1f} MB), "
                f"{len(self.skipped)} unchanged file(s) skipped, destination {destination}")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/") ; the prefix is "" or ends with one slash."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri)
    if not m:
        raise UserError(f"{uri!r} is not an S3 URI: expected s3://<bucket>/<prefix> (bucket names are lowercase)")
    prefix = (m.group(2) or "").strip("/")
    return m.group(1), f"{prefix}/" if prefix else ""


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_files(root: Path, paths: Iterable[Path], prefix: str) -> list[LocalFile]:
    """Files under root -> their keys under prefix (POSIX separators, sorted)."""
    files = [LocalFile(p, prefix + p.relative_to(root).as_posix(), p.stat().st_size) for p in paths]
    return sorted(files, key=lambda f: f.key)


def list_objects_request(bucket: str, prefix: str, token: str | None = None) -> dict:
    request = {"Bucket": bucket, "Prefix": prefix}
    if token:
        request["ContinuationToken"] = token
    return request


def remote_objects(api: Api, bucket: str, prefix: str) -> dict[str, dict]:
    """key -> {"Size", "ETag"} of every object under the prefix (empty in an offline dry run)."""
    if api.session is None:
        return {}
    found: dict[str, dict] = {}
    token = None
    while True:
        page = api.call("s3", "ListObjectsV2", list_objects_request(bucket, prefix, token), mutates=False)
        for obj in page.get("Contents", []):
            found[obj["Key"]] = {"Size": obj["Size"], "ETag": obj.get("ETag", "")}
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return found


def check_bucket(api: Api, bucket: str) -> None:
    """Fail early, before a long validation, when the bucket is missing or not ours."""
    if api.session is None:
        return
    try:
        api.call("s3", "HeadBucket", {"Bucket": bucket}, mutates=False)
    except AwsError as e:
        if e.code in ("404", "NoSuchBucket"):
            raise AwsError(f"bucket {bucket} does not exist: create it (`aws s3 mb s3://{bucket}`) in the region "
                           "of your SageMaker jobs, or fix the URI", code=e.code) from None
        if e.code in ("403", "AccessDenied"):
            raise AwsError(f"no access to bucket {bucket}: it belongs to another account, or your identity lacks "
                           "s3:ListBucket on it (see Permissions in README.md)", code=e.code) from None
        raise


def put_object_request(bucket: str, key: str, body, md5_hex: str) -> dict:
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return {"Bucket": bucket, "Key": key, "Body": body, "ContentType": content_type,
            "ContentMD5": base64.b64encode(bytes.fromhex(md5_hex)).decode(), "Metadata": {"md5": md5_hex}}


def _unchanged(api: Api, bucket: str, local: LocalFile, md5_hex: str, remote: dict | None) -> bool:
    if remote is None or remote["Size"] != local.size:
        return False
    m = _MD5_ETAG.match(remote["ETag"])
    if m:
        return m.group(1) == md5_hex
    head = api.call("s3", "HeadObject", {"Bucket": bucket, "Key": local.key}, mutates=False)
    return head.get("Metadata", {}).get("md5") == md5_hex


def sync(api: Api, files: list[LocalFile], bucket: str, prefix: str, workers: int = 16,
         on_done: Callable[[LocalFile, bool], None] | None = None) -> SyncSummary:
    """Upload files that differ from S3, in parallel; on_done(file, uploaded) after each file."""
    remote = remote_objects(api, bucket, prefix)
    summary = SyncSummary()
    api.client("s3")  # create the client before the threads share it
    if api.dry_run:
        workers = 1  # printed requests stay whole lines, in order

    def one(local: LocalFile) -> bool:
        md5_hex = md5_of(local.path)
        if _unchanged(api, bucket, local, md5_hex, remote.get(local.key)):
            return False
        with local.path.open("rb") as body:
            api.call("s3", "PutObject", put_object_request(bucket, local.key, body, md5_hex))
        return True

    with ThreadPoolExecutor(max_workers=workers) as pool:  # boto3 clients are thread-safe
        for local, uploaded in zip(files, pool.map(one, files)):
            if uploaded:
                summary.uploaded.append(local.key)
                summary.uploaded_bytes += local.size
            else:
                summary.skipped.append(local.key)
            if on_done:
                on_done(local, uploaded)
    return summary
