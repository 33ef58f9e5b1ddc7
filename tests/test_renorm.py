"""Batch Renormalization (``brn``): against a float64 implementation written from the formulas,
torch's batch norm for r_max = 1 and d_max = 0 (and for its gradient when nothing is clipped),
gradcheck, the r_max/d_max ramps and bad arguments; and the batch-statistics layers of the
compared methods (``brn``, ``sn``) synchronised over two processes."""

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import normlab
from normlab.nn.renorm import (
    BatchRenorm,
    batch_renorm,
    ramp_limit,
    set_brn_step,
    update_running_stats,
)

F64 = torch.float64


def _reference(x, rm, rv, w, b, r_max, d_max, momentum=0.1, eps=1e-5):
    """One training step of batch renormalization from the formulas; returns the output and the
    new running statistics (the given ones are not modified)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    var_b = ((x - mu_b.reshape(shape)) ** 2).mean(dims)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - rm) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape)
    y = w.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + b.reshape(shape)
    m = x.numel() // x.shape[1]
    new_rm = (1 - momentum) * rm + momentum * mu_b.detach()
    new_rv = (1 - momentum) * rv + momentum * var_b.detach() * m / (m - 1)
    return y, new_rm, new_rv, r, d


def _layer(c: int, **kw) -> BatchRenorm:
    layer = BatchRenorm(c, **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        # running statistics away from the batch's, so that some r and d are clipped
        layer.running_mean.copy_(torch.linspace(-1.0, 2.5, c, dtype=F64))
        layer.running_var.copy_(torch.linspace(0.2, 9.0, c, dtype=F64))
    return layer


def _compare_step(layer, x, w, b, reference):
    """One training step of ``layer`` and of ``reference(x_copy) -> (y, running_mean,
    running_var)`` (sharing the leaf tensors ``w``, ``b``): outputs, input and parameter
    gradients of a random linear loss, and running statistics must agree. Returns the
    reference's running statistics."""
    x = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    layer.zero_grad()
    w.grad = b.grad = None
    y = layer(x)
    yr, rm, rv = reference(xr)
    torch.testing.assert_close(y, yr)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    return rm, rv


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (10, 6), (5, 6, 7)])
def test_matches_the_formulas_over_two_steps_and_eval(shape):
    layer = _layer(shape[1], r_max=1.5, d_max=0.4)
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    clipped = []

    def reference(xr):
        yr, new_rm, new_rv, r, d = _reference(xr, rm, rv, w, b, 1.5, 0.4)
        clipped.append(((r - 1.5).abs() < 1e-12) | ((d.abs() - 0.4).abs() < 1e-12))
        return yr, new_rm, new_rv

    for step in range(2):
        x = torch.randn(*shape, dtype=F64) * 2 + 1 - step
        rm, rv = _compare_step(layer, x, w, b, reference)
    assert clipped[0].any() and not clipped[0].all()  # both branches of the clipping ran
    layer.eval()
    x = torch.randn(*shape, dtype=F64)
    with torch.no_grad():
        expected = F.batch_norm(x, rm, rv, w.detach(), b.detach(), training=False)
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("shape", [(8, 5, 4, 4), (12, 5)])
def test_r_max_one_d_max_zero_is_torch_batch_norm(shape):
    layer = _layer(shape[1], r_max=1.0, d_max=0.0)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))

    def reference(xr):
        return F.batch_norm(xr, rm, rv, w, b, training=True, momentum=0.1), rm, rv

    for _ in range(2):
        _compare_step(layer, torch.randn(*shape, dtype=F64) * 3 - 1, w, b, reference)


