"""The plumbing every AWS script shares: the common flags and the settings they give (Access, Waiting), the Api
they send through, resource names, waiting, progress, and `run`, which maps what a script raises to its exit code
(imgclf.exit_codes)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
import botocore.parsers

from imgclf.aws.arguments import positive_seconds
from imgclf.aws.images import image_uri, local_image, resolve_digest
from imgclf.aws.session import LOCAL_REGION, Api, AwsError, check_local_image, local_session, make_session
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_AWS, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_USAGE, JobFailed
from imgclf.flags import CLOUD, FlagGroup, only_for

log = logging.getLogger("imgclf.aws")

ROLE_ENV = "SAGEMAKER_ROLE"
# The account shown in a dry run that has no AWS access (nothing is sent, so nothing needs the real one).
PLACEHOLDER_ACCOUNT = "000000000000"


class WaitTimeout(Exception):
    """--timeout passed while waiting."""


@dataclass(frozen=True)
class Access(FlagGroup):
    """How requests reach AWS (add_common_args, add_local_arg): a session from region/profile, another endpoint
    URL, a dry run that prints them, or the SDK's local mode."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    dry_run: bool = False
    local: bool = False

    OPTIONAL_FLAGS = frozenset({"local"})  # push_images.py and upload_data.py have no --local


@dataclass(frozen=True)
class Waiting(FlagGroup):
    """How a script waits for what it started (add_wait_args)."""

    no_wait: bool = False
    timeout: float | None = None
    poll_interval: float = 15.0


class _Verbose(argparse.Action):
    """-v: debug logging, from the moment the flag is parsed."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        logging.getLogger().setLevel(logging.DEBUG)


def add_common_args(parser: argparse.ArgumentParser, role: bool = False) -> None:
    """The flags that configure AWS access (marked CLOUD: tune.py --local refuses them), and --verbose."""
    group = parser.add_argument_group("AWS")
    only_for(CLOUD, group.add_argument("--region",
                                       help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / the profile's)"))
    only_for(CLOUD, group.add_argument("--profile", help="named profile from ~/.aws (default: AWS_PROFILE)"))
    if role:
        only_for(CLOUD, group.add_argument("--role", default=os.environ.get(ROLE_ENV),
                                           help=f"SageMaker execution role, ARN or name (default: ${ROLE_ENV})"))
    only_for(CLOUD, group.add_argument(
        "--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
        help="send requests to this URL instead of AWS (e.g. a moto server; default: AWS_ENDPOINT_URL)"))
    only_for(CLOUD, group.add_argument(
        "--dry-run", action="store_true",
        help="validate the requests against the service model and print them as JSON; send nothing that creates, "
             "changes or deletes (describe/list calls still read when credentials exist)"))
    group.add_argument("-v", "--verbose", action=_Verbose, help="debug logging")


def add_local_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--local", action="store_true",
                        help=f"SageMaker's local mode: the same requests go to the SageMaker SDK's local client, which "
                             f"runs {what} on this machine's images (`make build`) with docker-compose; local folders "
                             "instead of S3, no AWS account or credentials")


def add_wait_args(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("waiting")
    only_for(CLOUD, group.add_argument("--no-wait", action="store_true", help=f"return once the {what} is accepted"))
    group.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help=f"stop waiting after this long (exit 4); the {what} carries on (default: no limit)")
    only_for(CLOUD, group.add_argument("--poll-interval", type=positive_seconds, default=Waiting.poll_interval,
                                       metavar="SECONDS", help="seconds between polls"))


def given(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: Collection[str]) -> list[str]:
    """The options among `dests` that the command line set (their value is not the default)."""
    return [a.option_strings[0] for a in parser._actions
            if a.dest in dests and a.option_strings and getattr(args, a.dest) != a.default]


def make_api(access: Access) -> Api:
    """Session from the flags/environment. A dry run without AWS access still works: it reads nothing.
    With --local, the SDK's local clients take the requests instead of AWS."""
    if access.local:
        if access.dry_run:
            raise UserError("--dry-run prints the requests for AWS; --local runs them here: choose one")
        return Api(None, local=local_session())
    try:
        session = make_session(access.region, access.profile, access.endpoint_url)
    except AwsError as e:
        if not access.dry_run:
            raise
        log.warning("dry run without AWS access (%s): assuming no resource exists yet", e)
        session = None
    return Api(session, dry_run=access.dry_run, endpoint_url=access.endpoint_url, region=access.region)


def is_offline(api: Api) -> bool:
    return api.session is None and api.local is None


def is_local(api: Api) -> bool:
    return api.local is not None


def region_of(api: Api) -> str:
    if is_local(api):
        return LOCAL_REGION
    return api.session.region_name if api.session else (api.region or "us-east-1")


def account_of(api: Api) -> str:
    if api.session is None:
        return PLACEHOLDER_ACCOUNT
    return api.call("sts", "GetCallerIdentity", mutates=False)["Account"]


