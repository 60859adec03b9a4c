"""What train.py and tune.py share: the job flags, the JobSpec they make, waiting with CloudWatch logs, reports."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf import artifacts, atomic
from imgclf.aws import s3sync, scripting
from imgclf.aws.images import DEFAULT_TAG, image_uri, local_image, training_kind
from imgclf.aws.session import Api, AwsError, check_local_image
from imgclf.aws.training import INPUT_MODES, MAX_KEEP_ALIVE_S, MAX_RETRIES, PIPE_REFUSED, JobSpec
from imgclf.errors import UserError
from imgclf.exit_codes import JobFailed
from imgclf.flags import CLOUD, FlagGroup, only_for
from imgclf.search.results import load_hyperparameters

log = logging.getLogger("imgclf.aws")
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
DEFAULT_INSTANCE_TYPE = "ml.g4dn.xlarge"
LOCAL_OUTPUT = "sagemaker-local"  # --local's default output folder (what s3://<bucket>/imgclf/output is on AWS)
# JobOptions field -> (flag, why SageMaker's local mode cannot do it)
LOCAL_CANNOT = {
    "shard_by_s3_key": ("--shard-by-s3-key", "every local container mounts the whole folder"),
    "keep_alive": ("--keep-alive", "local containers are not kept warm"),
    "max_retries": ("--max-retries", "a failed local job is not retried"),
    "spot": ("--spot", "local containers run on this machine, not on spot capacity"),
    "max_wait": ("--max-wait", "a wait for spot capacity"),
    "checkpoint_s3": ("--checkpoint-s3", "SageMaker's local mode ignores CheckpointConfig: a rerun would start over"),
}


@dataclass(frozen=True)
class JobOptions(FlagGroup):
    """What add_job_args' flags (and --role) say of a training job; job_spec turns it into a JobSpec."""

    data: str | None = None
    channel: Sequence[tuple[str, str]] = ()
    weights: str | None = None
    output: str | None = None
    image: str | None = None
    image_tag: str = DEFAULT_TAG
    instance_type: str | None = None
    instance_count: int = 1
    volume_size: int = 50
    max_runtime: int = 24 * 3600
    spot: bool = False
    max_wait: int | None = None
    checkpoint_s3: str | None = None
    network_isolation: bool = False
    subnet: Sequence[str] = ()
    security_group: Sequence[str] = ()
    kms_key: str | None = None
    volume_kms_key: str | None = None
    encrypt_inter_container: bool = False
    role: str | None = None
    input_mode: str = "File"
    shard_by_s3_key: bool = False
    keep_alive: int | None = None
    max_retries: int | None = None