def test_unclipped_output_is_the_running_normalization_and_gradient_is_bn_times_r():
    # Kalayeh & Shah, Eq. 5: unclipped, x̂·r + d = (x − μ)/σ; with r, d constants the input
    # gradient is r times batch norm's (torch's batch_norm as the oracle)
    x = (torch.randn(16, 4, 3, 3, dtype=F64) * 2 + 0.5).requires_grad_()
    layer = _layer(4, r_max=100.0, d_max=100.0)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    w, b = layer.weight.detach(), layer.bias.detach()
    y = layer(x)
    torch.testing.assert_close(y, F.batch_norm(x.detach(), rm, rv, w, b, training=False))
    g = torch.randn_like(x)
    (y * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (F.batch_norm(xr, None, None, w, b, training=True) * g).sum().backward()
    sigma_b = torch.sqrt(x.detach().var((0, 2, 3), correction=0) + 1e-5)
    r = (sigma_b / torch.sqrt(rv + 1e-5)).reshape(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, xr.grad * r)


def test_gradcheck_float64():
    # Finite differences see r and d move with x; where both are clipped (every channel here,
    # running statistics far from the batch's) they are locally constant, so the detached
    # gradient is the true one
    rm, rv = torch.tensor([5.0, -5.0, 5.0]), torch.tensor([100.0, 0.01, 0.02])
    x = torch.randn(6, 3, 2, 2, dtype=F64, requires_grad=True)
    w = torch.rand(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def fn(x, w, b):  # fresh running statistics: each call would otherwise update them
        return batch_renorm(x, rm.double(), rv.double(), w, b, r_max=1.3, d_max=0.2)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    x2 = torch.randn(7, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x2, w, b))


def test_ramps_follow_ioffes_linear_schedule():
    layer = BatchRenorm(4, r_max=3.0, d_max=5.0, r_max_ramp=(5000, 40000), d_max_ramp=(5000, 25000))
    expected = {
        0: (1.0, 0.0),
        5000: (1.0, 0.0),
        12000: (1.4, 1.75),
        25000: (1 + 2 * 20000 / 35000, 5.0),
        40000: (3.0, 5.0),
        10**6: (3.0, 5.0),
    }
    for step, (r, d) in expected.items():
        layer.set_step(step)
        got = layer.limits()
        assert abs(float(got[0]) - r) < 1e-6 and abs(float(got[1]) - d) < 1e-6, step
    fixed = BatchRenorm(4, r_max=2.0, d_max=1.0)
    fixed.set_step(123)
    assert fixed.limits() == (2.0, 1.0)
    step = torch.tensor(30, dtype=torch.long)
    assert float(ramp_limit(step, 1.0, 3.0, (10, 50))) == pytest.approx(2.0)


def test_ramped_layer_is_batch_norm_before_the_ramp_and_clips_after():
    x = torch.randn(16, 3, 4, 4, dtype=F64) * 3 + 4  # far from the running statistics (0, 1)
    model = torch.nn.Sequential(
        BatchRenorm(3, r_max_ramp=(10, 20), d_max_ramp=(10, 20)).double(),
        torch.nn.ReLU(),
        BatchRenorm(3, r_max_ramp=(10, 20), d_max_ramp=(10, 20)).double(),
    )
    assert set_brn_step(model, 3) == 2
    first = model[0]
    y = first(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    set_brn_step(model, 15)  # halfway: r in [1/2, 2], |d| <= 2.5
    first.reset_running_stats()
    y = first(x)
    ref = _reference(
        x,
        torch.zeros(3, dtype=F64),
        torch.ones(3, dtype=F64),
        torch.ones(3, dtype=F64),
        torch.zeros(3, dtype=F64),
        2.0,
        2.5,
    )
    torch.testing.assert_close(y, ref[0])
    assert (ref[4].abs() == 2.5).all()  # d is clipped at the ramped limit
    assert int(first.step) == 15 and int(model[2].step) == 15
    # the step travels in the state_dict
    other = BatchRenorm(3, r_max_ramp=(10, 20), d_max_ramp=(10, 20))
    other.load_state_dict(first.state_dict())
    assert int(other.step) == 15


def test_registry_repr_reset_and_state():
    layer = normlab.make_norm("brn(r_max=2, d_max=1, r_max_ramp=(5, 10))", 6)
    assert isinstance(layer, BatchRenorm) and normlab.BatchRenorm is BatchRenorm
    text = repr(layer)
    assert "6, eps=1e-05, momentum=0.1, affine=True, r_max=2.0, d_max=1.0" in text
    assert "r_max_ramp=(5, 10)" in text and "d_max_ramp" not in text
    assert layer.sync_batch_stats and normlab.set_brn_step is set_brn_step
    layer.set_step(torch.tensor(7))
    layer(torch.randn(4, 6, 2, 2) + 3)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(6)) and int(layer.num_batches_tracked) == 0
    assert int(layer.step) == 7  # the schedule position is not a running statistic
    assert BatchRenorm(3, affine=False).weight is None


def test_degenerate_batches_stay_finite_and_half_input_keeps_its_dtype():
    layer = BatchRenorm(4)
    for x in (torch.full((5, 4, 2, 2), 3.0), torch.randn(1, 4)):
        y = layer(x)
        assert torch.isfinite(y).all()
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    ref = BatchRenorm(4)
    for dtype, atol in ((torch.float16, 1e-2), (torch.bfloat16, 6e-2)):
        half = BatchRenorm(4)
        y = half(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref(x.to(dtype).float()), atol=atol, rtol=0)
        ref.reset_running_stats()
        assert half.running_mean.dtype == torch.float32


def test_no_samples_anywhere_leaves_the_running_statistics_exactly():
    """A batch empty on every process (count 0 after the reduction) must not write 0/0 into the
    running statistics: the update keeps them bit for bit."""
    mean, var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    rm, rv = mean.clone(), var.clone()
    nan = torch.full((2,), float("nan"))
    update_running_stats(rm, rv, nan, nan, torch.tensor(0.0), 0.1)
    assert torch.equal(rm, mean) and torch.equal(rv, var)
    update_running_stats(rm, rv, torch.zeros(2), torch.ones(2), torch.tensor(2.0), 0.5)
    torch.testing.assert_close(rm, 0.5 * mean)  # a real batch still updates: (1 − m)·r + m·b
    torch.testing.assert_close(rv, 0.5 * var + 0.5 * 2.0)  # unbiased: 1 · 2/(2 − 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_features=0), "num_features"),
        (dict(num_features=4, r_max=0.5), "r_max must be a finite number >= 1"),
        (dict(num_features=4, d_max=-1), "d_max must be a finite number >= 0"),
        (dict(num_features=4, r_max=float("inf")), "r_max"),
        (dict(num_features=4, r_max_ramp=(5, 5)), r"r_max_ramp.*0 <= start < end.*\(5, 5\)"),
        (dict(num_features=4, d_max_ramp=(-1, 3)), "d_max_ramp"),
        (dict(num_features=4, d_max_ramp=(1.0, 3)), "d_max_ramp"),
        (dict(num_features=4, r_max_ramp=5), "r_max_ramp"),
        (dict(num_features=4, momentum=2), "momentum"),
        (dict(num_features=4, eps=-1), "eps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm(**kwargs)


def test_bad_steps_and_input():
    layer = BatchRenorm(4)
    for step in (-1, 1.5, True, "3", torch.tensor(2.0)):
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            layer.set_step(step)
    with pytest.raises(ValueError, match="set_brn_step"):
        set_brn_step(layer, -3)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 3, 4))


