"""A user's own model and checkpoint, searched from Python.

    python examples/custom_model.py            # trains a small checkpoint first, then searches

The CLI equivalent: autocompress search --model examples/custom_model.py:build \
    --weights runs/example-ckpt.pt --data digits --budget 10x
"""
from __future__ import annotations

import os

import torch
from torch import nn


def build(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """Any callable returning an nn.Module works; it receives the arguments it names."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))


def main() -> None:
    from autocompress.api import search
    from autocompress.data import load_data
    from autocompress.train import evaluate, train_model

    os.makedirs("runs", exist_ok=True)
    ckpt = "runs/example-ckpt.pt"
    if not os.path.exists(ckpt):
        data = load_data("digits")
        model = build()
        train_model(model, data.train, epochs=8, lr=0.05)
        print(f"checkpoint val accuracy {evaluate(model, data.val):.4f}")
        torch.save(model.state_dict(), ckpt)
    outcome = search("10x", model=f"{os.path.abspath(__file__)}:build", weights=ckpt, data="digits",
                     out="runs/custom", trials=6, epochs=2)
    print("best artifact:", outcome.best_path)


if __name__ == "__main__":
    main()
