"""Datasets as in-memory tensors: built-in Fashion-MNIST and digits, and user data specs.

Every spec is materialised as float32 tensors (N x C x H x W) so that training slices tensors
directly instead of going through a DataLoader: image-folder data must therefore fit in RAM.
The validation split is carved from the training data (stratified, seeded) unless an image
folder brings its own val/; the test split is kept apart for the final report.

Image folders are read as RGB the way torchvision's ImageNet evaluation reads them: shorter side
resized to S * 256/224, centre-cropped to S x S, normalised with the ImageNet mean and std (what
torchvision checkpoints expect). S is `image_size`, else the model's natural size
(models.natural_image_size), else the images' own size when they all have one. Other data keep
their channels, are resized to S x S only when `image_size` is given, and are normalised per
channel with the mean and std of their training split.

Specs: `fashion-mnist`, `digits`, `imagefolder:DIR`, `torchvision:NAME`, `module:callable`
(or `path/file.py:callable`).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .userspec import import_callable

SPEC_FORMS = "fashion-mnist, digits, imagefolder:DIR, torchvision:NAME, module:callable or path/file.py:callable"
CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "autocompress")
SYSTEM_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TENSOR_NAMES = ("train_x", "train_y", "test_x", "test_y")
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass
class TensorData:
    """Images `x` (float32, N x C x H x W) and labels `y` (int64) held as whole tensors."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"TensorData(x={tuple(self.x.shape)} {self.x.dtype}, y={tuple(self.y.shape)}, device={self.x.device})"

    def to(self, device: str | torch.device) -> TensorData:
        """The same data on `device` (no copy when already there)."""
        return TensorData(self.x.to(device), self.y.to(device))

    def subset(self, n: int, seed: int = 0) -> TensorData:
        """At most n samples, drawn stratified by class with `seed` (for quick trials and tests)."""
        if n >= len(self):
            return self
        idx = torch.as_tensor(_pick(self.y.cpu().numpy(), n, seed), device=self.y.device)
        return TensorData(self.x[idx], self.y[idx])

    def batches(self, batch_size: int, shuffle: bool, seed: int | None = None,
                limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (x, y) mini-batches by slicing; `limit` caps the number of batches."""
        if not shuffle:
            for i, start in enumerate(range(0, len(self), batch_size)):
                if limit is not None and i >= limit:
                    return
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            return
        for idx in self.index_batches(batch_size, seed, limit):
            yield self.x[idx], self.y[idx]

    def index_batches(self, batch_size: int, seed: int | None = None, limit: int | None = None) -> Iterator[Tensor]:
        """The sample indices of shuffled mini-batches (the order `batches(shuffle=True)` uses)."""
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        order = torch.randperm(len(self), generator=gen).to(self.y.device)
        for i, start in enumerate(range(0, len(self), batch_size)):
            if limit is not None and i >= limit:
                return
            yield order[start:start + batch_size]


@dataclass
class DataBundle:
    """Train / validation / test splits plus the shape facts a model needs."""

    train: TensorData
    val: TensorData
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    notice: str | None = None
    val_source: str = ""  # where the validation split comes from, in words (search header)


def _pick(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n samples, stratified by label when every class can be represented."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if n >= len(y):
        return idx
    _, counts = np.unique(y, return_counts=True)
    strat = y if counts.min() >= 2 and len(counts) <= n <= len(y) - len(counts) else None
    chosen, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=strat)
    return np.sort(chosen)


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) index arrays: carve round(fraction * N) samples, stratified, seeded."""
    n_carve = int(round(fraction * len(y)))
    if n_carve <= 0:
        return np.arange(len(y)), np.arange(0)
    carved = _pick(y, n_carve, seed)
    kept = np.setdiff1d(np.arange(len(y)), carved)
    return kept, carved


def _resize(x: Tensor, size: int) -> Tensor:
    """Whole-tensor resize to size x size (antialiased bilinear), in chunks to bound memory."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    from torch.nn.functional import interpolate

    return torch.cat([interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                      for c in x.split(4096)]) if len(x) else x.new_zeros(0, x.shape[1], size, size)


def _finish(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, name: str, *,
            val_fraction: float, seed: int, limit: int | None, num_classes: int | None = None,
            image_size: int | None = None, val: tuple[Tensor, Tensor] | None = None,
            norm_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataBundle:
    """Cap the training pool, carve validation from it (unless `val` is given), resize to
    `image_size`, normalise with `norm_stats` (mean, std) or the training split's statistics."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(train_y) == 0 or len(test_y) == 0:
        raise UserError(f"data {name!r} has an empty training or test split")
    if train_x.dim() == 3:
        train_x, test_x = train_x.unsqueeze(1), test_x.unsqueeze(1)
    if train_x.dim() != 4 or train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"data {name!r}: images must be C x H x W and alike in train and test, "
                        f"got {tuple(train_x.shape[1:])} and {tuple(test_x.shape[1:])}")
    train_x, test_x = train_x.float(), test_x.float()
    train_y, test_y = train_y.long(), test_y.long()
    if limit is not None and limit < len(train_y):
        keep = torch.as_tensor(_pick(train_y.numpy(), limit, seed))
        train_x, train_y = train_x[keep], train_y[keep]
    if val is None:
        kept, carved = (torch.as_tensor(i) for i in _split(train_y.numpy(), val_fraction, seed))
        tx, ty, vx, vy = train_x[kept], train_y[kept], train_x[carved], train_y[carved]
    else:
        tx, ty, (vx, vy) = train_x, train_y, (val[0].float(), val[1].long())
    if image_size:
        tx, vx, test_x = _resize(tx, image_size), _resize(vx, image_size), _resize(test_x, image_size)
    if norm_stats is None:
        mean = tx.mean(dim=(0, 2, 3), keepdim=True)
        std = tx.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm_stats)
    norm = lambda x: ((x - mean) / std).contiguous()  # noqa: E731
    classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    return DataBundle(TensorData(norm(tx), ty), TensorData(norm(vx), vy), TensorData(norm(test_x), test_y),
                      num_classes=classes, in_channels=int(tx.shape[1]), image_size=int(tx.shape[-1]), name=name)


