"""A faithful re-implementation of the reference project's training loop (Udacity dog-breed train_model.py).

torchvision ImageFolder, transforms.Resize((224, 224)) + ToTensor + Normalize (PIL decode, no draft mode),
DataLoader(batch_size, shuffle=True) with its defaults (no worker processes), fp32, Adam, CrossEntropyLoss,
a validation pass after each training pass. `head_only` freezes every pretrained parameter and trains the new
last layer, as the reference did with VGG16; otherwise the whole network trains.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models, transforms


def build(model_name: str, num_classes: int, head_only: bool) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(0)
    model = models.get_model(model_name, weights=None)
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        head = model.fc
    else:  # VGG: classifier[6] is the last layer
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
        head = model.classifier[6]
    if head_only:
        for p in model.parameters():
            p.requires_grad = False
        for p in head.parameters():
            p.requires_grad = True
    return model, [p for p in model.parameters() if p.requires_grad]


def epochs(data_dir: Path, model_name: str, batch_size: int, image_size: int, head_only: bool,
           count: int, lr: float = 0.001) -> list[dict]:
    """Train `count` epochs; per epoch: seconds of the training pass, of the validation pass, images, loss."""
    tf = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    train_set = datasets.ImageFolder(str(data_dir / "train"), tf)
    valid_set = datasets.ImageFolder(str(data_dir / "valid"), tf)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
    valid_loader = torch.utils.data.DataLoader(valid_set, batch_size=batch_size)
    model, params = build(model_name, len(train_set.classes), head_only)
    optimizer = torch.optim.Adam(params, lr=lr)
    criterion = nn.CrossEntropyLoss()
    results = []
    for _ in range(count):
        started = time.perf_counter()
        model.train()
        running_loss, seen = 0.0, 0
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            seen += inputs.size(0)
        trained = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for inputs, labels in valid_loader:
                criterion(model(inputs), labels).item()
        results.append({"train_seconds": trained - started, "valid_seconds": time.perf_counter() - trained,
                        "seconds": time.perf_counter() - started, "train_images": seen,
                        "train_loss": running_loss / max(seen, 1)})
    return results
