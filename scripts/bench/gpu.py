"""GPU benchmark: training and inference images/second of ResNet50 and ViT-B/16 at bf16 on synthetic tensors.

Made for one call on the lent GPU machine (well under 5 minutes): no data, no downloads, prints JSON.
Training step = bf16 autocast forward + cross-entropy + backward + AdamW step (channels_last for the CNN),
inference = bf16 forward under inference_mode. --compile adds torch.compile'd variants (about a minute each).

    python scripts/bench/gpu.py [--batch-size 256] [--steps 20] [--compile] [--models resnet50 timm/...] [--quick]
"""

from __future__ import annotations

import argparse
import time

import common
import torch
from torch import nn
from torchvision import models


def build(name: str, image_size: int) -> nn.Module:
    """A torchvision model, or timm's for `timm/<name>` (the recipes' backbones), with 133 classes."""
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=133)
    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    return models.get_model(name, weights=None, num_classes=133, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(step, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return round(batch * steps / (time.perf_counter() - started), 1)


def bench(name: str, args, device: torch.device, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = build(name, args.image_size).to(device)
    fmt = torch.contiguous_format if "vit" in name else torch.channels_last  # CNNs: NHWC convolutions
    model = model.to(memory_format=fmt)
    if compiled:
        model.compile()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 133, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    model.train()
    train = images_per_second(train_step, args.batch_size, args.warmup, args.steps, device)
    model.eval()
    infer = images_per_second(infer_step, args.batch_size, args.warmup, args.steps, device)
    result = {"train_images_per_second": train, "inference_images_per_second": infer}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--budget", type=float, default=240, help="seconds; later measurements are skipped")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"],
                        help="torchvision names or timm/<name> (e.g. the recipes' backbones)")
    parser.add_argument("--quick", action="store_true", help="smoke test on CPU: tiny batch and images")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.steps, args.warmup = 2, 32, 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for the GPU machine (use --quick for a CPU smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started, figures = time.monotonic(), {}
    for compiled in (False, True) if args.compile else (False,):
        for name in args.models:
            key = f"{name}{'_compiled' if compiled else ''}"
            if time.monotonic() - started > args.budget:
                figures[key] = "skipped: over --budget"
                continue
            figures[key] = bench(name, args, device, compiled)
    return common.emit("gpu", figures, settings={"device": str(device), "dtype": "bfloat16",
                                                 "batch_size": args.batch_size, "image_size": args.image_size,
                                                 "steps": args.steps, "warmup": args.warmup,
                                                 "seconds": round(time.monotonic() - started, 1)})


if __name__ == "__main__":
    main()