# ---- Fashion-MNIST -------------------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip or plain) as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, IndexError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _find_idx(folder: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def fashion_dirs(data_dir: str | None = None) -> list[str]:
    """Folders searched for the four Fashion-MNIST files, in order."""
    dirs = [data_dir, os.environ.get("AUTOCOMPRESS_DATA"), os.path.join(CACHE_ROOT, "fashion-mnist"),
            os.path.join(CACHE_ROOT, "FashionMNIST", "raw"), SYSTEM_FASHION_DIR]
    out = []
    for d in dirs:
        if d:
            out.append(d)
            out.append(os.path.join(d, "fashion-mnist"))
    return out


def _download_fashion() -> None:
    """Let torchvision fetch Fashion-MNIST into the cache (CACHE_ROOT/FashionMNIST/raw)."""
    import torchvision

    torchvision.datasets.FashionMNIST(CACHE_ROOT, train=True, download=True)
    torchvision.datasets.FashionMNIST(CACHE_ROOT, train=False, download=True)


def _fashion_arrays(data_dir: str | None) -> dict[str, np.ndarray]:
    for attempt in range(2):
        for folder in fashion_dirs(data_dir):
            paths = {k: _find_idx(folder, stem) for k, stem in FASHION_FILES.items()}
            if all(paths.values()):
                return {k: read_idx(p) for k, p in paths.items()}  # type: ignore[arg-type]
        if attempt == 0:
            try:
                _download_fashion()
            except Exception as e:  # no network, no torchvision mirror, disk full...
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                looked = ", ".join(d for d in fashion_dirs(data_dir)[::2])
                raise UserError(f"Fashion-MNIST not found (looked in {looked}) and download failed ({reason}); "
                                "run `apt-get install dataset-fashion-mnist` or pass --data-dir") from None
    raise UserError("Fashion-MNIST download finished but its files were not found in " + CACHE_ROOT)


def _load_fashion(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = _fashion_arrays(data_dir)
    x = lambda k: torch.from_numpy(a[k].astype(np.float32) / 255.0)  # noqa: E731
    y = lambda k: torch.from_numpy(a[k].astype(np.int64))  # noqa: E731
    return x("train_x"), y("train_y"), x("test_x"), y("test_y")


# ---- digits --------------------------------------------------------------------------------

def _load_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits (offline); 20% carved off as a stratified test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    kept, test = (torch.as_tensor(i) for i in _split(d.target, 0.2, seed))
    return x[kept], y[kept], x[test], y[test]


# ---- image folders, torchvision and user datasets ------------------------------------------

def _to_tensor(item: Any) -> Tensor:
    """One image (PIL, numpy array or tensor) as a float tensor scaled like ToTensor."""
    if isinstance(item, Tensor):
        return item.float() if item.is_floating_point() else item.float() / 255.0
    if isinstance(item, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(item))
        if t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)  # H x W x C -> C x H x W
        return t.float() if t.is_floating_point() else t.float() / 255.0
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(item).float() / 255.0


