"""Built-in models and user model specs.

A model spec is a string the user passes to --model and the artifact stores so that `load()`
can rebuild the architecture: a built-in name (lenet5, mlp, resnet18), `torchvision:NAME`,
`module:callable`, `path/file.py:callable`, or the path of a saved module
(`torch.save(model)` or TorchScript).
"""
from __future__ import annotations

import collections
import inspect
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError
from .userspec import import_callable

BUILTIN_MODELS = ("lenet5", "mlp", "resnet18")


class LeNet5(nn.Module):
    """LeNet-5 as in Han et al.: conv 20-50 (5x5), fc 800-500-10 on 28x28 inputs (431,080 params)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        pad = 0 if image_size >= 20 else 2  # keep small inputs (8x8 digits) from shrinking to nothing
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            n = self._features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc1 = nn.Linear(n, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self._features(x))))


class MLP(nn.Module):
    """LeNet-300-100: a fully connected 300-100 network on flattened images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def resnet18_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """torchvision ResNet-18 for small grey images: 3x3 stem, stride 1, no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the uncompressed architecture (stored in the artifact)."""

    spec: str
    num_classes: int
    in_channels: int
    image_size: int
    data: str | None = None  # the data spec it was trained on, so `evaluate` can find its test split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _call_with_supported(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a user factory with whichever of num_classes/in_channels/image_size it accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d when the data has a different number of input channels."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels != in_channels:
                new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                mod.padding, mod.dilation, mod.groups, mod.bias is not None)
                set_submodule(model, name, new)
            return


TORCHVISION_SIZE = 224
TORCHVISION_SIZES = {"inception_v3": 299}  # the torchvision classifiers not built for 224 x 224


def natural_image_size(spec: str) -> int | None:
    """The input size a model spec is built for, used for image folders without --image-size.

    28 for the built-ins, 224 for torchvision classifiers (299 for inception_v3), the default of a
    user factory's `image_size` parameter; None when the spec does not say (a saved module).
    """
    if spec in BUILTIN_MODELS:
        return 28
    if spec.startswith("torchvision:"):
        return TORCHVISION_SIZES.get(spec.split(":", 1)[1], TORCHVISION_SIZE)
    if os.path.isfile(spec) or ":" not in spec:
        return None
    try:
        param = inspect.signature(import_callable(spec, "--model")).parameters.get("image_size")
    except (UserError, TypeError, ValueError):
        return None
    return param.default if param is not None and isinstance(param.default, int) else None


def build_model(spec: str | ModelSpec, num_classes: int = 10, in_channels: int = 1,
                image_size: int = 28) -> nn.Module:
    """Build an (untrained unless the spec is a saved module) model from a spec string."""
    if isinstance(spec, ModelSpec):
        spec, num_classes, in_channels, image_size = spec.spec, spec.num_classes, spec.in_channels, spec.image_size
    kw = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if spec == "lenet5":
        return LeNet5(**kw)
    if spec == "mlp":
        return MLP(**kw)
    if spec == "resnet18":
        return resnet18_small(**kw)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        try:
            fn = torchvision.models.get_model_builder(name)
        except ValueError:
            raise UserError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from None
        model = fn(weights=None, num_classes=num_classes)
        _adapt_first_conv(model, in_channels)  # grey data; RGB data keeps the model's own 3-channel stem
        return model
    if os.path.isfile(spec):
        return load_saved_module(spec)
    if ":" in spec and not spec.startswith(("/", ".")) or spec.rpartition(":")[0].endswith(".py"):
        model = _call_with_supported(import_callable(spec, "--model"), **kw)
        if not isinstance(model, nn.Module):
            raise UserError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise UserError(
        f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)}, torchvision:NAME, "
        "module:callable, path/file.py:callable, or the path of a saved module")


def load_saved_module(path: str) -> nn.Module:
    """Load a whole saved module: TorchScript first, then a pickled nn.Module."""
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception:
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read saved model {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(obj, nn.Module):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a saved nn.Module; "
                        "pass a state dict with --weights and the architecture with --model")
    return obj


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict (or a checkpoint dict holding one under 'state_dict'/'model') into model."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(e).__name__})") from None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds no state dict")
    try:
        model.load_state_dict(with_metadata(state, model))
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit the model: {first}") from None