def add_job_args(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", metavar="S3URI",
                      help="dataset prefix holding train/ valid/ test/ (what upload_data.py wrote): one 'training' "
                           "channel")
    only_for(CLOUD, data.add_argument("--channel", action="append", type=scripting.key_value, default=[],
                                      metavar="NAME=S3URI",
                                      help="an explicit channel instead of --data: train, valid, test (repeat)"))
    data.add_argument("--weights", metavar="S3URI", help="pretrained weights file or prefix: the 'weights' channel")
    data.add_argument("--output", metavar="S3URI",
                      help="where SageMaker writes <job>/output/model.tar.gz (default: s3://<data bucket>/imgclf/"
                           "output)")
    data.add_argument("--input-mode", choices=INPUT_MODES, default=JobOptions.input_mode,
                      help="File (default): the channels are copied to the instance before training; FastFile: "
                           "files are read from S3 as the job opens them (with --local: File); Pipe is refused "
                           "(the job reads image files)")
    hps = parser.add_argument_group("hyperparameters")
    hps.add_argument("--hyperparameters", type=Path, metavar="FILE",
                     help="JSON {name: value}, e.g. what tune.py wrote")
    hps.add_argument("--hp", action="append", type=scripting.key_value, default=[], metavar="NAME=VALUE",
                     help="a hyperparameter (repeat; overrides the file), e.g. --hp model=resnet50")
    res = parser.add_argument_group("resources (SageMaker only)")
    only_for(
        CLOUD,
        res.add_argument("--image", help="training image URI (default: <account>.dkr.ecr.<region>.amazonaws.com/"
                                         "imgclf-train-gpu or -cpu by instance type)"),
        res.add_argument("--image-tag", default=JobOptions.image_tag,
                         help=f"tag of the default image (default {JobOptions.image_tag})"),
        res.add_argument("--instance-type", help=f"default {DEFAULT_INSTANCE_TYPE} (GPU); with --local: local (CPU, "
                                                 "the default) or local_gpu"),
        res.add_argument("--instance-count", type=int, default=JobOptions.instance_count),
        res.add_argument("--volume-size", type=int, default=JobOptions.volume_size, metavar="GB",
                         help=f"EBS volume per instance (default {JobOptions.volume_size})"),
        res.add_argument("--max-runtime", type=int, default=JobOptions.max_runtime, metavar="SECONDS",
                         help=f"default {JobOptions.max_runtime}"),
        res.add_argument("--spot", action="store_true", help="managed spot training (needs checkpoints to resume)"),
        res.add_argument("--max-wait", type=int, metavar="SECONDS",
                         help="spot: longest wait for capacity plus runtime (default: --max-runtime)"),
        res.add_argument("--checkpoint-s3", metavar="S3URI",
                         help="checkpoint sync of /opt/ml/checkpoints (default with --spot: "
                              "<output>/<job>/checkpoints)"),
        res.add_argument("--network-isolation", action="store_true",
                         help="no network access from the container (weights must come from the weights channel)"),
        res.add_argument("--tag", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE"),
        res.add_argument("--shard-by-s3-key", action="store_true",
                         help="with --instance-count 2 or more and --channel train=/valid=: each instance gets its "
                              "own part of the train channel's files (ShardedByS3Key) instead of all of them"),
        res.add_argument("--keep-alive", type=int, metavar="SECONDS",
                         help=f"keep the instances warm this long after the job (warm pool, 0-{MAX_KEEP_ALIVE_S}; "
                              "billed), for a next job with the same resources"),
        res.add_argument("--max-retries", type=int, metavar="N",
                         help=f"retry a job that fails with an internal error up to N times (1-{MAX_RETRIES}; "
                              "RetryStrategy)"),
    )
    security = parser.add_argument_group("security (SageMaker only)")
    only_for(
        CLOUD,
        security.add_argument("--subnet", action="append", default=[], metavar="SUBNET_ID",
                              help="run in this VPC subnet (repeat; needs --security-group)"),
        security.add_argument("--security-group", action="append", default=[], metavar="SG_ID",
                              help="VPC security group (repeat; needs --subnet)"),
        security.add_argument("--kms-key", metavar="KEY", help="KMS key (ID, ARN or alias) for the outputs in S3"),
        security.add_argument("--volume-kms-key", metavar="KEY", help="KMS key for the instances' storage volumes"),
        security.add_argument("--encrypt-inter-container", action="store_true",
                              help="encrypt the traffic between the instances of a distributed job"),
    )


def check_job_options(options: JobOptions, local: bool) -> JobOptions:
    """Refuse what the job cannot do, in one line before anything starts: Pipe input, and with --local what SageMaker's
    local mode lacks. With --local, FastFile becomes File (local mode mounts local folders), with a note."""
    if options.input_mode == "Pipe":
        raise UserError(PIPE_REFUSED)
    if not local:
        return options
    given = [(flag, why) for name, (flag, why) in LOCAL_CANNOT.items() if getattr(options, name) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(flag for flag, _ in given)}: not in local mode "
                        f"({'; '.join(why for _, why in given)}); drop them")
    if options.input_mode == "FastFile":
        log.info("--input-mode FastFile: with --local the channels are local folders, mounted as in File mode")
        return dataclasses.replace(options, input_mode="File")
    return options