def _stack(items: Iterable[tuple[Any, Any]], what: str) -> tuple[Tensor, Tensor]:
    """Stack (image, label) pairs; grey images among colour ones are repeated to three channels."""
    xs, ys = [], []
    try:
        for x, y in items:
            xs.append(_to_tensor(x))
            ys.append(int(y))
    except OSError as e:  # PIL's UnidentifiedImageError, truncated files
        raise UserError(f"{what}: cannot read an image ({e})".splitlines()[0]) from None
    if not xs:
        raise UserError(f"{what} is empty")
    if len({t.shape[0] for t in xs if t.dim() == 3}) > 1:
        xs = [t.expand(3, -1, -1) if t.dim() == 3 and t.shape[0] == 1 else t for t in xs]
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) > 1:
        raise UserError(f"{what} has images of different sizes {sorted(shapes)[:3]}; pass --image-size N")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELD_OUT_FOLDERS = ("test", "val")


def folder_transform(image_size: int | None) -> Any:
    """torchvision's ImageNet evaluation transform at size S: resize to S*256/224, centre-crop S."""
    from torchvision import transforms

    if not image_size:
        return None
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)])


def _image_folder(path: str, image_size: int | None, spec_root: str) -> Any:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(path, transform=folder_transform(image_size))
    except (FileNotFoundError, RuntimeError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"image folder {path} has no class folders with images ({reason}); expected "
                        f"{spec_root}/CLASS/IMAGE or {spec_root}/train/CLASS/IMAGE with test/ or val/ beside it"
                        ) from None


