"""Register a training job's model in SageMaker's model registry, and approve or reject a registered version.

    imgclf-register-model --training-job imgclf-vgg16-20260101-120000 --group dog-breeds
    imgclf-register-model --approve arn:aws:sagemaker:us-east-1:123456789012:model-package/dog-breeds/3
    imgclf-register-model --reject arn:aws:sagemaker:...:model-package/dog-breeds/4 --description "valid acc 0.61"

--training-job/--group creates the model package group if it is missing, then a new version of it: the serving
image by digest (imgclf-serve tagged --image-tag, as deploy.py resolves it), the job's model.tar.gz, the
content types the image accepts and answers, the instance types it runs on (CPU, x86), and ModelMetrics
pointing to the job's metrics.json (uploaded beside its output.tar.gz), PendingManualApproval.
--approve/--reject set ModelApprovalStatus; deploy.py --model-package deploys an Approved version only.

Prints the version's ARN on stdout.
"""

from __future__ import annotations

import argparse
import sys

from imgclf.aws import registry, scripting
from imgclf.aws.images import image_tag_default
from imgclf.exit_codes import EXIT_CODES_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--training-job", metavar="JOB", help="register the model of this Completed training job")
    action.add_argument("--approve", metavar="ARN", help="approve this model package version (deploy.py deploys it)")
    action.add_argument("--reject", metavar="ARN", help="reject this model package version")
    parser.add_argument("--group", metavar="NAME",
                        help="with --training-job: the model package group (created if missing), e.g. dog-breeds")
    parser.add_argument("--description", metavar="TEXT",
                        help="with --approve/--reject: why (the version's ApprovalDescription)")
    image = parser.add_argument_group("serving image (with --training-job)")
    image.add_argument("--image", help="serving image URI (default: <account>.dkr.ecr.<region>.amazonaws.com/"
                                       "imgclf-serve:<tag>); a tag is resolved to the image's digest")
    image.add_argument("--image-tag", default=image_tag_default(),
                       help="tag of the default image (default: this checkout's git sha, what `make push` pushed; "
                            "else latest)")
    parser.add_argument("--tag", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE",
                        help="tag the version (and the group, when it is created) (repeat)")
    scripting.add_common_args(parser)
    return parser


@scripting.program
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    access = scripting.Access.from_flags(vars(args))
    if args.training_job:
        if not args.group:
            parser.error("--training-job needs --group NAME (the model package group, e.g. dog-breeds)")
        if args.description is not None:
            parser.error("--description goes with --approve/--reject (the approval's reason)")
        return registry.register(access, training_job=args.training_job, group=args.group, image=args.image,
                                 image_tag=args.image_tag, tags=args.tag)
    if args.group or args.image or args.tag:
        parser.error("--approve/--reject take the version's ARN only (it names the group): drop --group, --image "
                     "and --tag")
    if args.approve:
        return registry.set_status(access, args.approve, registry.APPROVED, args.description)
    return registry.set_status(access, args.reject, registry.REJECTED, args.description)


if __name__ == "__main__":
    sys.exit(main())
