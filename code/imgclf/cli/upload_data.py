"""Validate an ImageFolder dataset (train/valid/test/<class>/<image>) and sync its images to S3.

    imgclf-upload-data dogImages s3://my-bucket/dogImages

Uploads in parallel and skips objects already in S3 with the same size and MD5, so a second run uploads
nothing. Pass the same S3 URI to train.py/tune.py as --data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imgclf.aws import s3sync, scripting
from imgclf.aws.arguments import int_between
from imgclf.aws.session import MAX_CONNECTIONS
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP, EXIT_OK
from imgclf.splits import find_split_dirs, validate_splits

log = logging.getLogger("upload_data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="dataset folder holding train/, valid/ and optionally test/")
    parser.add_argument("destination", help="s3://bucket/prefix")
    parser.add_argument("--workers", type=int_between(1, MAX_CONNECTIONS), default=16,
                        help=f"parallel uploads, 1-{MAX_CONNECTIONS} (default 16)")
    parser.add_argument("--no-decode-check", action="store_true",
                        help="skip decoding every image during validation (faster; corrupt files then fail training)")
    scripting.add_common_args(parser)
    return parser


@scripting.program
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    bucket, prefix = s3sync.parse_s3_uri(args.destination)
    if not args.data.is_dir():
        raise UserError(f"{args.data}: not a folder; give the dataset folder holding train/, valid/ and test/")
    api = scripting.make_api(scripting.Access.from_flags(vars(args)))
    s3sync.check_bucket(api, bucket)
    splits = validate_splits(find_split_dirs({"training": str(args.data)}), check_decode=not args.no_decode_check)
    root = args.data.resolve()
    images = [path.resolve() for split in splits.values() for path, _ in split.samples]
    files = s3sync.local_files(root, images, prefix)
    log.info("dataset valid: %d images in %d classes; syncing to s3://%s/%s",
             len(files), len(splits["train"].classes), bucket, prefix)

    bar = scripting.progress_bar(len(files), "upload", unit="file")
    summary = s3sync.sync(api, files, bucket, prefix, workers=args.workers,
                          on_done=(lambda f, up: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    for key in summary.uploaded:
        log.debug("uploaded %s", key)
    log.info("%s%s", "dry run, nothing sent: " if args.dry_run else "", summary.line(f"s3://{bucket}/{prefix}"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
