"""Tests for normlab.models.imagenet: ImageNet ResNet-18/50/101 and ResNeXt-50 (32×4d)."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import normlab
import normlab.models.imagenet as imagenet_module
from normlab.models import (
    FEATURE_NORM,
    FIRST_NORM,
    PLACEMENTS,
    available_models,
    create,
    model_descriptions,
    placement,
)

NETS = ["resnet18", "resnet50", "resnet101", "resnext50_32x4d"]
# The standard parameter counts with BN and a 1000-way classifier (He et al. 2016; Xie et al. 2017).
STANDARD_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
}
# Convolutions (stem + blocks + projection shortcuts), each followed by one norm.
CONVS = {"resnet18": 1 + 16 + 3, "resnet50": 1 + 48 + 4, "resnet101": 1 + 99 + 4}
CONVS["resnext50_32x4d"] = CONVS["resnet50"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta(name: str, *args, **kw) -> nn.Module:
    with torch.device("meta"):  # full size without allocating or initializing real weights
        return create(name, *args, **kw)


# ----------------------------------------------------------------------------- sizes and shapes
def test_registered_with_descriptions():
    assert set(NETS) <= set(available_models())
    assert all(model_descriptions()[n] for n in NETS)


@pytest.mark.parametrize("name", NETS)
def test_parameter_counts_with_bn_are_the_standard_ones(name):
    model = meta(name, 1000)
    assert n_params(model) == STANDARD_PARAMS[name]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == CONVS[name] and all(c.bias is None for c in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == CONVS[name]
    # the feature slot is an identity without parameters unless asked for
    assert type(model.feature_norm).__name__ == "NoNorm"
    with_df = meta(name, 1000, feature_norm="iternorm")
    width = 512 if name == "resnet18" else 2048
    assert n_params(with_df) == STANDARD_PARAMS[name] + 2 * width


@pytest.mark.parametrize("name", NETS)
def test_stage_shapes_at_224(name):
    # He et al. 2016, Table 1: output sizes 112, 56, 56, 28, 14, 7.
    model = meta(name, 1000)
    x = torch.empty(2, 3, 224, 224, device="meta")
    shapes = {}
    for child, module in model.named_children():
        x = module(x)
        shapes[child] = tuple(x.shape[1:])
    k = 1 if name == "resnet18" else 4
    assert shapes["conv1"] == (64, 112, 112) and shapes["maxpool"] == (64, 56, 56)
    assert shapes["layer1"] == (64 * k, 56, 56) and shapes["layer2"] == (128 * k, 28, 28)
    assert shapes["layer3"] == (256 * k, 14, 14) and shapes["layer4"] == (512 * k, 7, 7)
    assert shapes["fc"] == (1000,)
    stem = model.conv1.conv
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.padding == (3, 3)


def test_resnext_grouped_bottlenecks():
    model = meta("resnext50_32x4d", 1000)
    mids = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        conv = stage[0].conv2.conv
        assert conv.groups == 32 and conv.kernel_size == (3, 3)
        mids.append(conv.out_channels)
    assert mids == [128, 256, 512, 1024]  # 32 groups × 4, 8, 16, 32 channels
    # the stride sits on the 3×3 convolution, the shortcut projects with stride 2
    assert model.layer2[0].conv2.conv.stride == (2, 2)
    assert model.layer2[0].conv1.conv.stride == (1, 1)
    assert model.layer2[0].shortcut.conv.stride == (2, 2)
    resnet = meta("resnet50", 1000)
    assert [s[0].conv2.conv.out_channels for s in (resnet.layer1, resnet.layer4)] == [64, 512]


# ------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("norm,conv", [("bn", "plain"), ("gn", "plain"), ("gn", "ws")])
@pytest.mark.parametrize("name", NETS)
def test_forward_backward_small_input(name, norm, conv):
    torch.manual_seed(0)
    model = create(name, 10, 3, norm=norm, conv=conv)
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.conv.weight.grad.abs().sum() > 0
    kind = nn.GroupNorm if norm == "gn" else nn.modules.batchnorm._BatchNorm
    assert isinstance(model.layer3[0].conv2.norm, kind)
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    ws = [m for m in model.modules() if isinstance(m, normlab.WSConv2d)]
    assert (not plain and len(ws) == CONVS[name]) if conv == "ws" else (not ws)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_reduced_builds_for_quick_tests():
    model = create("resnext50_32x4d", 10, 3, width=1 / 8, blocks=(1, 1, 1, 1), groups=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(model.layer1) == 1 and model.layer1[0].conv2.conv.groups == 4
    r18 = create("resnet18", 7, 1, width=0.25, blocks=(1, 2))
    assert r18(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert r18.fc.in_features == 32 and not hasattr(r18, "layer3")


# --------------------------------------------------------------------------- zero-init residual
def test_zero_init_residual_is_off_by_default():
    model = create("resnet18", 10, width=0.25)
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_makes_every_block_start_as_the_identity(name):
    model = create(name, 10, width=0.25, zero_init_residual=True)
    last = "conv2" if name == "resnet18" else "conv3"
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            norm = getattr(block, last).norm
            assert torch.count_nonzero(norm.weight) == 0
            assert torch.equal(block.conv1.norm.weight, torch.ones_like(block.conv1.norm.weight))
    # a block with an identity shortcut returns relu(x) (its input is post-ReLU: x itself)
    x = torch.relu(torch.randn(2, model.layer1[1].conv1.conv.in_channels, 8, 8))
    torch.testing.assert_close(model.layer1[1](x), x, rtol=0, atol=0)


def test_zero_init_residual_with_bcn_zeroes_the_group_scale_and_needs_a_scale():
    model = create("resnet18", 10, norm="bcn", width=0.25, blocks=(2,), zero_init_residual=True)
    norm = model.layer1[0].conv2.norm
    assert torch.count_nonzero(norm.group_weight) == 0
    x = torch.relu(torch.randn(4, 16, 8, 8))
    torch.testing.assert_close(model.layer1[1](x), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="zero_init_residual=True needs a norm"):
        create("resnet18", 10, norm="none", zero_init_residual=True, width=0.25)
    with pytest.raises(TypeError, match="zero_init_residual must be true or false"):
        create("resnet18", 10, zero_init_residual="yes", width=0.25)


# ---------------------------------------------------------------------------------- placements
IMAGENET_PLACEMENTS = sorted(k for k in PLACEMENTS if PLACEMENTS[k][0] in NETS)


def test_huang_placements_are_listed():
    assert [
        f"iternorm/{net}/{p}"
        for net in ("resnet101", "resnet18", "resnet50")
        for p in ("l1", "l1+df")
    ] == IMAGENET_PLACEMENTS
    assert placement("iternorm/resnet18/l1") == ("resnet18", ["conv1.norm"])
    assert placement("iternorm/resnet50/l1+df") == ("resnet50", ["conv1.norm", "feature_norm"])
    assert (FIRST_NORM, FEATURE_NORM) == ("conv1.norm", "feature_norm")


@pytest.mark.parametrize("key", IMAGENET_PLACEMENTS)
def test_placements_convert_the_named_slots(key):
    name, include = placement(key)
    torch.manual_seed(0)
    model = create(name, 10, 3, width=1 / 8, blocks=(1, 1, 1, 1))
    assert normlab.convert(model, "iternorm(group_size=8)", include=include) == include
    assert isinstance(model.conv1.norm, normlab.IterNorm)
    whitened = [n for n, m in model.named_modules() if isinstance(m, normlab.IterNorm)]
    assert whitened == include  # the rest stays BN
    assert isinstance(model.layer1[0].conv1.norm, nn.modules.batchnorm._BatchNorm)
    y = model(torch.randn(8, 3, 32, 32))
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    y.sum().backward()
    if FEATURE_NORM in include:
        assert model.feature_norm.weight.grad is not None


def test_feature_slot_is_an_identity_and_convertible():
    model = create("resnet18", 10, width=1 / 8)
    feats = torch.randn(4, model.fc.in_features)
    assert torch.equal(model.feature_norm(feats), feats)
    # "IterNorm-Full" keeps the slot an identity when written as explicit patterns ...
    names = normlab.convert(model, "affine", include=[FIRST_NORM, "layer*"])
    assert FEATURE_NORM not in names and len(names) == CONVS["resnet18"]
    # ... while "*" reaches the feature slot too (documented)
    assert FEATURE_NORM in normlab.convert(create("resnet18", 10, width=1 / 8), "affine")
    built = create("resnet18", 10, width=1 / 8, feature_norm="dbn(group_size=4)")
    assert isinstance(built.feature_norm, normlab.DBN)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("resnet18", dict(blocks=()), "blocks must be a non-empty list"),
        ("resnet50", dict(blocks=(3, 0)), "blocks must be a non-empty list"),
        ("resnext50_32x4d", dict(groups=0), "groups must be a positive integer, got 0"),
        ("resnext50_32x4d", dict(width_per_group=2.5), "width_per_group must be a positive"),
        ("resnet18", dict(width=0), "width must be a positive multiplier"),
        ("resnet18", dict(groups=2), "valid arguments"),  # basic-block nets have no groups
        ("resnet50", dict(feature_norm="fancy"), "unknown normalization"),
    ],
)
def test_bad_arguments(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create(name, 10, **kw)


def test_docstring_examples_run():
    result = doctest.testmod(
        imagenet_module,
        extraglobs={"torch": torch, "normlab": normlab},
        optionflags=doctest.ELLIPSIS,
    )
    assert result.attempted >= 12 and result.failed == 0