def hyperparameters_from(file: Path | None, pairs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """--hyperparameters FILE, then each --hp NAME=VALUE over it."""
    hps = load_hyperparameters(file) if file else {}
    hps.update(dict(pairs))
    return hps


def s3_channels(options: JobOptions) -> dict[str, str]:
    """Channel name -> S3 URI from --data / --channel / --weights (a folder's splits are found in the container)."""
    channels = dict(options.channel)
    if len(channels) < len(options.channel):
        names = [name for name, _ in options.channel]
        raise UserError(f"--channel {', '.join(sorted({n for n in names if names.count(n) > 1}))}: given twice; "
                        "give each channel once")
    if options.data:
        if channels.keys() - {"weights"}:
            raise UserError("give either --data or --channel train=/valid=/test=, not both")
        channels["training"] = options.data.rstrip("/") + "/"
    if options.weights:
        channels["weights"] = options.weights
    if not channels:
        raise UserError("no data: pass --data s3://bucket/prefix (the destination of upload_data.py)")
    return channels


def _output_and_image(api: Api, options: JobOptions, channels: dict[str, str], instance_type: str) -> tuple[str, str]:
    """Where the job's output goes, and its training image (train-gpu or train-cpu by instance type)."""
    local = scripting.is_local(api)
    output = options.output
    if not output:
        if local:
            output = LOCAL_OUTPUT
        else:
            bucket, _ = s3sync.parse_s3_uri(next(iter(channels.values())))
            output = f"s3://{bucket}/imgclf/output"
    kind = training_kind(instance_type)
    if local:
        return (scripting.local_uri(output, "--output", must_exist=False),
                check_local_image(options.image or local_image(kind, options.image_tag)))
    return output, options.image or image_uri(scripting.account_of(api), scripting.region_of(api), kind,
                                              options.image_tag)


def job_spec(api: Api, job_name: str, options: JobOptions, checkpoints: bool = True) -> JobSpec:
    local = scripting.is_local(api)
    channels = s3_channels(options)
    if local:  # local folders; the SDK's local mode mounts them as the channels
        channels = {name: scripting.local_uri(uri, f"channel {name}") for name, uri in channels.items()}
    instance_type = options.instance_type or ("local" if local else DEFAULT_INSTANCE_TYPE)
    output, image = _output_and_image(api, options, channels, instance_type)
    checkpoint = options.checkpoint_s3 or (f"{output.rstrip('/')}/{job_name}/checkpoints" if options.spot else None)
    if not checkpoints:
        checkpoint = None
    return JobSpec(image=image, role_arn=scripting.role_arn(api, options.role), channels=channels, output_path=output,
                   instance_type=instance_type, instance_count=options.instance_count,
                   volume_gb=options.volume_size, max_runtime_s=options.max_runtime, spot=options.spot,
                   max_wait_s=options.max_wait, checkpoint_uri=checkpoint, network_isolation=options.network_isolation,
                   subnets=list(options.subnet), security_groups=list(options.security_group),
                   output_kms_key=options.kms_key, volume_kms_key=options.volume_kms_key,
                   encrypt_inter_container=options.encrypt_inter_container, input_mode=options.input_mode,
                   shard_train=options.shard_by_s3_key, keep_alive_s=options.keep_alive,
                   max_retries=options.max_retries,
                   local=local, tensorboard_uri=None if local else f"{output.rstrip('/')}/{job_name}/tensorboard")


def local_output_path(request: dict) -> dict:
    """SageMaker writes <output>/<job>/output/model.tar.gz; the SDK's local mode writes into a file:// output path
    itself, so the request names that folder: the same layout, and jobs do not overwrite each other's."""
    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    return {**request, "OutputDataConfig": {**request["OutputDataConfig"],
                                            "S3OutputPath": f"{output}/{request['TrainingJobName']}/output"}}


def create(api: Api, operation: str, request: dict, name: str, what: str) -> None:
    """Send a Create* request (a dry run prints it instead)."""
    api.call("sagemaker", operation, request)
    if not api.dry_run:
        log.info("%s %s created", what, name)


def local_failure(request: dict) -> str | None:
    """The reason a local training job failed, or None: the output/failure file that the SDK's local mode tars into
    output.tar.gz (SageMaker's FailureReason is that file). docker-compose 1.x exits 0 when the container fails,
    so the SDK may call such a job Completed: the file decides, as on SageMaker."""
    output = Path(urllib.parse.urlsplit(request["OutputDataConfig"]["S3OutputPath"]).path) / "output.tar.gz"
    try:
        with tarfile.open(output) as tar:
            failure = tar.extractfile("failure")
            return failure.read().decode(errors="replace").strip()[:1024] or "no reason given" if failure else None
    except KeyError:  # no failure file
        return None
    except (OSError, tarfile.TarError) as e:
        return f"no output.tar.gz to read ({e})"


def waits(name: str, *, dry_run: bool, no_wait: bool, attached: bool) -> bool:
    """Whether the script goes on to wait for the job: not after a dry run nor with --no-wait (which prints the
    job's name)."""
    if dry_run and not attached:
        return False
    if no_wait:
        print(name)
        return False
    return not dry_run


class LogTail:
    """New CloudWatch log lines of a training job's streams (<job>/algo-1-..., one per instance).

    They go to stderr with the progress messages: stdout carries only the result (the model artifact URI).
    """

    def __init__(self, api: Api, job_name: str, out=None):
        self.api, self.job_name, self.out = api, job_name, out or sys.stderr
        self.tokens: dict[str, str | None] = {}

    def _streams(self) -> list[str]:
        try:
            answer = self.api.call("logs", "DescribeLogStreams", {
                "logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{self.job_name}/"}, mutates=False)
        except AwsError as e:
            if e.code == "ResourceNotFoundException":  # no log yet: the instances are still starting
                return []
            raise
        return sorted(s["logStreamName"] for s in answer.get("logStreams", []))

    def poll(self) -> int:
        """Print every line that arrived since the last poll; return how many."""
        count = 0
        streams = self._streams()
        for stream in streams:
            host = stream.split("/", 1)[-1].rsplit("-", 1)[0]
            while True:
                request = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
                if self.tokens.get(stream):
                    request["nextToken"] = self.tokens[stream]
                answer = self.api.call("logs", "GetLogEvents", request, mutates=False)
                for event in answer.get("events", []):
                    prefix = f"[{host}] " if len(streams) > 1 else ""
                    print(prefix + event["message"].rstrip("\n"), file=self.out, flush=True)
                    count += 1
                token = answer.get("nextForwardToken")
                if not answer.get("events") or token == self.tokens.get(stream):
                    self.tokens[stream] = token
                    break
                self.tokens[stream] = token
        return count


class LiveReports:
    """rules.json and the profiler report of a running job, fetched into `dest` from the job's TensorBoard S3 path
    (SageMaker syncs /opt/ml/output/tensorboard there while the job runs; output.tar.gz comes only at the end).

    Each poll downloads what changed (by ETag) and logs each rule's first finding once.
    """

    FILES = ("rules.json", "profiler-report.html")

    def __init__(self, api: Api, dest: Path):
        self.api, self.dest = api, dest
        self.etags: dict[str, str] = {}
        self.reported: set[str] = set()
        self.warned = False

    def poll(self, job: dict) -> list[Path]:
        """Fetch the files that changed since the last poll; return their local paths."""
        uri = (job.get("TensorBoardOutputConfig") or {}).get("S3OutputPath")
        if not uri:
            return []
        try:
            bucket, prefix = s3sync.parse_s3_uri(uri)
            objects = s3sync.remote_objects(self.api, bucket, prefix)
            # by name, the shallowest key wins (in case SageMaker adds a sub-folder under the path)
            newest = {key.rsplit("/", 1)[-1]: key for key in sorted(objects, key=lambda k: (-k.count("/"), k))}
            fetched = []
            for name in self.FILES:
                key = newest.get(name)
                if key is None or self.etags.get(name) == objects[key]["ETag"]:
                    continue
                body = self.api.call("s3", "GetObject", {"Bucket": bucket, "Key": key}, mutates=False)["Body"].read()
                atomic.write_bytes(self.dest / name, body)
                self.etags[name] = objects[key]["ETag"]
                fetched.append(self.dest / name)
        except AwsError as e:  # a live view is a convenience: the job and the final reports do not depend on it
            if not self.warned:
                log.warning("live reports not fetched from %s: %s", uri, e)
                self.warned = True
            return []
        if self.dest / "rules.json" in fetched:
            self._log_findings(self.dest / "rules.json")
        return fetched

    def _log_findings(self, path: Path) -> None:
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            return
        for rule in result.get("rules", []):
            if rule.get("status") == "IssuesFound" and rule["name"] not in self.reported:
                self.reported.add(rule["name"])
                finding = rule.get("finding") or {}
                log.warning("rule %s: IssuesFound (epoch %s): %s", rule["name"], finding.get("epoch"),
                            finding.get("message", ""))
        log.info("live rules.json (epoch %s, %s): %s", result.get("epochs"), result.get("job_status"), path)


def wait_training_job(api: Api, name: str, interval: float, timeout: float | None, logs: bool = True,
                      live: LiveReports | None = None) -> dict:
    """Wait for a training job to end, printing its log lines and status changes; return its description.
    With `live`, fetch its rules.json and report on every poll while it runs."""
    tail = LogTail(api, name) if logs else None
    seen: dict[str, str] = {}

    def on_poll(job: dict) -> None:
        status = f"{job['TrainingJobStatus']} / {job.get('SecondaryStatus', '')}"
        if seen.get("status") != status:
            seen["status"] = status
            message = (job.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
            log.info("training job %s: %s%s", name, status, f" ({message})" if message else "")
        if tail:
            tail.poll()
        if live:
            live.poll(job)

    return scripting.wait_for(
        lambda: api.call("sagemaker", "DescribeTrainingJob", {"TrainingJobName": name}, mutates=False),
        lambda job: job["TrainingJobStatus"], {"Completed", "Failed", "Stopped"}, interval, timeout, on_poll)


def report_training_job(job: dict) -> None:
    name, status = job["TrainingJobName"], job["TrainingJobStatus"]
    if status != "Completed":
        raise JobFailed(f"training job {name} {status}: {job.get('FailureReason') or 'no reason given'}")
    for metric in job.get("FinalMetricDataList", []):
        log.info("final %s = %s", metric["MetricName"], metric["Value"])
    billable, seconds = job.get("BillableTimeInSeconds"), job.get("TrainingTimeInSeconds")
    if job.get("EnableManagedSpotTraining") and billable and seconds:
        log.info("managed spot: billed %d s of %d s training (%.0f%% saved)", billable, seconds,
                 100 * (1 - billable / seconds))


def download_reports(api: Api, job: dict, dest: Path) -> Path | None:
    """Extract the job's output.tar.gz (what the training wrote to /opt/ml/output/data) into dest.

    Whatever the job's end: SageMaker uploads output/data of Failed and Stopped jobs too, and their rules and
    profiler reports are the ones most needed. Such jobs may have no model artifact, so the path comes from
    the output path: <S3OutputPath>/<job>/output/output.tar.gz.
    """
    model_uri = job.get("ModelArtifacts", {}).get("S3ModelArtifacts", "")
    output_path = job.get("OutputDataConfig", {}).get("S3OutputPath", "")
    if model_uri.endswith("/model.tar.gz"):
        output_uri = model_uri.removesuffix("model.tar.gz") + "output.tar.gz"
    elif output_path:
        output_uri = f"{output_path.rstrip('/')}/{job['TrainingJobName']}/output/output.tar.gz"
    else:
        log.warning("no reports: the job has no output path")
        return None
    if output_uri.startswith("file://"):  # --local: the SDK's local mode wrote it here
        path = Path(urllib.parse.urlsplit(output_uri).path)
        if not path.is_file():
            log.warning("no reports at %s", path)
            return None
        body = path.read_bytes()
    else:
        bucket, key = s3sync.parse_s3_uri(output_uri)
        key = key.rstrip("/")
        try:
            body = api.call("s3", "GetObject", {"Bucket": bucket, "Key": key}, mutates=False)["Body"].read()
        except AwsError as e:
            if e.code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied"):
                log.warning("no reports at s3://%s/%s (%s)", bucket, key, e)
                return None
            raise
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                artifacts.extract(tar, tmp)
            # SageMaker's output.tar.gz holds /opt/ml/output/data; the SDK's local mode tars /opt/ml/output itself.
            root = Path(tmp)
            if output_uri.startswith("file://") and (root / "data").is_dir():
                root = root / "data"
            for item in root.iterdir():
                target = dest / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                item.replace(target)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # a corrupt or hostile archive, an unwritable dest
        log.warning("no reports: %s not extracted into %s (%s)", output_uri, dest, e)
        return None
    log.info("reports of %s in %s: %s", job["TrainingJobName"], dest,
             ", ".join(sorted(p.name for p in dest.iterdir())) or "(empty)")
    return dest
