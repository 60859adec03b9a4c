"""Push the images `make build` made to Amazon ECR (what `make push` runs).

    imgclf-push-images [train-cpu train-gpu serve serve-gpu] --tag TAG [--tag latest] [--keep 20]
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
import sys

from imgclf.aws import ecr, scripting
from imgclf.aws.push import IMAGES, push_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
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


@scripting.program
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error(f"--keep {args.keep}: keep at least 1 image")
    if args.scan_timeout < 0:
        parser.error(f"--scan-timeout {args.scan_timeout:g}: give 0 or more seconds")
    unknown = [i for i in args.images if i not in IMAGES]
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}: choose from {' '.join(IMAGES)}")
    return push_images(scripting.Access.from_flags(vars(args)), images=list(dict.fromkeys(args.images or IMAGES)),
                       tags=args.tag, prefix=args.prefix, keep=args.keep, account=args.account, docker=args.docker,
                       repository_tags=args.repository_tag, scan_timeout=args.scan_timeout,
                       allow_critical=args.allow_critical)


if __name__ == "__main__":
    sys.exit(main())
