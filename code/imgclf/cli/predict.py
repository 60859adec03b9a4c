"""Top-k breeds for one or more images, from a local server or a SageMaker endpoint.

    imgclf-predict dog.jpg --url http://127.0.0.1:8080          # `python -m imgclf.local serve`
    imgclf-predict a.jpg b.png --endpoint imgclf --region us-east-1 --top-k 3
    imgclf-predict dog.jpg --url http://127.0.0.1:8080 --json   # the raw response, one line per image
    imgclf-predict dog.jpg --local --endpoint dog-breeds        # an endpoint of deploy.py --local
    imgclf-predict dog.jpg --endpoint dog-breeds-per-site --target-model site-a/model.tar.gz  # multi-model
    imgclf-predict dog.jpg --url http://127.0.0.1:8080/models/a/invoke   # imgclf.local serve --models
    imgclf-predict big.png --endpoint dog-breeds-async --async s3://bucket/async-inputs/

Each image is sent as it is (raw bytes, Content-Type from the file name) in its own request; top-k travels in
the X-Amzn-SageMaker-Custom-Attributes header (top_k=K), which SageMaker passes through to the container.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from imgclf.aws import invocations
from imgclf.aws.arguments import positive_seconds
from imgclf.exit_codes import EXIT_INTERRUPTED

EPILOG = """exit status: 0 every image predicted; 1 the server refused or failed at least one image (the others
are still printed); 2 bad arguments, unreadable image file, AWS credentials/region/endpoint problem;
3 the server or endpoint cannot be reached; 130 interrupted (Ctrl-C)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a local server, e.g. http://127.0.0.1:8080 (/invocations is added)")
    target.add_argument("--endpoint", help="a SageMaker endpoint name (InvokeEndpoint)")
    parser.add_argument("--region", help="AWS region of the endpoint (default: AWS_REGION / profile)")
    parser.add_argument("--profile", help="AWS profile for the endpoint's credentials")
    parser.add_argument("--local", action="store_true",
                        help="with --endpoint: SageMaker's local mode (the SageMaker SDK's local runtime client), an "
                             "endpoint that imgclf-deploy --local serves on this machine; no AWS")
    parser.add_argument("--target-model", metavar="KEY",
                        help="with --endpoint: the model of a multi-model endpoint (deploy.py --multi-model) to "
                             "use, its key under the endpoint's S3 prefix, e.g. site-a/model.tar.gz (TargetModel)")
    parser.add_argument("--async", dest="async_inputs", metavar="S3PREFIX",
                        help="with --endpoint: an asynchronous endpoint (deploy.py --async-output): upload each "
                             "image under S3PREFIX, InvokeEndpointAsync, and wait for its answer in S3")
    parser.add_argument("--async-wait", type=positive_seconds, default=900.0, metavar="SECONDS",
                        help="with --async: how long to wait for each answer (default 900: an endpoint scaled to "
                             "zero starts an instance first)")
    parser.add_argument("--top-k", type=int, help="breeds per image (default: the server's, 5)")
    parser.add_argument("--json", action="store_true", help="print each raw JSON response on one line")
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds per request (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return predict(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def predict(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local and not args.endpoint:
        parser.error("--local goes with --endpoint NAME (an endpoint of deploy.py --local)")
    if args.target_model and not args.endpoint:
        parser.error("--target-model goes with --endpoint NAME (a multi-model endpoint); with a local server, put "
                     "the model in the URL: --url http://127.0.0.1:8080/models/NAME/invoke")
    if args.target_model and args.local:
        parser.error("--target-model: SageMaker's local mode hosts no multi-model endpoints; serve the models with "
                     "`python -m imgclf.local serve --models FOLDER` and use --url .../models/NAME/invoke")
    if args.async_inputs and (not args.endpoint or args.local or args.target_model):
        parser.error("--async goes with --endpoint NAME (an asynchronous endpoint on AWS), without --local or "
                     "--target-model")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be at least 1")
    if args.url:
        connect = partial(invocations.via_url, args.url, args.timeout)
    else:
        from imgclf.aws import runtime_client  # boto3: only for an endpoint

        connect = (partial(runtime_client.via_async_endpoint, args.endpoint, args.async_inputs, args.region,
                           args.profile, args.async_wait) if args.async_inputs else
                   partial(runtime_client.via_endpoint, args.endpoint, args.region, args.profile, args.timeout,
                           args.local, args.target_model))
    return invocations.predict(args.images, connect, top_k=args.top_k, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
