"""Which size-weighted channel plan fine-tunes best at a budget? (issue 14, the warm start's powers)

The warm start's channel plans remove from each layer `fraction * (layer size / largest)^p` of its
channels (autocompress.warmstart.channel_plan), the fraction the least that fits the budget. For
each power p and bit width given, this fits that plan to the budget (on the space's grid, biases
and norms at the width the search's trials store them at: objective.as_trial), fine-tunes it for
--seconds with the search's final recipe (distilled 0.5, cosine, BatchNorm statistics
re-estimated) and scores it on validation and test. The fraction here may go up to the space's largest amount, beyond the warm
start's MOST_CHANNELS, to show what the cap leaves out.

    python bench/channel_powers.py --ratio 300 --bits 3 --powers 0,0.0625,0.125
    python bench/channel_powers.py --model torchvision:mnasnet0_5 --baseline-epochs 5 --ratio 20 --bits 4 --powers 0.25,0.5 --seconds 300

Run two at once on the 2-core machine (`--threads 1` each) to compare powers at the same load.
Appends to bench/results/channel_powers.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocompress import warmstart as ws  # noqa: E402
from autocompress.compression import compress, kept_weights, recalibrate_bn  # noqa: E402
from autocompress.cost import artifact_size  # noqa: E402
from autocompress.data import load_data  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.models import ModelSpec, param_bytes  # noqa: E402
from autocompress.objective import as_trial  # noqa: E402
from autocompress.space import load_space  # noqa: E402
from autocompress.train import baseline, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(a: argparse.Namespace, power: float, bits: int, model, spec, data) -> dict:
    """Fit the plan of `power` at `bits` to the budget, fine-tune it for a.seconds, score it."""
    example = data.train.x[:2]
    space = load_space(None).bind(model, example)
    layers = list(space.layers)
    limit = int(param_bytes(model) / a.ratio)
    size_of = lambda p: artifact_size(compress(model, as_trial(space, p), example, calibrate=False), spec)  # noqa: E731
    weights = ws.size_weights(model, layers, power)
    small = ws.small_layers(model, layers)
    top = max(c["amount"].high for c in space.layers.values() if "amount" in c) / min(weights.values())
    plan_of = lambda f: as_trial(space, ws.channel_plan(space.layers, f, bits, weights, small))  # noqa: E731
    fraction = ws.least_that_fits(lambda f: size_of(plan_of(f)), limit, top, 0.005)
    row = {"model": a.model, "ratio": a.ratio, "budget_bytes": limit, "power": power, "bits": bits,
           "seconds": a.seconds, "seed": a.seed}
    if fraction is None:
        return {**row, "fits": False}
    plan = plan_of(fraction)
    row.update(fits=True, fraction=round(fraction, 4), bytes=size_of(plan),
               amounts={n: lp.amount for n, lp in plan.layers.items() if lp.prune == "channel"})
    calib = list(data.train.batches(128, shuffle=True, seed=a.seed, limit=4))
    cm = compress(model, plan, example, calib)
    res = finetune(cm, data.train, data.val, FinetuneConfig(epochs=0, lr=a.lr, distill=0.5, seed=a.seed,
                                                            seconds=a.seconds),
                   teacher=model, l1_weights=lambda: kept_weights(cm), device="cpu",
                   recalibrate=lambda: recalibrate_bn(cm, calib))
    return {**row, "val_accuracy": res.val_acc[-1], "steps": res.steps, "test_accuracy": evaluate(cm, data.test, "cpu"),
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=300.0, help="budget: fp32 bytes / this")
    ap.add_argument("--powers", default="0,0.0625,0.125,0.25")
    ap.add_argument("--bits", default="3")
    ap.add_argument("--seconds", type=float, default=100.0, help="fine-tune time of each plan")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="channel_powers")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_data("fashion-mnist", seed=0)
    spec = ModelSpec(a.model, data.num_classes, data.in_channels, data.image_size, data=data.name)
    model, _ = baseline(spec, data, epochs=a.baseline_epochs, seed=0, device="cpu", progress=False)
    for bits in (int(b) for b in a.bits.split(",")):
        for power in (float(p) for p in a.powers.split(",")):
            row = run(a, power, bits, model, spec, data)
            print(json.dumps(row), flush=True)
            with open(os.path.join(RESULTS, f"{a.tag}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
