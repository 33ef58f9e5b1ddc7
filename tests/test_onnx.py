"""Every registered normalization in eval mode exported to ONNX with a dynamic batch dimension.

For each name in ``normlab.available_norms()`` (new layers are picked up automatically), on
``(N, C)`` and ``(N, C, H, W)`` input: two training steps (non-trivial running statistics), then
``torch.onnx.export(layer, (x,), dynamo=True, dynamic_shapes=({0: Dim("batch", min=1)},))`` at
one batch size and onnxruntime at two others (a different size, and a single sample, unless the
eager layer itself refuses one). Oracle: the eager eval-mode layer on the same input, to 1e-4
in float32.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import normlab

C = 8
TOL = 1e-4
SHAPES = {"NC": (6, C), "NCHW": (3, C, 4, 4)}
NAMES = sorted(normlab.available_norms())


def _trained(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = normlab.make_norm(name, C)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        layer.train()
        for _ in range(2):
            layer(torch.randn((16, *shape[1:])) * 1.5 + 0.3)
    return layer.eval()


def onnx_session(layer: torch.nn.Module, x: torch.Tensor):
    """An onnxruntime session of ``layer`` exported at ``x`` with a dynamic batch dimension
    (skips the test when onnxruntime or onnxscript is not installed)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            layer, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
        )
    assert program is not None
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def check_onnx_round_trip(layer: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Export the eval-mode ``layer`` at batch ``shape[0]``; onnxruntime at ``shape[0] + 5``
    and at 1 (unless the eager layer refuses one sample) equals eager to ``TOL``."""
    gen = torch.Generator().manual_seed(1)
    session = onnx_session(layer, torch.randn(shape, generator=gen))
    (inp,) = session.get_inputs()
    for n in (shape[0] + 5, 1):
        x = torch.randn((n, *shape[1:]), generator=gen) * 1.5 + 0.3
        try:
            with torch.no_grad():
                want = layer(x).numpy()
        except ValueError:  # the eager layer refuses this batch (e.g. one value per channel)
            assert n == 1
            continue
        (got,) = session.run(None, {inp.name: x.numpy()})
        assert got.shape == want.shape, (n, got.shape)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"batch {n}")


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_eval_layer_exports_with_a_dynamic_batch(name: str, shape_id: str) -> None:
    shape = SHAPES[shape_id]
    check_onnx_round_trip(_trained(name, shape), shape)


def test_exported_model_is_checked_against_something_that_moves() -> None:
    """The oracle is not trivial: training moved the running statistics, so the eval output is
    not the identity or the plain batch standardization of its input."""
    layer = _trained("iternorm", SHAPES["NC"])
    x = torch.randn(SHAPES["NC"])
    with torch.no_grad():
        y = layer(x)
    assert not torch.allclose(y, x, atol=1e-2)
    assert not torch.allclose(y, (x - x.mean(0)) / x.std(0, unbiased=False), atol=1e-2)
