import pytest
import torch
from torch import nn

import normlab


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class CifarLike(nn.Module):
    """Conv blocks named conv1..conv4 as in Kalayeh & Shah, Table 1."""

    def __init__(self):
        super().__init__()
        self.conv1 = Block(3, 8)
        self.conv2 = Block(8, 16)
        self.conv3 = Block(16, 16)
        self.conv4 = Block(16, 32)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.LayerNorm(10)
        )

    def forward(self, x):
        return self.head(self.conv4(self.conv3(self.conv2(self.conv1(x)))))


def test_replace_only_the_bn_after_conv3_mn1_placement():
    model = CifarLike()
    before = {n: type(m) for n, m in model.named_modules()}
    names = normlab.convert(model, "gn(num_groups=4)", include="conv3.*")
    assert names == ["conv3.norm"]
    assert isinstance(model.conv3.norm, nn.GroupNorm) and model.conv3.norm.num_groups == 4
    for n, m in model.named_modules():
        if n != "conv3.norm":
            assert type(m) is before[n], n
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_include_exclude_lists_and_return_order():
    model = CifarLike()
    names = normlab.convert(
        model, "affine", include=["conv1.*", "conv2.norm", "conv4*"], exclude="conv4.*"
    )
    assert names == ["conv1.norm", "conv2.norm"]
    # normlab's own layers are convertible too; LayerNorm over one dim counts as a norm
    names = normlab.convert(model, "bn")
    assert names == ["conv1.norm", "conv2.norm", "conv3.norm", "conv4.norm", "head.3"]
    assert all(isinstance(model.get_submodule(n), normlab.BatchNorm) for n in names)
    assert model.get_submodule("head.3").num_features == 10


def test_infers_num_features_keeps_device_dtype_and_mode():
    model = CifarLike().double().eval()
    normlab.convert(model, "gn", include="conv*")
    for i, c in enumerate([8, 16, 16, 32], start=1):
        norm = model.get_submodule(f"conv{i}.norm")
        assert norm.num_features == c
        assert norm.weight.dtype == torch.float64
        assert not norm.training
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_other_torch_norm_kinds_are_found():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1),
        nn.GroupNorm(3, 6),
        nn.InstanceNorm2d(6),
        nn.Identity(),
        nn.SyncBatchNorm(6),
    )
    names = normlab.convert(model, "bn")
    assert names == ["1", "2", "4"]
    # a LayerNorm over several dimensions (transformer-style (C, H, W)) has no channel count to
    # rebuild a per-channel layer from: it is not a normalization layer for convert
    multi = nn.Sequential(nn.Conv2d(3, 6, 1), nn.LayerNorm([6, 4, 4]), nn.LayerNorm(4))
    assert normlab.convert(multi, "bn") == ["2"]
    assert type(multi[1]) is nn.LayerNorm and multi[2].num_features == 4


def test_unmatched_include_is_an_error_listing_the_norms():
    model = CifarLike()
    with pytest.raises(ValueError, match=r"conv5.*conv1.norm"):
        normlab.convert(model, "bn", include="conv5.*")
    with pytest.raises(ValueError, match="unknown normalization"):
        normlab.convert(model, "nosuch", include="conv1.*")
    with pytest.raises(TypeError):
        normlab.convert(model, "bn", include=[1, 2])
    # the default include on a model without norms is not an error
    assert normlab.convert(nn.Linear(3, 3), "bn") == []


def test_convert_to_none_gives_identity_that_can_be_converted_back():
    model = CifarLike()
    normlab.convert(model, "none", include="conv2.*")
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(model.conv2.norm(x[:, :8].repeat(1, 2, 1, 1)), x[:, :8].repeat(1, 2, 1, 1))
    assert normlab.convert(model, "bn", include="conv2.*") == ["conv2.norm"]


def test_parameter_free_norms_are_replaced_on_the_model_dtype_and_device():
    # nn.InstanceNorm2d() and normlab's "none" hold no tensor to read a dtype/device from; the
    # replacement must follow the enclosing model (a float32 BN in a float64 model cannot run)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.InstanceNorm2d(6), nn.ReLU()).double()
    assert normlab.convert(model, "bn") == ["1"]
    assert model[1].weight.dtype == torch.float64 and model[1].running_mean.dtype == torch.float64
    assert model(torch.randn(2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64
    # the "none" round trip in a nested float64 model
    model = CifarLike().double()
    normlab.convert(model, "none", include="conv2.*")
    normlab.convert(model, "gn(num_groups=4)", include="conv2.*")
    assert model.conv2.norm.weight.dtype == torch.float64
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    # the device too (the meta device stands in for a GPU)
    meta = nn.Sequential(nn.Conv2d(3, 6, 1), normlab.make_norm("none", 6)).to("meta")
    normlab.convert(meta, "bn")
    assert meta[1].weight.device.type == "meta" and meta[1].running_var.device.type == "meta"
