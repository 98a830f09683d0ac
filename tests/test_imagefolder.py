"""ImageNet-style data: image folders generated here (PNG and JPEG, 3 classes, mixed sizes)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from autocompress.cli import main
from autocompress.data import IMAGENET_MEAN, IMAGENET_STD, load_data
from autocompress.errors import UserError
from autocompress.models import build_model, natural_image_size

COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))  # one dominant channel per class


def write_folder(root, per_class: int = 10, layout: tuple[str, ...] = ("",), sizes=((20, 16), (24, 24)),
                 mode: str = "RGB", seed: int = 0) -> None:
    """`per_class` noisy images of each of 3 classes under root/<split>/<class>/, PNG and JPEG alternating."""
    rng = np.random.default_rng(seed)
    for split in layout:
        for c, colour in enumerate(COLOURS):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                pixels = np.clip(np.array(colour) + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, "RGB").convert(mode)
                img.save(os.path.join(folder, f"{i}.{'png' if i % 2 else 'jpg'}"))


def test_single_folder_rgb_resized_cropped_and_split(tmp_path):
    write_folder(tmp_path, per_class=10)
    b = load_data(f"imagefolder:{tmp_path}", image_size=12, val_fraction=0.25, seed=0)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, 12)
    for part in (b.train, b.val, b.test):
        assert part.x.shape[1:] == (3, 12, 12) and part.x.dtype == torch.float32
    assert len(b.test) == 6 and len(b.train) + len(b.val) == 24 and len(b.val) == 6
    assert sorted(b.test.y.tolist()) == [0, 0, 1, 1, 2, 2] and sorted(b.val.y.tolist()) == [0, 0, 1, 1, 2, 2]
    rows = lambda t: {r.tobytes() for r in t.x.flatten(1).numpy()}  # noqa: E731
    assert not rows(b.train) & rows(b.val) and not rows(b.train) & rows(b.test) and not rows(b.val) & rows(b.test)
    # each class's dominant channel is the brightest one after normalisation
    for part in (b.train, b.val, b.test):
        assert torch.equal(part.x.mean(dim=(2, 3)).argmax(dim=1), part.y)


def test_normalised_with_imagenet_statistics(tmp_path):
    for c in ("a", "b"):
        os.makedirs(tmp_path / c)
        for i in range(3):
            Image.new("RGB", (9, 7), (10 + 100 * i, 128, 250)).save(tmp_path / c / f"{i}.png")
    b = load_data(f"imagefolder:{tmp_path}", image_size=5, val_fraction=0.0)
    x = torch.cat([b.train.x, b.test.x])
    raw = torch.tensor([[10 + 100 * i, 128, 250] for i in range(3)], dtype=torch.float32) / 255
    expected = {tuple(((r - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).round(decimals=4).tolist())
                for r in raw}
    got = {tuple(v.round(decimals=4).tolist()) for v in x[:, :, 2, 2]}
    assert got == expected
    assert torch.allclose(x, x[:, :, :1, :1].expand_as(x), atol=1e-5)  # a solid colour stays solid


def test_train_and_val_folders_are_train_and_test(tmp_path):
    write_folder(tmp_path, per_class=6, layout=("train",))
    write_folder(tmp_path, per_class=2, layout=("val",), seed=1)
    b = load_data(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.5)
    assert (len(b.train), len(b.val), len(b.test)) == (9, 9, 6)
    assert sorted(b.test.y.tolist()) == [0, 0, 1, 1, 2, 2]


def test_train_folder_alone_is_the_single_folder(tmp_path):
    write_folder(tmp_path, per_class=5, layout=("train",))
    b = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert b.num_classes == 3 and len(b.test) == 3 and len(b.train) + len(b.val) == 12


def test_val_folder_beside_test_is_the_validation_split(tmp_path):
    write_folder(tmp_path, per_class=5, layout=("train",))
    write_folder(tmp_path, per_class=2, layout=("val",), seed=1)
    write_folder(tmp_path, per_class=1, layout=("test",), seed=2)
    b = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(b.train), len(b.val), len(b.test)) == (15, 6, 3)


def test_grey_images_are_read_as_rgb(tmp_path):
    write_folder(tmp_path, per_class=4, mode="L")
    b = load_data(f"imagefolder:{tmp_path}", image_size=6)
    assert b.in_channels == 3 and b.train.x.shape[1:] == (3, 6, 6)


def test_default_size_is_the_models(tmp_path):
    write_folder(tmp_path, per_class=3)
    spec = f"imagefolder:{tmp_path}"
    assert load_data(spec, model="torchvision:resnet18").image_size == 224
    assert load_data(spec, model="lenet5").image_size == 28
    assert load_data(spec, model="tests/conftest_models.py:TinyResNet").image_size == 8  # its image_size default
    with pytest.raises(UserError, match="different sizes.*pass --image-size N"):
        load_data(spec)  # a model that does not say, and images of two sizes
    assert load_data(spec, image_size=10, model="torchvision:resnet18").image_size == 10  # the flag wins
    assert natural_image_size("torchvision:inception_v3") == 299 and natural_image_size("no/such.pt") is None


def test_uniform_images_keep_their_size_without_a_model(tmp_path):
    write_folder(tmp_path, per_class=3, sizes=((7, 7),))
    assert load_data(f"imagefolder:{tmp_path}").image_size == 7


def test_torchvision_classifier_takes_rgb_natively(tmp_path):
    write_folder(tmp_path, per_class=3)
    b = load_data(f"imagefolder:{tmp_path}", image_size=32)
    net = build_model("torchvision:resnet18", b.num_classes, b.in_channels, b.image_size)
    assert net.conv1.weight.shape == (64, 3, 7, 7)
    assert net.eval()(b.train.x[:2]).shape == (2, 3)
    grey = build_model("torchvision:resnet18", 10, 1, 28)  # grey data: the stem takes one channel
    assert grey.conv1.weight.shape == (64, 1, 7, 7)


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "not found"),
    (lambda p: os.makedirs(p), "no class folders"),
    (lambda p: os.makedirs(os.path.join(p, "cat")), "no class folders"),
    (lambda p: open(p, "w").close(), "not found"),
])
def test_missing_or_empty_folder_is_one_line(tmp_path, make, needle):
    root = str(tmp_path / "imgs")
    make(root)
    with pytest.raises(UserError, match=needle) as e:
        load_data(f"imagefolder:{root}", image_size=8)
    assert "\n" not in str(e.value)


def test_mismatched_classes_and_corrupt_images(tmp_path):
    write_folder(tmp_path / "a", per_class=2, layout=("train", "test"))
    os.rename(tmp_path / "a" / "test" / "class2", tmp_path / "a" / "test" / "other")
    with pytest.raises(UserError, match="different class folders"):
        load_data(f"imagefolder:{tmp_path / 'a'}", image_size=8)
    write_folder(tmp_path / "b", per_class=2)
    (tmp_path / "b" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read an image"):
        load_data(f"imagefolder:{tmp_path / 'b'}", image_size=8)


@pytest.mark.slow
def test_cli_search_with_a_checkpoint_on_an_image_folder(tmp_path, capsys):
    """The README's command at toy scale: a user's model and checkpoint, an image folder, --image-size."""
    from autocompress.artifact import load, read_header
    from tests.conftest_models import TinyResNet

    data = tmp_path / "imgs"
    write_folder(data, per_class=12)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(TinyResNet(num_classes=3, in_channels=3, image_size=16).state_dict(), ckpt)
    out = tmp_path / "runs"
    code = main(["search", "--model", "tests/conftest_models.py:TinyResNet", "--weights", str(ckpt),
                 "--data", f"imagefolder:{data}", "--image-size", "16", "--budget", "4x", "--trials", "2",
                 "--max-batches", "2", "--no-warm-start", "--final-top", "0", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    header = read_header(str(out / "best.acz"))
    assert (header["spec"]["in_channels"], header["spec"]["image_size"], header["spec"]["num_classes"]) == (3, 16, 3)
    assert load(str(out / "best.acz"))(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.acz")]) == 0  # finds the folder and its size from the artifact
    assert "on imagefolder:" in capsys.readouterr().out
