"""The naive baseline of the serving benchmark: what a first attempt at a model server looks like.

A single-threaded http.server answering POST /invocations one request at a time: PIL decode of the whole
image (no draft mode), transforms.Resize((224, 224)) + ToTensor + Normalize, an fp32 NCHW forward pass with
torch's default threads, top-5 as JSON. Same model directory as the real server.

    python scripts/bench/naive_server.py --model DIR --port N
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))

import torch  # noqa: E402
from imgclf import artifacts  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402


def make_handler(net, config):
    size = config["image_size"]
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(config["mean"], config["std"])])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, {"status": "Healthy"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            image = Image.open(io.BytesIO(body)).convert("RGB")
            with torch.no_grad():
                probs = torch.softmax(net(tf(image).unsqueeze(0)), dim=1)[0]
            top = probs.topk(5)
            self._send(200, [{"label": config["class_names"][i], "probability": float(p)}
                             for p, i in zip(top.values, top.indices)])

        def _send(self, status, payload):
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    net, config = artifacts.load_model(args.model)
    net.eval()
    HTTPServer(("127.0.0.1", args.port), make_handler(net, config)).serve_forever()


if __name__ == "__main__":
    main()