def role_arn(api: Api, role: str | None) -> str:
    """An ARN as given; a bare name becomes arn:aws:iam::<account>:role/<name>."""
    if not role and is_local(api):
        role = "local-mode"  # the requests carry one as on AWS; the SDK's local mode assumes no role
    if not role:
        raise AwsError(f"no SageMaker execution role: pass --role (ARN or name) or set {ROLE_ENV}; "
                       "README.md (Permissions) lists the permissions it needs")
    if role.startswith("arn:"):
        if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", role):
            raise UserError(f"--role {role!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
        return role
    if not re.fullmatch(r"[\w+=,.@-]{1,64}", role):
        raise UserError(f"--role {role!r} is neither a role ARN nor a role name")
    region = api.session.region_name if api.session else ""
    partition = "aws-cn" if region.startswith("cn-") else "aws-us-gov" if region.startswith("us-gov-") else "aws"
    return f"arn:{partition}:iam::{account_of(api)}:role/{role}"


def check_output_path(flag: str, path: Path, folder: bool) -> None:
    """Refuse, before anything is sent, an output path that cannot be written: a file where a folder goes or a
    folder where a file goes, or a place whose nearest existing folder is a file or not writable."""
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is {'a file' if folder else 'a folder'}: give "
                        f"{'a folder' if folder else 'a file name'}")
    absolute = path.absolute()
    existing = absolute if absolute.is_dir() else next(p for p in absolute.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing}; give another path")


def local_uri(location: str, what: str, must_exist: bool = True) -> str:
    """A local file or folder as the file:// URI that the SDK's local mode reads and writes (--local)."""
    if location.startswith("s3://"):
        raise UserError(f"{what} {location}: with --local, give a folder on this machine (S3 needs AWS)")
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    if must_exist and not path.exists():
        raise UserError(f"{what} {location}: no such file or folder")
    return path.as_uri()


def serving_image(api: Api, image: str | None, image_tag: str, kind: str = "serve") -> str:
    """The image a model serves with (`image`, else the serving image `kind`, serve or serve-gpu, tagged `image_tag`):
    with --local the locally built one; on AWS ECR's, by digest (a tag such as latest moves with every push, and a
    model's name hashes this URI, so a new push gives a new model)."""
    if is_local(api):
        return check_local_image(image or local_image(kind, image_tag))
    return resolve_digest(api, image or image_uri(account_of(api), region_of(api), kind, image_tag))


def describe_or_none(api: Api, service: str, operation: str, params: dict) -> dict | None:
    """The description, or None when the resource does not exist (or a dry run cannot read)."""
    if is_offline(api):
        return None
    try:
        return api.call(service, operation, params, mutates=False)
    except AwsError as e:
        # SageMaker answers a missing resource with a ValidationException "Could not find ...".
        if e.code in ("ValidationException", "ResourceNotFound", "NoSuchKey", "404") and (
            e.code != "ValidationException" or "could not find" in str(e).lower()
        ):
            return None
        raise


def resource_name(*parts: str, max_len: int = 63, suffix: str = "") -> str:
    """A SageMaker name ([a-zA-Z0-9-], no leading/trailing/double hyphens) of at most max_len characters.

    The suffix (timestamp or hash) is kept whole, so names stay unique when the parts are truncated.
    """
    base = re.sub(r"[^a-zA-Z0-9]+", "-", "-".join(p for p in parts if p)).strip("-")
    room = max_len - (len(suffix) + 1 if suffix else 0)
    base = base[:room].strip("-")
    return f"{base}-{suffix}" if suffix else base


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def key_value(text: str) -> tuple[str, str]:
    """argparse type for KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def tags_from(pairs: Sequence[tuple[str, str]] | None) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in (pairs or [])]


def log_status_changes(what: str, name: str, status_of: Callable[[dict], str]) -> Callable[[dict], None]:
    """An on_poll for wait_for: one log line each time the status changes."""
    seen: list[str] = []

    def on_poll(description: dict) -> None:
        if seen[-1:] != [status_of(description)]:
            seen.append(status_of(description))
            log.info("%s %s: %s", what, name, seen[-1])
    return on_poll


def wait_for(describe: Callable[[], dict], status_of: Callable[[dict], str], done: set[str],
             interval: float, timeout: float | None, on_poll: Callable[[dict], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll `describe` until its status is in `done`; raise WaitTimeout after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        description = describe()
        if on_poll:
            on_poll(description)
        if status_of(description) in done:
            return description
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"still {status_of(description)} after {timeout:g} s")
        sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on an interactive terminal; None otherwise (logs carry the progress)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def program(main: Callable[[list[str] | None], int]) -> Callable[..., int]:
    """A script's main with the documented exit codes and one-line error messages (no tracebacks): the console
    script, `python scripts/<name>.py` and `python -m imgclf.cli.<name>` exit with what it returns."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stderr)
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return main(argv)
        except JobFailed as e:
            log.error("%s", e)
            return EXIT_FAILED
        except WaitTimeout as e:
            log.error("%s; it carries on in AWS (run again with --attach to keep waiting)", e)
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            log.error("interrupted; anything already started carries on in AWS")
            return EXIT_INTERRUPTED
        except botocore.exceptions.ParamValidationError as e:
            log.error("invalid request: %s", e)
            return EXIT_USAGE
        except AwsError as e:
            log.error("%s", e)
            return EXIT_AWS
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            log.error("AWS: %s", e)
            return EXIT_AWS
        except botocore.parsers.ResponseParserError as e:  # an HTTP server that is not AWS (nor moto) answered
            log.error("AWS: the answer is not AWS's (%.200s): check --endpoint-url / AWS_ENDPOINT_URL and any "
                      "proxy (HTTPS_PROXY)", " ".join(str(e).split()))
            return EXIT_AWS
        except UserError as e:
            log.error("%s", e)
            return EXIT_USAGE
        except OSError as e:  # a local file or folder: unreadable input, unwritable output
            log.error("%s", e)
            return EXIT_USAGE

    return run