def with_metadata(state: dict, model: nn.Module) -> dict:
    """`state` carrying `model`'s per-module version metadata when it has none of its own.

    A state dict rebuilt as a plain dict (`{k: v.cpu() for ...}`) loses the `_metadata` that
    `state_dict()` attaches, and some torchvision modules refuse to load without it (MNASNet
    raises "version should be set to 1 or 2"). The checkpoint is taken to come from the same code."""
    if getattr(state, "_metadata", None) is not None:
        return state
    out = collections.OrderedDict(state)
    out._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    return out


def logits_of(output: Any) -> torch.Tensor:
    """A model's main logits: the first field of a tuple output (GoogLeNet and Inception-v3 return
    their auxiliary classifiers' logits after the main ones in training mode)."""
    return output[0] if isinstance(output, tuple) else output


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name` (a dotted path, as named_modules gives it)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class WeightSlot:
    """What a plan can do to one kind of layer: the weight tensors it compresses (all with the
    same layer plan), the axis of their output channels, and which structural options apply.

    channel: physical channel pruning (torch-pruning); lowrank: truncated-SVD factorisation;
    int8: the CPU deployment runs it with int8 kernels (otherwise it stays float there, while
    the artifact still stores it at its planned bits)."""

    attrs: tuple[str, ...]
    axis: int = 0
    channel: bool = False
    lowrank: bool = False
    int8: bool = False


# Module type -> its slot. Looked up along the type's MRO, so subclasses (out_proj's
# NonDynamicallyQuantizableLinear, parametrized classes) find their base's entry.
WEIGHT_SLOTS: dict[type, WeightSlot] = {
    nn.Linear: WeightSlot(("weight",), 0, channel=True, lowrank=True, int8=True),
    nn.Conv2d: WeightSlot(("weight",), 0, channel=True, lowrank=True, int8=True),
    nn.Conv1d: WeightSlot(("weight",), 0, channel=True),
    nn.ConvTranspose2d: WeightSlot(("weight",), 1),
    nn.Embedding: WeightSlot(("weight",), 0),
    nn.MultiheadAttention: WeightSlot(("in_proj_weight",), 0),
}
_MHA_SEPARATE = WeightSlot(("q_proj_weight", "k_proj_weight", "v_proj_weight"), 0)


def weight_slot(module: nn.Module) -> WeightSlot | None:
    """The slot of a module (None when no plan can address it)."""
    for cls in type(module).__mro__:
        slot = WEIGHT_SLOTS.get(cls)
        if slot is not None:
            if cls is nn.MultiheadAttention and not module._qkv_same_embed_dim:
                return _MHA_SEPARATE
            return slot
    return None


def layer_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(attribute, tensor) of each weight a plan compresses in this layer."""
    slot = weight_slot(module)
    return [(a, getattr(module, a)) for a in slot.attrs] if slot else []


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The layer's (first) planned weight: for shapes, counts and importance heuristics."""
    return getattr(module, weight_slot(module).attrs[0])


def layer_numel(module: nn.Module) -> int:
    """Number of weights a plan compresses in this layer (all its slots together)."""
    return sum(t.numel() for _, t in layer_weights(module))


def batchnorm_scale(bn: nn.Module) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel (gamma = 1 without affine): the scale a
    BatchNorm folded into the layer before it puts on that layer's weights."""
    g = torch.rsqrt(bn.running_var + bn.eps)
    return g * bn.weight if bn.weight is not None else g


HALF_MAX = 65504.0  # the largest finite float16


def half_round(t: torch.Tensor) -> torch.Tensor:
    """A float tensor rounded to the float16 value it is stored as (float_bits=16), saturating at
    +-HALF_MAX: a folded bias of a BatchNorm with a near-zero variance would otherwise be stored as
    inf. Here, below compression/ and artifact, so both round alike."""
    return t.clamp(-HALF_MAX, HALF_MAX).half().float()


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the layers a plan can address (those with a WeightSlot), in module order."""
    return [n for n, m in model.named_modules() if n and weight_slot(m) is not None
            and all(isinstance(t, torch.Tensor) for _, t in layer_weights(m))]


def hash_weights(h: Any, model: nn.Module) -> None:
    """Feed each state-dict entry of `model` (its name, then its bytes) into the hashlib object `h`:
    what identifies trained weights, where a cache key (the recipe that trained them) does not."""
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())


def param_bytes(model: nn.Module) -> int:
    """fp32 size of the model's parameters: the 'original size' that ratio budgets refer to."""
    return sum(p.numel() for p in model.parameters()) * 4
