"""Plain training and evaluation for the uncompressed baseline, with an on-disk cache.

The baseline is the starting point of every trial, so it is trained once per (model, data,
epochs, seed) and cached; a user checkpoint (--weights) skips training altogether.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile

import torch
from torch import nn
from torch.nn import functional as F

from .compression import recalibrate_bn
from .data import DataBundle, TensorData
from .errors import UserError
from .models import ModelSpec, build_model, load_weights, logits_of, with_metadata

DEFAULT_LR = {"lenet5": 0.05, "mlp": 0.05, "resnet18": 0.05}
CACHE_VERSION = 3  # 2: initial weights drawn from the seed (were whatever the process's RNG held); 3: BN re-estimated
BN_BATCHES = 50  # training batches the trained model's BatchNorm statistics are re-estimated on


def evaluate(model: nn.Module, data: TensorData, device: str = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] (eval mode, no grad). NaN for an empty split, and for a model whose
    logits are not all finite: argmax would count NaN logits as class 0, and a compressed
    EfficientNet-B6 whose eval-mode activations overflowed scored a plausible 10% that way. A trial
    with a NaN accuracy fails. The model is moved to `device` (a model loaded from an artifact
    lands on the CPU)."""
    if len(data) == 0:
        return float("nan")
    model.to(device)
    was_training = model.training
    model.eval()
    correct, finite = 0, True
    with torch.no_grad():
        for x, y in data.batches(batch_size, shuffle=False):
            logits = model(x.to(device, non_blocking=True))
            finite = finite and bool(torch.isfinite(logits).all())
            correct += int((logits.argmax(1) == y.to(device)).sum())
    model.train(was_training)
    return correct / len(data) if finite else float("nan")


def train_model(model: nn.Module, train: TensorData, *, epochs: int, lr: float, batch_size: int = 128,
                seed: int = 0, device: str = "cpu", progress: bool = True) -> list[float]:
    """SGD (momentum 0.9, weight decay 5e-4) with a per-step cosine LR; returns mean loss per epoch.

    Afterwards every BatchNorm's running statistics are re-estimated on BN_BATCHES training
    batches: torchvision's MNASNet keeps TensorFlow's momentum (0.0003), so after a few epochs its
    running averages are still mostly their initial values, and the eval-mode model of a 5-epoch
    mnasnet0_5 on Fashion-MNIST scored 10% (82% once re-estimated)."""
    if str(device).startswith("cuda"):  # fixed shapes: let cuDNN time and keep its fastest kernels
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = max(1, epochs * math.ceil(len(train) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for epoch in range(epochs):
        batches = train.batches(batch_size, shuffle=True, seed=seed * 1000 + epoch)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=math.ceil(len(train) / batch_size), leave=False,
                           desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr)
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        losses.append(total / max(count, 1))
    recalibrate_bn(model, list(train.batches(batch_size, shuffle=True, seed=seed, limit=BN_BATCHES)))
    return losses


def default_cache_dir() -> str:
    """$AUTOCOMPRESS_CACHE or ~/.cache/autocompress/baselines."""
    return os.environ.get("AUTOCOMPRESS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "autocompress", "baselines")


def cache_key(spec: ModelSpec, data: DataBundle, epochs: int, seed: int, lr: float) -> str:
    """Hash of everything that determines the trained weights."""
    facts = {"v": CACHE_VERSION, "spec": spec.to_dict(), "data": data.name, "epochs": epochs, "seed": seed,
             "lr": lr, "sizes": [len(data.train), len(data.val), len(data.test)]}
    if os.path.isfile(spec.spec):  # a saved module: retrain when the file changes
        st = os.stat(spec.spec)
        facts["file"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _save_atomic(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def baseline(spec: ModelSpec, data: DataBundle, *, epochs: int, seed: int = 0, device: str = "cpu",
             cache_dir: str | None = None, weights: str | None = None, progress: bool = True,
             lr: float | None = None) -> tuple[nn.Module, float]:
    """The trained uncompressed model (eval mode) and its validation accuracy.

    With `weights` the checkpoint is loaded and nothing is trained; otherwise the cached
    weights for this (spec, data, epochs, seed, lr) are used, or trained and cached. With
    epochs == 0 the model is used as built (e.g. a saved, already trained module).
    """
    torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(spec)
    if weights:
        load_weights(model, weights)
        print(f"baseline: loaded {spec.spec} weights from {weights}", file=sys.stderr)
    elif epochs > 0:
        lr = lr if lr is not None else DEFAULT_LR.get(spec.spec, 0.01)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in spec.spec)[-40:]
        path = os.path.join(cache_dir or default_cache_dir(), f"{safe}-{cache_key(spec, data, epochs, seed, lr)}.pt")
        state = None
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(with_metadata(state, model))
                print(f"baseline: using cached {spec.spec} ({path})", file=sys.stderr)
            except Exception as e:  # unreadable cache entry: train again and overwrite it
                print(f"baseline: ignoring unreadable cache {path} ({type(e).__name__})", file=sys.stderr)
                torch.manual_seed(seed)
                model, state = build_model(spec), None
        if state is None:
            print(f"baseline: training {spec.spec} on {data.name} for {epochs} epochs (lr {lr}), "
                  f"caching to {path}", file=sys.stderr)
            losses = train_model(model, data.train, epochs=epochs, lr=lr, seed=seed, device=device,
                                 progress=progress)
            if not all(math.isfinite(v) for v in losses):
                raise UserError(f"baseline training of {spec.spec} diverged (loss {losses[-1]}); try a lower lr")
            _save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    model.to(device).eval()
    return model, evaluate(model, data.val, device)