def _load_imagefolder(root: str, image_size: int | None, seed: int) -> tuple[dict[str, Any], int]:
    """Tensors of an ImageFolder tree: root/train + root/test (or val), or one folder (root or
    root/train alone) with the test split carved from it.

    With both test/ and val/, val/ is the validation split instead of one carved from train/.
    Returns (keyword arguments for _finish, number of classes).
    """
    if not os.path.isdir(root):
        raise UserError(f"image folder not found: {root} (from --data imagefolder:{root})")
    held = [d for d in HELD_OUT_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if os.path.isdir(os.path.join(root, "train")) and held:
        parts = {name: _image_folder(os.path.join(root, name), image_size, root) for name in ("train", *held)}
        classes = parts["train"].classes
        for name in held:
            if parts[name].classes != classes:
                raise UserError(f"{root}: train/ and {name}/ have different class folders "
                                f"({classes} vs {parts[name].classes}); give both the same class names")
        tensors = {name: _stack(ds, f"{root}/{name}") for name, ds in parts.items()}
        out: dict[str, Any] = dict(zip(("train_x", "train_y"), tensors["train"]))
        out.update(zip(("test_x", "test_y"), tensors[held[0]]))
        if len(held) == 2:
            out["val"] = tensors["val"]
    else:  # one folder of class folders (root/train alone counts as that folder); test carved from it
        only = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        whole = _image_folder(only, image_size, root)
        classes = whole.classes
        x, y = _stack(whole, only)
        kept, test_idx = (torch.as_tensor(i) for i in _split(y.numpy(), 0.2, seed))
        out = dict(train_x=x[kept], train_y=y[kept], test_x=x[test_idx], test_y=y[test_idx])
    return out, len(classes)


def _fast_arrays(ds: Any) -> tuple[Tensor, Tensor] | None:
    """Use a torchvision dataset's `.data`/`.targets` directly when it has no transform."""
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is None or targets is None or getattr(ds, "transform", None) is not None:
        return None
    if not isinstance(data, (Tensor, np.ndarray)) or len(data) != len(targets):
        return None
    x = torch.as_tensor(np.asarray(data))
    if x.dim() == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    return x.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def _load_torchvision(name: str, data_dir: str | None, image_size: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset {name!r} (see torchvision.datasets)")
    root = data_dir or os.path.join(CACHE_ROOT, "torchvision")

    def split(train: bool) -> tuple[Tensor, Tensor]:
        last: Exception | None = None
        for download in (False, True):
            for split_kw in ({"train": train}, {"split": "train" if train else "test"}):
                try:
                    ds = cls(root, download=download, **split_kw)
                except TypeError as e:
                    last = e
                    continue
                except Exception as e:  # not on disk yet, or download failed
                    last = e
                    break
                fast = _fast_arrays(ds)
                if fast is not None:
                    return fast  # resized as a whole by _finish
                if image_size:  # PIL images, maybe of varying sizes: resize and crop like a folder
                    ds = cls(root, download=False, transform=folder_transform(image_size), **split_kw)
                return _stack(ds, f"torchvision:{name}")
        reason = f"{type(last).__name__}: {last}".splitlines()[0][:200]
        raise UserError(f"cannot load torchvision:{name} under {root} ({reason}); pass --data-dir")

    return (*split(True), *split(False))


def load_data(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
              limit: int | None = None, image_size: int | None = None, model: str | None = None,
              val_data: str | None = None) -> DataBundle:
    """Load a data spec into memory with train / val (carved from train) / test splits.

    `image_size` S resizes images to S x S (image folders: resize and centre-crop). Without it,
    image folders take the natural input size of `model` (a model spec such as torchvision:resnet50),
    and other data keep their own size. `val_data` (a spec of the same forms) is a held-out
    validation set: all of its samples, normalised like the training split, replace the carved one.
    """
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    if spec.startswith("imagefolder:") and image_size is None and model:
        from .models import natural_image_size

        image_size = natural_image_size(model)
    raw = _raw(spec, data_dir, seed, image_size)
    if isinstance(raw, DataBundle):
        if val_data:
            raise UserError(f"--val-data cannot replace the validation split of {spec}, which returns a DataBundle; "
                            "put the held-out data in that bundle's val")
        return raw
    tensors, opts = raw
    own_val = "val" in tensors
    if val_data:
        tensors["val"] = _held_out(val_data, data_dir, seed, image_size, tensors, opts.get("num_classes"))
    bundle = _finish(**tensors, **opts, val_fraction=val_fraction, seed=seed, limit=limit, image_size=image_size)
    n = f"{len(bundle.val):,} samples"
    bundle.val_source = (f"{n} of {val_data} (--val-data)" if val_data else f"{n} of {spec}'s val/ folder" if own_val
                         else f"{n} carved from the training data (--val-fraction {val_fraction:g}, seed {seed})")
    return bundle


def _raw(spec: str, data_dir: str | None, seed: int, image_size: int | None
         ) -> tuple[dict[str, Any], dict[str, Any]] | DataBundle:
    """A spec's unnormalised tensors (train_x, train_y, test_x, test_y, maybe val) and the other
    arguments of _finish (name, classes, normalisation); a callable's own DataBundle as it is."""
    if spec == "fashion-mnist":
        return dict(zip(TENSOR_NAMES, _load_fashion(data_dir))), dict(name="fashion-mnist", num_classes=10)
    if spec == "digits":
        return dict(zip(TENSOR_NAMES, _load_digits(seed))), dict(name="digits", num_classes=10)
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        tensors, n_classes = _load_imagefolder(rest, image_size, seed)
        return tensors, dict(name=f"imagefolder:{os.path.abspath(rest)}", num_classes=n_classes,
                             norm_stats=(IMAGENET_MEAN, IMAGENET_STD))
    if kind == "torchvision" and rest:
        return dict(zip(TENSOR_NAMES, _load_torchvision(rest, data_dir, image_size))), dict(name=spec)
    if rest:
        result = import_callable(spec, "--data")()
        if isinstance(result, DataBundle):
            return result
        if not (isinstance(result, tuple) and len(result) == 2):
            raise UserError(f"--data {spec} must return (train_dataset, test_dataset) or a DataBundle, "
                            f"got {type(result).__name__}")
        return dict(zip(TENSOR_NAMES, (*_stack(result[0], f"{spec} train dataset"),
                                       *_stack(result[1], f"{spec} test dataset")))), dict(name=spec)
    raise UserError(f"unknown data spec {spec!r}: use one of {SPEC_FORMS}")


def _held_out(spec: str, data_dir: str | None, seed: int, image_size: int | None, main: dict[str, Any],
              num_classes: int | None) -> tuple[Tensor, Tensor]:
    """Every sample of the --val-data spec (its train and test parts together), checked against
    the main data's image shape and classes."""
    raw = _raw(spec, data_dir, seed, image_size)
    if isinstance(raw, DataBundle):
        parts = [(raw.train.x, raw.train.y), (raw.val.x, raw.val.y), (raw.test.x, raw.test.y)]
    else:
        t = raw[0]
        parts = [(t["train_x"], t["train_y"]), (t["test_x"], t["test_y"])] + ([t["val"]] if "val" in t else [])
    x = torch.cat([p[0].float() if p[0].dim() == 4 else p[0].float().unsqueeze(1) for p in parts])
    y = torch.cat([p[1].long() for p in parts])
    want = main["train_x"].shape[1:] if main["train_x"].dim() == 4 else (1, *main["train_x"].shape[1:])
    if tuple(x.shape[1:]) != tuple(want) and image_size is None:
        raise UserError(f"--val-data {spec}: images are {tuple(x.shape[1:])}, the training data's are "
                        f"{tuple(want)}; pass --image-size to bring both to one size")
    classes = num_classes or int(main["train_y"].max()) + 1
    if len(y) == 0 or int(y.max()) >= classes:
        raise UserError(f"--val-data {spec}: " + ("no samples" if len(y) == 0 else
                        f"labels up to {int(y.max())}, the training data has {classes} classes"))
    return x, y


def default_data(seed: int = 0, image_size: int | None = None) -> DataBundle:
    """Fashion-MNIST, or the bundled digits (with a notice) when it cannot be found or fetched."""
    try:
        return load_data("fashion-mnist", seed=seed, image_size=image_size)
    except UserError as e:
        bundle = load_data("digits", seed=seed, image_size=image_size)
        bundle.notice = f"using sklearn digits instead of Fashion-MNIST: {e}"
        return bundle
