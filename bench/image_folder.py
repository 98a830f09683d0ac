"""Write a small ImageNet-style folder of real images, for the `imagefolder:DIR` commands.

Fashion-MNIST images (28 x 28 grey, the first N of each class) saved as PNG files in
DIR/train/CLASS/ and DIR/test/CLASS/, class folders named after the labels. The search reads them
as RGB, resized and centre-cropped to the model's input size, as it reads any user's folder.

    python bench/image_folder.py /tmp/images --train 30 --test 10
    autocompress search --model torchvision:resnet50 --weights ckpt.pt --data imagefolder:/tmp/images --budget 50MB
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from autocompress.data import _fashion_arrays  # the package's own reader and search path

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def write(root: str, train: int, test: int) -> int:
    """Write `train` and `test` images per class under root; returns the number of files."""
    arrays = _fashion_arrays(None)
    written = 0
    for split, key, per_class in (("train", "train", train), ("test", "test", test)):
        x, y = arrays[f"{key}_x"], arrays[f"{key}_y"]
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, index in enumerate(np.flatnonzero(y == label)[:per_class]):
                Image.fromarray(x[index]).save(os.path.join(folder, f"{i}.png"))
                written += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--train", type=int, default=30, help="training images per class")
    ap.add_argument("--test", type=int, default=10, help="test images per class")
    a = ap.parse_args()
    print(f"wrote {write(a.root, a.train, a.test)} images under {a.root}")


if __name__ == "__main__":
    main()
