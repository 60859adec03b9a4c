"""The whole pipeline on this machine, no AWS: sample data -> train -> serve -> predict.

    imgclf-demo                                   # generated sample "breeds", a couple of minutes
    imgclf-demo --data ~/dogImages --model resnet50 --weights ~/resnet50-0676ba61.pth

Training runs the training image's real `train` entrypoint and serving the serving image's real `serve`
entrypoint, both in local mode (host processes over a temporary /opt/ml tree). Exits 0 only when every
step worked; 2 with an `error:` line when an option, a hyperparameter or the --data folder is bad (checked
before anything runs); otherwise it names the step that failed and exits with that step's number (1-5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgclf import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="your ImageFolder dataset (train/, valid/, test/)")
    parser.add_argument("--model", help="torchvision model name (default: resnet18 on sample data, else vgg16)")
    parser.add_argument("--weights", type=Path, metavar="FILE|DIR",
                        help="pretrained weights for --model: a torchvision state_dict file, or a folder of them")
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="extra hyperparameter")
    parser.add_argument("--output", type=Path, default=Path("demo-output"),
                        help="where everything goes (default: ./demo-output)")
    parser.add_argument("--port", type=int, help="server port, 1-32767 (default: a free one)")
    parser.add_argument("--images", type=int, default=3, help="test images to send to the server, 1 or more")
    parser.add_argument("--startup-timeout", type=float, default=180.0, metavar="SECONDS",
                        help="how long to wait for the server to answer /ping (default 180)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return demo.run(output=args.output, data=args.data, model=args.model, weights=args.weights, hp=args.hp,
                    port=args.port, images=args.images, startup_timeout=args.startup_timeout)


if __name__ == "__main__":
    sys.exit(main())