# ----------------------------------------------------------------------------------------------
# brn and sn synchronised over two processes: the oracle is the unsynchronised layer run in one
# process on the whole batch (outputs, input gradients, summed parameter gradients, buffers over
# two steps, then eval)
# ----------------------------------------------------------------------------------------------

SPLIT = (5, 3)
SYNC_CASES = {
    "brn": lambda: BatchRenorm(4, r_max=1.4, d_max=0.3),
    "sn": lambda: normlab.SwitchNorm(4),
}


def _sync_run(name: str, part: slice, synced: bool) -> dict:
    torch.manual_seed(0)
    layer = SYNC_CASES[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(2.0)
    if synced:
        normlab.sync_stats(layer)
    g = torch.Generator().manual_seed(7)
    res: dict = {}
    for _ in range(2):
        x_full = torch.randn(sum(SPLIT), 4, 3, 3, generator=g, dtype=F64) * 2 + 1
        w_full = torch.randn(x_full.shape, generator=g, dtype=F64)
        x = x_full[part].clone().requires_grad_()
        layer.zero_grad()
        out = layer(x)
        (out * w_full[part]).sum().backward()
        res["out"], res["xgrad"] = out.detach(), x.grad
    res["pgrad"] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    res["buffers"] = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        res["eval"] = layer.eval()(torch.randn(sum(SPLIT), 4, 3, 3, generator=g, dtype=F64)[part])
    return res


def _parts() -> list[slice]:
    return [slice(0, SPLIT[0]), slice(SPLIT[0], sum(SPLIT))]


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=len(SPLIT),
        timeout=timedelta(seconds=60),
    )
    try:
        out = {name: _sync_run(name, _parts()[rank], True) for name in SYNC_CASES}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_brn_and_sn_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in SYNC_CASES:
        ref = _sync_run(name, slice(None), False)
        local = _sync_run(name, _parts()[0], False)
        assert not torch.allclose(local["out"], ref["out"][_parts()[0]], atol=1e-3)  # not vacuous
        for res, part in zip((r[name] for r in ranks), _parts(), strict=True):
            for key in ("out", "xgrad", "eval"):
                torch.testing.assert_close(res[key], ref[key][part], msg=f"{name} {key}")
            for k, v in ref["buffers"].items():
                torch.testing.assert_close(res["buffers"][k], v, msg=f"{name} {k}")
        for n, g in ref["pgrad"].items():
            torch.testing.assert_close(ranks[0][name]["pgrad"][n] + ranks[1][name]["pgrad"][n], g)
