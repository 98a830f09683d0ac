"""Does BatchNorm folding cost accuracy? compress + 2-epoch fine-tune of a BatchNorm ResNet
(TinyResNet of the tests) on digits, for three plans, with the checkout on PYTHONPATH.

Training runs through the BatchNorm either way; folding changes what is evaluated and exported.
Run it once with a checkout that folds and once with one that does not (the baseline is trained
by the first run and reused by the second, so both start from the same weights):

    PYTHONPATH=. python3 bench/bn_fold.py
    PYTHONPATH=/path/to/older/checkout python3 bench/bn_fold.py

Results are quoted in bench/results/bn_fold.md.
"""
import os, sys, time, torch, autocompress
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from conftest_models import TinyResNet
from autocompress.data import load_data
from autocompress.models import prunable_layers
from autocompress.train import train_model, evaluate
from autocompress.compression import compress
from autocompress.finetune import finetune, FinetuneConfig
from autocompress.plan import CompressionPlan, LayerPlan
torch.set_num_threads(2)
t0 = time.time()
print(autocompress.__file__)
d = load_data("digits", seed=0)
torch.manual_seed(0)
m = TinyResNet()
path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bn_fold_tiny_base.pt")
if os.path.exists(path):
    m.load_state_dict(torch.load(path))
else:
    train_model(m, d.train, epochs=8, lr=0.05, progress=False)
    torch.save(m.state_dict(), path)
m.eval()
print("baseline val", evaluate(m, d.val), "test", evaluate(m, d.test), f"{time.time() - t0:.0f}s", flush=True)
calib = list(d.train.batches(128, shuffle=True, seed=0, limit=4))
for fb, amount, bits in ((32, 0.5, 4), (16, 0.5, 3), (16, 0.7, 4)):
    plan = CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=amount, bits=bits) for n in prunable_layers(m)}, float_bits=fb)
    torch.manual_seed(0)
    c = compress(m, plan, d.train.x[:2], calib)
    before = evaluate(c, d.val)
    r = finetune(c, d.train, d.val, FinetuneConfig(epochs=2, lr=0.01, seed=0))
    print(f"fb{fb} u{amount} {bits}b: folded {len(c.autocompress_record.get('folded', []))} BN; val before ft {before:.4f}, "
          f"after {r.val_acc}; test {evaluate(c, d.test):.4f} ({time.time() - t0:.0f}s)", flush=True)
