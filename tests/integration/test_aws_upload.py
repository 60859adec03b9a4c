"""scripts/upload_data.py against a moto S3 server: validation, sync, skip-unchanged, clear errors."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from imgclf.aws import s3sync

from tests.aws_helpers import client, dry_run_requests, failed, offline_env, run_script


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_dataset):
    """A copy of the session's sample data that this module may change."""
    return shutil.copytree(sample_dataset, tmp_path_factory.mktemp("upload") / "data")


def test_sync_uploads_then_skips_then_uploads_only_the_changed_file(dataset, aws_env, moto_server):
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="dogs-upload")
    images = sorted(p for p in dataset.rglob("*.jpg"))

    first = run_script("upload_data.py", str(dataset), "s3://dogs-upload/dogImages/", env=aws_env)
    assert first.returncode == 0, failed(first)
    assert f"{len(images)} file(s) uploaded" in first.stderr and "0 unchanged" in first.stderr
    listed = s3.list_objects_v2(Bucket="dogs-upload", Prefix="dogImages/")["Contents"]
    keys = {o["Key"] for o in listed}
    assert keys == {"dogImages/" + p.relative_to(dataset).as_posix() for p in images}
    one = images[0]
    head = s3.head_object(Bucket="dogs-upload", Key="dogImages/" + one.relative_to(dataset).as_posix())
    assert head["Metadata"]["md5"] == hashlib.md5(one.read_bytes()).hexdigest()
    assert head["ContentType"] == "image/jpeg"

    second = run_script("upload_data.py", str(dataset), "s3://dogs-upload/dogImages", "--no-decode-check",
                        env=aws_env)
    assert second.returncode == 0, failed(second)
    assert "0 file(s) uploaded" in second.stderr and f"{len(images)} unchanged" in second.stderr

    # Same size, different bytes: the checksum, not the size, decides.
    data = bytearray(one.read_bytes())
    data[-3] ^= 0xFF
    one.write_bytes(bytes(data))
    third = run_script("upload_data.py", str(dataset), "s3://dogs-upload/dogImages", "--no-decode-check",
                       env=aws_env)
    assert third.returncode == 0, failed(third)
    assert "1 file(s) uploaded" in third.stderr and f"{len(images) - 1} unchanged" in third.stderr


def test_bad_layout_is_refused_before_anything_is_sent(tmp_path, dataset, aws_env, moto_server):
    broken = shutil.copytree(dataset, tmp_path / "broken")
    shutil.rmtree(broken / "valid" / sorted(p.name for p in (broken / "valid").iterdir())[0])
    result = run_script("upload_data.py", str(broken), "s3://dogs-upload/broken", "--no-decode-check", env=aws_env)
    assert result.returncode == 2, failed(result)
    assert "class folders differ" in result.stderr and "Traceback" not in result.stderr
    assert "Contents" not in client("s3", moto_server).list_objects_v2(Bucket="dogs-upload", Prefix="broken/")


def test_missing_bucket_and_bad_uri_are_clear(dataset, aws_env):
    missing = run_script("upload_data.py", str(dataset), "s3://no-such-bucket-here/x", "--no-decode-check",
                         env=aws_env)
    assert missing.returncode == 3, failed(missing)
    assert "bucket no-such-bucket-here does not exist" in missing.stderr
    bad = run_script("upload_data.py", str(dataset), "dogs-upload/x", env=aws_env)
    assert bad.returncode == 2 and "is not an S3 URI" in bad.stderr, failed(bad)


def test_dry_run_without_credentials_prints_validated_put_requests(dataset):
    result = run_script("upload_data.py", str(dataset), "s3://dogs-upload/dry", "--no-decode-check", "--dry-run",
                        env=offline_env())
    assert result.returncode == 0, failed(result)
    requests = dry_run_requests(result.stdout)
    assert {r["operation"] for r in requests} == {"PutObject"}
    assert len(requests) == len(list(dataset.rglob("*.jpg")))
    assert all(r["request"]["Key"].startswith("dry/") and r["request"]["ContentMD5"] for r in requests)


def test_plan_falls_back_to_metadata_when_the_etag_is_not_an_md5(tmp_path):
    """Multipart or SSE-KMS ETags are not MD5s: the x-amz-meta-md5 that upload_data.py writes decides."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    md5 = hashlib.md5(b"abc").hexdigest()
    local = s3sync.local_files(tmp_path, [path], "p/")[0]

    class Api:
        def __init__(self, metadata):
            self.metadata = metadata

        def call(self, service, operation, params, mutates=True):
            assert (service, operation, params) == ("s3", "HeadObject", {"Bucket": "b", "Key": "p/a.jpg"})
            return {"Metadata": self.metadata}

    multipart = {"Size": 3, "ETag": '"0123456789abcdef0123456789abcdef-2"'}
    assert s3sync._unchanged(Api({"md5": md5}), "b", local, md5, multipart)
    assert not s3sync._unchanged(Api({}), "b", local, md5, multipart)
    assert s3sync._unchanged(Api({}), "b", local, md5, {"Size": 3, "ETag": f'"{md5}"'})
    assert not s3sync._unchanged(Api({}), "b", local, md5, {"Size": 4, "ETag": f'"{md5}"'})
    assert s3sync.parse_s3_uri("s3://bucket-1/a/b/") == ("bucket-1", "a/b/")
