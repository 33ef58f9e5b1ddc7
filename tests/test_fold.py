"""normlab.fold: eval-affine norms merged into their preceding conv/linear; the rest reported.

The models run on the device of ``pytest --device``, with TF32 off (on a GPU, TF32 convolutions
would round the folded and the unfolded model differently, far beyond float32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.models import create


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few training forwards so running statistics are not at their initial values (on the
    device of ``x``)."""
    model.to(x.device).train()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial affine parameters
            p.add_(0.05 * torch.randn_like(p))
        for _ in range(steps):
            model(x)
    return model.eval()


FOLDABLE = ["bn", "iternorm", "dbn(group_size=4)", "bcn", "fixedstats"]


@pytest.mark.parametrize("conv", ["plain", "ws"])
@pytest.mark.parametrize("norm", FOLDABLE)
def test_affine_norms_fold_into_their_conv(norm: str, conv: str, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8).to(device)
    model = _trained(create("small_cnn", 10, in_channels=1, norm=norm, conv=conv), x)
    n_norms = sum(isinstance(m, normlab.nn.registry.norm_classes()) for m in model.modules())
    res = normlab.fold(model)
    assert len(res.folded) == n_norms and not res.skipped, (res.folded, res.skipped)
    with torch.no_grad():
        ref, out = model(x), res.model(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel
    # float64: folding itself is exact up to rounding
    m64 = model.double()
    with torch.no_grad():
        err64 = (normlab.fold(m64).model(x.double()) - m64(x.double())).abs().max().item()
    assert err64 <= 1e-9
    kinds = {type(m) for m in res.model.modules()}
    assert not kinds & set(normlab.nn.registry.norm_classes())  # no normlab norm is left
    assert not any(hasattr(m, "standardized_weight") for m in res.model.modules())  # WS is gone
    if norm == "bcn":  # the channel part stays, as a torch GroupNorm
        assert nn.GroupNorm in kinds


def test_fold_leaves_the_original_model_alone(device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8).to(device)
    model = _trained(create("small_cnn", 10, in_channels=1, norm="bn", conv="ws"), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normlab.fold(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.conv1.norm, normlab.BatchNorm)


@pytest.mark.parametrize("norm", ["mode", "mgn", "mixture", "gn", "ln", "in"])
def test_input_dependent_norms_are_reported_not_folded(norm: str, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8).to(device)
    model = _trained(create("small_cnn", 10, in_channels=1, norm=norm), x)
    res = normlab.fold(model)
    assert not res.folded
    assert res.skipped and all("depends on the input" in why for why in res.skipped.values())
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))


def test_a_norm_without_a_single_preceding_conv_is_reported(device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), normlab.BatchNorm(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
    )
    x = torch.randn(8, 3, 6, 6).to(device)
    model = _trained(model, x)
    res = normlab.fold(model)
    assert set(res.folded) == {"4"}  # torch's BatchNorm2d after the 1×1 conv
    assert "single conv" in res.skipped["2"]
    with torch.no_grad():
        assert torch.allclose(res.model(x), model(x), atol=1e-5, rtol=1e-5)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = normlab.BatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.norm(z) + z  # the conv's output feeds two places: folding would change z


def test_a_conv_whose_output_is_used_twice_is_not_folded(device: torch.device) -> None:
    model = _trained(_Residual(), torch.randn(4, 4, 5, 5).to(device))
    res = normlab.fold(model)
    assert "norm" in res.skipped and not res.folded


def test_linear_and_grouped_conv(device: torch.device) -> None:
    torch.manual_seed(0)
    lin = _trained(
        nn.Sequential(nn.Linear(6, 5), normlab.make_norm("iternorm", 5)),
        torch.randn(40, 6).to(device),
    )
    res = normlab.fold(lin)
    x = torch.randn(7, 6).to(device)
    assert res.folded and isinstance(res.model[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(res.model(x), lin(x), atol=1e-5)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), normlab.make_norm("iternorm", 4))
    grouped = _trained(grouped, torch.randn(16, 4, 3, 3).to(device))
    res = normlab.fold(grouped)
    assert "grouped convolution" in res.skipped["1"]
    bn_grouped = _trained(
        nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), nn.BatchNorm2d(4)),
        torch.randn(16, 4, 3, 3).to(device),
    )
    assert set(normlab.fold(bn_grouped).folded) == {"1"}  # a diagonal map folds into any conv


def test_a_lone_ws_conv_becomes_a_plain_conv(device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(normlab.WSConv2d(3, 6, 3), nn.ReLU()).to(device).eval()
    res = normlab.fold(model)
    assert type(res.model[0]) is nn.Conv2d
    x = torch.randn(2, 3, 7, 7).to(device)
    with torch.no_grad():
        assert torch.allclose(res.model(x), model(x), atol=1e-6)


def test_fold_needs_eval_mode_and_a_module() -> None:
    with pytest.raises(ValueError, match="eval"):
        normlab.fold(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        normlab.fold("model")
