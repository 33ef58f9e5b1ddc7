import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab.nn.registry import parse_spec

# Specs that must build for every registered name (with default kwargs), on both input ranks.
SHAPES = [(6, 16), (6, 16, 5, 4)]


@pytest.mark.parametrize("name", list(normlab.available_norms()))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_registered_name_builds_and_runs_forward_backward(name, shape):
    layer = normlab.make_norm(name, 16)
    # layers whose training step needs a rate (micro-batch BCN) get one from their own API
    if hasattr(layer, "set_rate"):
        layer.set_rate(0.1)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    layer.eval()
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("name", list(normlab.available_norms()))
def test_every_layer_resets_like_a_torch_layer(name):
    # layers look like PyTorch's: running state in buffers with reset_running_stats(), parameters
    # with reset_parameters(), and a repr naming the channel count
    assert "13" in repr(normlab.make_norm(name, 13))
    torch.manual_seed(0)
    fresh = normlab.make_norm(name, 8)
    torch.manual_seed(0)
    layer = normlab.make_norm(name, 8)
    if hasattr(layer, "set_rate"):
        layer.set_rate(0.1)
    layer.train()
    for _ in range(2):
        layer(torch.randn(6, 8, 3, 3) * 2 + 1)
    ref = dict(fresh.named_buffers())
    changed = [k for k, v in layer.named_buffers() if not torch.equal(v, ref[k])]
    if changed:  # the layer keeps running state: it must be resettable to a fresh layer's
        layer.reset_running_stats()
        for k, v in layer.named_buffers():
            assert torch.equal(v, ref[k]), (name, k)
    params = dict(layer.named_parameters())
    if params:
        with torch.no_grad():
            for p in params.values():
                p.add_(100.0)
        layer.reset_parameters()
        for k, p in layer.named_parameters():
            assert p.abs().max() < 50, (name, k)  # re-initialised, not left as perturbed
        # the per-channel affine starts at the identity (γ = 1, β = 0), as in torch's layers
        for attr, value in (("weight", 1.0), ("bias", 0.0)):
            t = params.get(attr)
            if t is not None:
                assert torch.equal(t, torch.full_like(t, value)), (name, attr)


@pytest.mark.parametrize("name", list(normlab.available_norms()))
def test_state_dict_carries_the_eval_behaviour(name):
    # README: every layer keeps its running state in buffers, so state_dict carries it: a layer
    # of another seed that loads the trained state computes the same eval output
    for shape in [(6, 8), (6, 8, 3, 3)]:
        torch.manual_seed(0)
        layer = normlab.make_norm(name, 8)
        if hasattr(layer, "set_rate"):
            layer.set_rate(0.1)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for _ in range(3):
            layer(torch.randn(*shape) * 2 + 1)
        torch.manual_seed(1)
        other = normlab.make_norm(name, 8)
        other.load_state_dict(layer.state_dict())
        layer.eval()
        other.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(layer(x), other(x)), (name, shape)
        for k, v in layer.state_dict().items():  # eval changes no state
            assert torch.equal(v, before[k]), (name, k)


