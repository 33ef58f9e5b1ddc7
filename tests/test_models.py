"""Tests for normlab.models: every architecture × every registered norm, placements, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.models import (
    PLACEMENTS,
    available_models,
    create,
    inception_branch_ends,
    make_conv,
    placement,
)

# Reduced builds: (create kwargs, input shape). Small widths/depths and tiny inputs keep the
# norm sweep fast; the full-size builds are checked separately (parameter counts, shapes).
REDUCED: dict[str, tuple[dict, tuple[int, ...]]] = {
    "small_cnn": (dict(num_classes=10, in_channels=1, width=0.25), (8, 1, 8, 8)),
    "cifar_cnn": (dict(num_classes=10, in_channels=3, width=0.125), (8, 3, 8, 8)),
    "lenet": (
        dict(num_classes=40, in_channels=3, width=1.0, image_size=8, padding=2, fc_norm=True),
        (8, 3, 8, 8),
    ),
    "nin": (dict(num_classes=10, in_channels=3, width=1 / 16), (8, 3, 8, 8)),
    "cnn3": (dict(num_classes=10, in_channels=1, image_size=8, width=0.5), (8, 1, 8, 8)),
    "mlp": (dict(num_classes=10, in_channels=1, image_size=8, depth=2, hidden=16), (8, 1, 8, 8)),
    "convnet4": (dict(num_classes=10, in_channels=3, width=0.25), (8, 3, 16, 16)),
    "vgg": (dict(num_classes=10, in_channels=3, depth=13, width=1 / 16), (8, 3, 8, 8)),
    "resnet_cifar": (dict(num_classes=10, in_channels=3, depth=8, width=0.5), (8, 3, 8, 8)),
    "resnet18_cifar": (
        dict(num_classes=10, in_channels=3, width=1 / 8, blocks=(1, 1, 1, 1)),
        (8, 3, 8, 8),
    ),
    "wrn": (dict(num_classes=10, in_channels=3, depth=10, widen=0.5, dropout=0.3), (8, 3, 8, 8)),
    "densenet": (dict(num_classes=100, in_channels=3, depth=10, growth=4), (8, 3, 8, 8)),
    "inception_v3_cifar": (
        dict(num_classes=10, in_channels=3, width=1 / 8, pad_reductions=True),
        (8, 3, 8, 8),
    ),
    "dcgan_g": (dict(num_classes=1, in_channels=3, width=1 / 16, image_size=8, z_dim=16), (8, 16)),
    "dcgan_d": (dict(num_classes=1, in_channels=3, width=1 / 8, image_size=8), (8, 3, 8, 8)),
    "dcgan": (dict(num_classes=1, in_channels=1, width=1 / 16, image_size=8, z_dim=16), (8, 16)),
}

NORMS = list(normlab.available_norms())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: thread start-up costs more than it saves on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def out_shape(name: str, kw: dict, n: int) -> tuple[int, ...]:
    if name in ("dcgan_g", "dcgan"):
        return (n, kw["in_channels"], kw["image_size"], kw["image_size"])
    return (n, kw["num_classes"])


# The ImageNet networks have their own file (test_models_imagenet.py: full-size counts, shapes,
# every norm); the generic tests here run the CIFAR-scale architectures.
IMAGENET_MODELS = {"resnet18", "resnet50", "resnet101", "resnext50_32x4d"}


def test_every_model_has_a_reduced_config():
    assert set(available_models()) == set(REDUCED) | IMAGENET_MODELS


def run_forward_backward(name: str, norm, conv="plain") -> nn.Module:
    kw, shape = REDUCED[name]
    torch.manual_seed(0)
    model = create(name, norm=norm, conv=conv, **kw)
    x = torch.randn(*shape)
    model.train()
    y = model(x)
    assert y.shape == out_shape(name, kw, shape[0])
    assert torch.isfinite(y).all()
    loss = (model.discriminator(y) if name == "dcgan" else y).float().pow(2).mean()
    loss.backward()
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    assert weights and all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)
    assert any(w.grad.abs().sum() > 0 for w in weights)
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    model.eval()
    with torch.no_grad():
        ye = model(x)
    assert ye.shape == y.shape and torch.isfinite(ye).all()
    return model


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(REDUCED))
def test_model_forward_backward_with_every_norm(name, norm):
    model = run_forward_backward(name, norm)
    if norm not in ("none",):
        # Every norm slot is the registered class for that name.
        cls = type(normlab.make_norm(norm, 4))
        assert any(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_model_with_weight_standardization(name):
    model = run_forward_backward(name, "gn", conv="ws")
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    ws = [m for m in model.modules() if isinstance(m, normlab.WSConv2d)]
    if name != "mlp":
        assert ws and not convs
    else:
        assert any(isinstance(m, normlab.WSLinear) for m in model.modules())


# ------------------------------------------------------------------------------- conv specs
# Qiao et al., Table 4's ablation: "- mean" (Eq. 11 only) = ws(scale=false), "/ std" (Eq. 12 only) =
# ws(center=false), each threaded to every WS layer of every model.
CONV_SPECS = [
    ("ws(center=false)", dict(center=False, scale=True, eps=1e-5)),
    ("ws(scale=false)", dict(center=True, scale=False, eps=1e-5)),
    ({"name": "ws", "center": False, "eps": 1e-4}, dict(center=False, scale=True, eps=1e-4)),
]


def _ws_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, normlab.WSConv2d | normlab.WSLinear)]


def _np_standardized(w: torch.Tensor, center: bool, scale: bool, eps: float) -> np.ndarray:
    """Hand-written oracle of Ŵ: per output unit, optional mean subtraction (Eq. 11) and optional
    division by the population standard deviation with eps inside the root (Eq. 7)."""
    a = w.detach().double().numpy().reshape(w.shape[0], -1)
    mu = a.mean(axis=1, keepdims=True)
    out = a - mu if center else a.copy()
    if scale:
        out = out / np.sqrt(a.var(axis=1, keepdims=True) + eps)
    return out.reshape(w.shape)


@pytest.mark.parametrize("spec_flags", CONV_SPECS, ids=lambda s: str(s[0]))
@pytest.mark.parametrize("name", sorted(REDUCED))
def test_model_with_conv_spec(name, spec_flags):
    spec, flags = spec_flags
    model = run_forward_backward(name, "gn", conv=spec)
    ws = _ws_layers(model)
    assert ws, "the conv spec must produce WS layers"
    for m in ws:
        assert (m.center, m.scale, m.eps) == (flags["center"], flags["scale"], flags["eps"])
    # the same layers become WS as with plain conv="ws" (every conv; an MLP's hidden linears)
    torch.manual_seed(0)
    full = create(name, norm="gn", conv="ws", **REDUCED[name][0])
    assert [n for n, m in model.named_modules() if m in ws] == [
        n for n, m in full.named_modules() if isinstance(m, normlab.WSConv2d | normlab.WSLinear)
    ]
    if name != "mlp":
        assert not [m for m in model.modules() if type(m) is nn.Conv2d]
    # the layer really uses the ablated weight, against a numpy oracle
    m = ws[0]
    np.testing.assert_allclose(
        m.standardized_weight().detach().double().numpy(),
        _np_standardized(m.weight, **flags),
        rtol=1e-5,
        atol=1e-6,
    )


def test_conv_spec_forms_agree_and_plain_is_unchanged():
    kw, shape = REDUCED["resnet_cifar"]
    x = torch.randn(*shape)
    outs = []
    for spec in ("ws", "ws(center=true, scale=true)", {"name": "ws"}, "WS(eps=1e-5)"):
        torch.manual_seed(0)
        model = create("resnet_cifar", norm="gn", conv=spec, **kw).eval()
        outs.append(model(x))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=0, atol=0)
    torch.manual_seed(0)
    plain = create("resnet_cifar", norm="gn", conv="plain", **kw)
    assert not _ws_layers(plain) and any(type(m) is nn.Conv2d for m in plain.modules())
    # the two ablations differ from full WS and from each other
    ys = {}
    for spec in ("ws(center=false)", "ws(scale=false)"):
        torch.manual_seed(0)
        ys[spec] = create("resnet_cifar", norm="gn", conv=spec, **kw).eval()(x)
    assert not torch.allclose(ys["ws(center=false)"], outs[0])
    assert not torch.allclose(ys["ws(scale=false)"], outs[0])
    assert not torch.allclose(ys["ws(center=false)"], ys["ws(scale=false)"])


def test_make_conv_and_make_linear_take_conv_specs():
    from normlab.models._blocks import make_linear

    c = make_conv(4, 6, 3, conv="ws(scale=false, eps=0.001)")
    assert isinstance(c, normlab.WSConv2d) and (c.center, c.scale, c.eps) == (True, False, 1e-3)
    assert type(make_conv(4, 6, 3, conv="plain")) is nn.Conv2d
    lin = make_linear(4, 6, ws="ws(center=false)")
    assert isinstance(lin, normlab.WSLinear) and (lin.center, lin.scale) == (False, True)
    assert type(make_linear(4, 6, ws="plain")) is nn.Linear
    assert type(make_linear(4, 6, ws=True)) is normlab.WSLinear
    assert type(make_linear(4, 6)) is nn.Linear


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("ws(centre=false)", ["centre", "False", "eps", "center", "scale"]),
        ("ws(center=1)", ["center", "1", "true or false", "eps, center, scale"]),
        ("ws(scale=maybe)", ["scale", "maybe"]),
        ("ws(eps=-1)", ["eps", "-1", "non-negative"]),
        ("ws(eps=true)", ["eps", "True"]),
        ("plain(eps=1e-4)", ["plain", "eps", "no arguments"]),
        ("octave", ["octave", "plain", "ws"]),
        ("ws(center=", ["ws(center=", "conv spec"]),
        ("ws(false)", ["keyword", "conv spec"]),
        ({"name": "ws", "mean": False}, ["mean", "eps, center, scale"]),
        ({"center": False}, ["name", "conv spec"]),
        (3, ["conv", "int"]),
    ],
)
def test_bad_conv_spec_names_the_problem(spec, needles):
    with pytest.raises(ValueError) as ei:
        create("small_cnn", 10, 1, conv=spec)
    msg = str(ei.value)
    assert msg.startswith("conv:"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "norm spec" not in msg


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ValueError, match="small_cnn"):
        create("alexnet", 10)
    with pytest.raises(ValueError, match="conv"):
        create("small_cnn", 10, 1, conv="octave")
    with pytest.raises(ValueError, match="valid arguments"):
        create("small_cnn", 10, 1, depth=3)
    with pytest.raises(ValueError, match="6n\\+2"):
        create("resnet_cifar", 10, depth=21)
    with pytest.raises(ValueError, match="unknown normalization"):
        create("small_cnn", 10, 1, norm="fancy")


# ------------------------------------------------------------------------------- placements
def convert_names(model: nn.Module, include) -> list[str]:
    return normlab.convert(model, "affine", include=include)


def test_cifar_cnn_placements_and_table1_shapes():
    model = create("cifar_cnn", 10, 3)
    assert convert_names(model, "conv3.*") == ["conv3.norm"]
    # Kalayeh & Shah, Table 1 sizes: 64x32x32, 64x16x16, 128x16x16, 128x8x8, 128x8x8, 128x4x4,
    # 256x4x4, 256x1x1.
    x = torch.randn(2, 3, 32, 32)
    sizes = {}
    for name, m in model.named_children():
        x = m(x)
        sizes[name] = tuple(x.shape[1:])
    assert sizes["conv1"] == (64, 32, 32) and sizes["pool1"] == (64, 16, 16)
    assert sizes["conv2"] == (128, 16, 16) and sizes["pool2"] == (128, 8, 8)
    assert sizes["conv3"] == (128, 8, 8) and sizes["pool3"] == (128, 4, 4)
    assert sizes["conv4"] == (256, 4, 4) and sizes["pool4"] == (256, 1, 1) and sizes["fc"] == (10,)
    conv1 = model.conv1.conv
    assert conv1.kernel_size == (5, 5) and conv1.padding == (2, 2)
    assert model.conv4.conv.kernel_size == (3, 3)


def test_inception_placements_and_final_map():
    model = create("inception_v3_cifar", 10, 3, width=0.25)
    names = [n for n, _ in model.named_children()]
    for layer in ("red1", "red2", "inc1_0", "inc1_2", "inc2_0", "inc2_3", "inc3_0", "inc3_1"):
        assert layer in names
    assert model.conv1.conv.stride == (
        1,
        1,
    )  # Kalayeh & Shah: first conv stride 1, first max-pool removed
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.children()) == 1
    # Kalayeh & Shah, Sec. 4.3: output stride 8, final map 3x3 for 32x32 input.
    x = torch.randn(2, 3, 32, 32)
    for name, m in model.named_children():
        x = m(x)
        if name == "inc3_1":
            assert x.shape[-2:] == (3, 3)
    # "inc2/0/2/4": the fifth norm of the third branch of the first layer of block 2.
    assert convert_names(model, "inc2_0.branch2.4.norm") == ["inc2_0.branch2.4.norm"]
    ends = model.branch_end_norms("inc2_0", "inc3_0")
    assert "inc2_0.branch2.4.norm" in ends and "inc3_0.branch1.1.a.norm" in ends
    assert len(ends) == 4 + 6  # 4 branches; inc3 has two split branches (2 norms each)
    assert convert_names(model, ends) == ends
    red = convert_names(model, "red1.*")
    assert len(red) == 1 + 3 and all(n.startswith("red1.") for n in red)
    assert len(convert_names(model, "inc3_0.*")) == 9
    with pytest.raises(ValueError, match="Inception layer"):
        model.branch_end_norms("conv1")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_densenet_transitions_addressable():
    model = create("densenet", 100, 3, depth=10, growth=4)
    assert convert_names(model, ["trans*.norm", "final.norm"]) == [
        "trans1.norm",
        "trans2.norm",
        "final.norm",
    ]
    assert len(convert_names(model, "dense2.*")) == 2
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 100)


def test_dcgan_generator_first_two_deconvs_addressable():
    model = create("dcgan", 1, 3, g_norm="bn", d_norm="none", width=1 / 16, image_size=8, z_dim=8)
    names = convert_names(model, ["generator.deconv1.norm", "generator.deconv2.norm"])
    assert names == ["generator.deconv1.norm", "generator.deconv2.norm"]
    assert isinstance(model.discriminator.conv2.norm, normlab.NoNorm)
    assert not hasattr(model.discriminator.conv1, "norm")  # the first D layer has no norm slot
    assert isinstance(model.generator.deconv3.norm, normlab.BatchNorm)
    img = model.sample(3, torch.Generator().manual_seed(0))
    assert img.shape == (3, 3, 8, 8) and img.abs().max() <= 1


def test_resnet_and_vgg_names():
    model = create("resnet_cifar", 10, depth=20)
    assert len(convert_names(model, "layer2.*")) == 6  # 3 blocks x 2 norms (option A shortcut)
    assert len(convert_names(model, "*")) == 1 + 18
    b = create("resnet_cifar", 10, depth=20, shortcut="B")
    assert len(convert_names(b, "*")) == 1 + 18 + 2
    v = create("vgg", 10, depth=19, width=1 / 16)
    assert len(convert_names(v, "conv*.norm")) == 16  # Huang et al.: 16 conv layers
    assert [m for m in v.modules() if isinstance(m, nn.Linear)].__len__() == 1
    assert convert_names(create("convnet4", 10), "conv4.*") == ["conv4.norm"]


def test_nin_dropout_and_mlp_depth():
    m = create("nin", 10)
    drops = [d for d in m.modules() if isinstance(d, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.25 for d in drops)
    assert len(convert_names(m, "conv*.norm")) == 9
    mlp = create("mlp", 10, 1, depth=4, hidden=100, image_size=28)
    lin = [l for l in mlp.modules() if isinstance(l, nn.Linear)]
    assert [l.out_features for l in lin] == [100, 100, 100, 100, 10]
    c3 = create("cnn3", 10, 1)
    convs = [c for c in c3.modules() if isinstance(c, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 16, 8]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)


SMALL_KW = {
    "cifar_cnn": dict(width=0.125),
    "inception_v3_cifar": dict(width=1 / 16),
    "densenet": dict(depth=10, growth=4),
    "dcgan": dict(width=1 / 16),
    "dcgan_g": dict(width=1 / 16),
    **{name: dict(width=1 / 16) for name in IMAGENET_MODELS},
}


@pytest.mark.parametrize("key", sorted(PLACEMENTS))
def test_paper_placements_match_models(key):
    name, include = placement(key)
    model = create(name, 10, 3, **SMALL_KW[name])
    assert convert_names(model, include) == include  # every listed name exists and is a norm
    if name == "inception_v3_cifar":
        layers = list(dict.fromkeys(n.split(".")[0] for n in include))
        assert model.branch_end_norms(*layers) == inception_branch_ends(*layers)


# -------------------------------------------------------------------------- full-size counts
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,kw,expected,rel",
    [
        # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M.
        ("resnet_cifar", dict(depth=20), 0.27e6, 0.02),
        ("resnet_cifar", dict(depth=56), 0.85e6, 0.02),
        ("resnet_cifar", dict(depth=110), 1.7e6, 0.03),
        # Huang et al. 2017 Table 2: DenseNet (L=40, k=12) 1.0M, (L=100, k=12) 7.0M.
        ("densenet", dict(depth=40, growth=12), 1.0e6, 0.03),
        ("densenet", dict(depth=100, growth=12), 7.0e6, 0.03),
        # Zagoruyko & Komodakis 2016: WRN-28-10 36.5M.
        ("wrn", dict(depth=28, widen=10), 36.5e6, 0.01),
        # ResNet-18 for CIFAR (Qiao et al., Table 8): 11.17M with a 10-way classifier.
        ("resnet18_cifar", {}, 11.17e6, 0.01),
    ],
)
def test_full_size_parameter_counts(name, kw, expected, rel):
    model = create(name, 10, 3, **kw)
    assert abs(n_params(model) - expected) / expected < rel


def test_inception_matches_reference_parameter_count():
    # The reference Inception-V3 (1000 classes) without its auxiliary head has 23,834,568
    # parameters; the CIFAR modification changes strides and pooling only.
    assert n_params(create("inception_v3_cifar", 1000, 3)) == 23_834_568


def test_densenet40_last_norm_sees_448_channels():
    # Kalayeh & Shah, Sec. 5 (Table 7): the last BN/MN of DenseNet-40 sees 448 channels.
    assert create("densenet", 100, 3, depth=40).final.norm.num_features == 448


def test_small_cnn_learns_digits():
    # Integration check on real data: a couple of epochs reach high test accuracy.
    from normlab.data import augment, load_dataset

    d = load_dataset("digits")
    torch.manual_seed(0)
    model = create("small_cnn", d.num_classes, d.in_channels, norm="bn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(d.train_y), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            x = augment(d.train_x[idx], pad=1, flip=False, generator=g)
            loss = nn.functional.cross_entropy(model(x), d.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(d.test_x).argmax(1) == d.test_y).float().mean().item()
    assert acc > 0.9


FULL: dict[str, tuple[dict, tuple[int, ...], tuple[int, ...]]] = {
    "small_cnn": (dict(num_classes=10, in_channels=1), (2, 1, 8, 8), (2, 10)),
    "cifar_cnn": (dict(num_classes=10), (2, 3, 32, 32), (2, 10)),
    "lenet": (dict(num_classes=40), (2, 3, 32, 32), (2, 40)),
    "nin": (dict(num_classes=10), (2, 3, 32, 32), (2, 10)),
    "cnn3": (dict(num_classes=10, in_channels=1), (2, 1, 28, 28), (2, 10)),
    "mlp": (dict(num_classes=10, in_channels=1), (2, 1, 28, 28), (2, 10)),
    "convnet4": (dict(num_classes=10), (2, 3, 32, 32), (2, 10)),
    "vgg": (dict(num_classes=10, depth=19), (2, 3, 32, 32), (2, 10)),
    "resnet_cifar": (dict(num_classes=10, depth=110), (2, 3, 32, 32), (2, 10)),
    "resnet18_cifar": (dict(num_classes=10), (2, 3, 32, 32), (2, 10)),
    "wrn": (dict(num_classes=10, depth=28, widen=10), (2, 3, 32, 32), (2, 10)),
    "densenet": (dict(num_classes=100, depth=100), (2, 3, 32, 32), (2, 100)),
    "inception_v3_cifar": (dict(num_classes=100), (2, 3, 32, 32), (2, 100)),
    "dcgan_g": (dict(num_classes=1), (2, 128), (2, 3, 32, 32)),
    "dcgan_d": (dict(num_classes=1), (2, 3, 32, 32), (2, 1)),
    "dcgan": (dict(num_classes=1), (2, 128), (2, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_forward_backward(name):
    kw, shape, out = FULL[name]
    model = create(name, **kw)
    y = model(torch.randn(*shape))
    assert y.shape == out
    y.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