@pytest.mark.parametrize("name", list(normlab.available_norms()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_output_has_the_input_dtype(name, dtype):
    # float32 parameters with half input (autocast) or float64 layers: like torch's own norms, the
    # output keeps the input's dtype, train and eval, and is finite
    layer = normlab.make_norm(name, 8)
    if hasattr(layer, "set_rate"):
        layer.set_rate(0.1)
    if dtype == torch.float64:
        layer = layer.double()
    x = (torch.randn(6, 8, 3, 3) * 2 + 1).to(dtype)
    for mode in (True, False):
        y = layer.train(mode)(x)
        assert y.dtype == dtype and torch.isfinite(y).all(), (name, mode)


def test_available_norms_has_descriptions_and_the_foundation_names():
    names = normlab.available_norms()
    for n in ["none", "affine", "bn", "gn", "ln", "in", "bcn"]:
        assert n in names
        assert isinstance(names[n], str) and len(names[n]) > 5


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("bn", ("bn", {})),
        ("  GN(num_groups=16) ", ("gn", {"num_groups": 16})),
        ("bcn(micro_batch=true)", ("bcn", {"micro_batch": True})),
        ("bcn(micro_batch=False, rate=None)", ("bcn", {"micro_batch": False, "rate": None})),
        (
            "mixture(k=5, em_iters=2, activation=relu)",
            ("mixture", {"k": 5, "em_iters": 2, "activation": "relu"}),
        ),
        ("x(eps=-1e-3, s='a b', t=(1, 2))", ("x", {"eps": -1e-3, "s": "a b", "t": (1, 2)})),
        ({"name": "gn", "num_groups": 4}, ("gn", {"num_groups": 4})),
        ("in", ("in", {})),  # a Python keyword is still a valid name
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuchnorm", "valid names: .*bn"),
        ("gn(groups=4)", r"unknown argument.*'groups'.*valid arguments: num_groups"),
        ("gn(4)", "by keyword"),
        ("gn(num_groups=", "cannot parse"),
        ("gn(num_groups=3)", "num_groups=3 must divide num_features=16"),
        ("gn(num_groups=0)", "num_groups must be an integer >= 1"),
        ("bn(eps=f(1))", "cannot parse the value"),
        ({"num_groups": 2}, "needs a 'name' key"),
        ("", "empty norm spec"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        normlab.make_norm(spec, 16)


def test_bad_spec_type_and_num_features():
    with pytest.raises(TypeError):
        normlab.make_norm(3, 16)
    with pytest.raises(ValueError, match="num_features"):
        normlab.make_norm("bn", 0)


@pytest.mark.parametrize("name", ["bn", "gn", "ln", "in", "affine", "bcn"])
def test_wrong_channel_count_and_rank_raise(name):
    layer = normlab.make_norm(name, 8)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(4, 7, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(8))


def test_standard_layers_match_torch_functional():
    x = torch.randn(8, 12, 5, 5)
    bn = normlab.make_norm("bn", 12)
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, training=True))
    x2 = torch.randn(8, 12)
    torch.testing.assert_close(bn(x2), F.batch_norm(x2, None, None, training=True))
    gn = normlab.make_norm("gn(num_groups=3)", 12)
    torch.testing.assert_close(gn(x), F.group_norm(x, 3))
    ln = normlab.make_norm("ln", 12)
    torch.testing.assert_close(ln(x), F.layer_norm(x, x.shape[1:]))
    inorm = normlab.make_norm("in", 12)
    torch.testing.assert_close(inorm(x), F.instance_norm(x))
    aff = normlab.make_norm("affine", 12)
    with torch.no_grad():
        aff.weight.uniform_()
        aff.bias.uniform_()
    torch.testing.assert_close(
        aff(x), x * aff.weight.view(1, -1, 1, 1) + aff.bias.view(1, -1, 1, 1)
    )
    torch.testing.assert_close(normlab.make_norm("none", 12)(x), x)


@pytest.mark.parametrize("shape", [(8, 12), (8, 12, 7), (3, 12, 2, 3, 4)])
def test_per_sample_layers_match_torch_on_every_rank(shape):
    # (N, C) and (N, C, L) and 5-D input, with non-trivial affine parameters
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    for spec, groups in (("gn(num_groups=4)", 4), ("ln", 1)):
        layer = normlab.make_norm(spec, 12).double()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
        torch.testing.assert_close(layer(x), F.group_norm(x, groups, layer.weight, layer.bias))
    bn = normlab.make_norm("bn", 12).double()
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, training=True))


def test_instance_norm_of_fully_connected_input_is_the_bias():
    # InstanceNorm docstring: for (N, C) input each group holds one value, the normalized value
    # is 0 and the output is beta (up to float32 rounding of x amplified by 1/sqrt(eps) ~ 316 in
    # torch's fused scale-and-shift, hence the absolute tolerance).
    inorm = normlab.make_norm("in", 5)
    with torch.no_grad():
        inorm.bias.copy_(torch.arange(5.0) - 2)
    y = inorm(torch.randn(7, 5) * 3)
    torch.testing.assert_close(y, inorm.bias.detach().expand(7, 5), atol=1e-3, rtol=0)
    # and for spatial input it is torch's instance norm with the affine applied
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(
        inorm(x), F.instance_norm(x, weight=inorm.weight, bias=inorm.bias), atol=1e-5, rtol=1e-5
    )


def test_bn_running_stats_and_state_dict_keys_match_torch():
    ours = normlab.make_norm("bn(momentum=0.2)", 6)
    ref = torch.nn.BatchNorm2d(6, momentum=0.2)
    for _ in range(2):
        x = torch.randn(5, 6, 3, 3)
        ours(x)
        ref(x)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    ours.eval()
    ref.eval()
    x = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_default_num_groups():
    from normlab.nn import default_num_groups

    assert default_num_groups(256) == 32
    assert default_num_groups(64) == 16
    assert default_num_groups(36) == 9
    assert default_num_groups(3) == 1
    for c in range(1, 300):
        g = default_num_groups(c)
        assert c % g == 0 and 1 <= g <= 32


def test_register_norm_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        normlab.register_norm("bn", "dup")(type("Other", (torch.nn.Module,), {}))
