"""``gan``: the DCGAN of Kalayeh & Shah, Sec. 4.5 (Fig. 6–7), with BN or MN in the generator.

Trains the generator / discriminator pair of :func:`normlab.models.create("dcgan")` with Adam and
the non-saturating GAN loss on ``dataset`` (images rescaled to [−1, 1]), logging both losses every
``eval_every`` updates and saving 64 samples to ``samples.pt``. The Fréchet Inception Distance
(Heusel et al.) is computed **only if the user supplies an Inception network**: ``fid_features``
is a TorchScript file or ``"module:function"`` returning a callable that maps images in [−1, 1]
of shape (N, 3, H, W) to (N, F) features. normlab ships no Inception weights and downloads none;
without them the result says FID was not computed.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.convert import convert
from normlab.data import available_datasets, load_dataset
from normlab.experiments.analyses.registry import check_params, register_analysis
from normlab.experiments.spec import ExperimentError, Variant
from normlab.models import create
from normlab.train import select_device

__all__ = ["GAN", "frechet_distance", "load_feature_fn"]


def load_feature_fn(spec: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The user's Inception feature extractor: a TorchScript file, or ``"module:function"``
    (the function is called with no arguments and must return a callable / module); the
    returned function maps images to float64 features ``(N, F)`` without gradients."""
    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ts") and p.is_file():
        net = torch.jit.load(str(p), map_location=device).eval()
    elif ":" in spec:
        mod, _, fn = spec.partition(":")
        net = getattr(importlib.import_module(mod), fn)()
        if isinstance(net, torch.nn.Module):
            net = net.to(device).eval()
    else:
        raise ExperimentError(
            f"gan: fid_features {spec!r} is neither a TorchScript file nor 'module:function'"
        )

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return net(x).reshape(x.shape[0], -1).double()

    return features


def frechet_distance(
    mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor
) -> float:
    r"""The Fréchet distance of two Gaussians (Heusel et al.; FID on Inception features):

    .. math:: \lVert\mu_1 - \mu_2\rVert^2 + \operatorname{tr}(\Sigma_1 + \Sigma_2
              - 2 (\Sigma_1 \Sigma_2)^{1/2})

    Example::

        >>> round(frechet_distance(torch.zeros(2), torch.eye(2), torch.ones(2), torch.eye(2)), 6)
        2.0
    """
    from scipy import linalg  # slow to import; only FID needs it

    a, b = s1.cpu().double().numpy(), s2.cpu().double().numpy()
    covmean = linalg.sqrtm(a @ b)
    if not np.isfinite(covmean).all():
        off = np.eye(a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((a + off) @ (b + off))
    covmean = np.real(covmean)
    d = (mu1 - mu2).cpu().double().numpy()
    return float(d @ d + np.trace(a) + np.trace(b) - 2 * np.trace(covmean))


def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.t() @ fc / max(f.shape[0] - 1, 1)


@register_analysis(
    "gan", "Kalayeh & Shah, Sec. 4.5: DCGAN with BN or MN in the generator; FID if supplied"
)
class GAN:
    """The ``gan`` runner (see the module docstring)."""

    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        check_params(
            params,
            f"gan variant {variant.name!r}",
            names={"dataset": ("dataset", available_datasets())},
            positive=("steps", "batch_size", "eval_every"),
            norms=("g_norm", "d_norm", "norm"),
        )

    @staticmethod
    def run(
        params: dict[str, Any], seed: int, out_dir: Path, log: Callable[[str], None]
    ) -> dict[str, Any]:
        dev = select_device(params.get("device", "auto"))
        torch.manual_seed(seed)
        d = load_dataset(params["dataset"], **params.get("dataset_kwargs", {}))
        real = d.train_x * d.std.view(1, -1, 1, 1) + d.mean.view(1, -1, 1, 1)  # back to [0, 1]
        real = (real.clamp(0, 1) * 2 - 1).to(dev)
        model = create(
            "dcgan",
            num_classes=1,
            in_channels=real.shape[1],
            g_norm=params.get("g_norm", "bn"),
            d_norm=params.get("d_norm", "bn"),
            image_size=real.shape[-1],
            **params.get("model_kwargs", {}),
        )
        if params.get("norm") and params.get("include"):
            convert(model, params["norm"], include=params["include"])
        model = model.to(dev).train()
        g, dnet = model.generator, model.discriminator
        betas = tuple(params.get("betas", [0.0, 0.9]))
        lr = float(params.get("lr", 2e-4))
        og = torch.optim.Adam(g.parameters(), lr=lr, betas=betas)
        od = torch.optim.Adam(dnet.parameters(), lr=lr, betas=betas)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        gen = torch.Generator().manual_seed(seed + 1)
        feats = None
        if params.get("fid_features"):
            feats = load_feature_fn(str(params["fid_features"]), dev)
            n_fid = int(params.get("fid_samples", 10000))
            idx = torch.randperm(real.shape[0], generator=gen)[:n_fid]
            real_stats = _stats(
                torch.cat([feats(real[idx[i : i + 500]]) for i in range(0, idx.numel(), 500)])
            )
        history = []
        bs, steps = int(params["batch_size"]), int(params["steps"])
        every = int(params.get("eval_every", 1000))
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            idx = torch.randint(0, real.shape[0], (bs,), generator=gen).to(dev)
            z = torch.randn(bs, model.z_dim, generator=gen).to(dev)
            fake = g(z)
            od.zero_grad(set_to_none=True)
            ones = torch.ones(bs, device=dev)
            dl = bce(dnet(real[idx]).view(-1), ones) + bce(
                dnet(fake.detach()).view(-1), torch.zeros_like(ones)
            )
            dl.backward()
            od.step()
            og.zero_grad(set_to_none=True)
            gl = bce(dnet(fake).view(-1), ones)
            gl.backward()
            og.step()
            if step % every == 0 or step == steps:
                rec: dict[str, Any] = {
                    "step": step,
                    "d_loss": float(dl.detach()),
                    "g_loss": float(gl.detach()),
                    "time": round(time.perf_counter() - t0, 2),
                }
                if feats is not None:
                    g.eval()
                    with torch.no_grad():
                        fs = []
                        for i in range(0, n_fid, 500):
                            zz = torch.randn(min(500, n_fid - i), model.z_dim, generator=gen)
                            fs.append(feats(g(zz.to(dev))))
                    g.train()
                    rec["fid"] = frechet_distance(*real_stats, *_stats(torch.cat(fs)))
                history.append(rec)
                log(
                    f"  step {step}: d {rec['d_loss']:.3f} g {rec['g_loss']:.3f}"
                    + (f" FID {rec['fid']:.2f}" if "fid" in rec else "")
                )
        with torch.no_grad():
            g.eval()
            z = torch.randn(64, model.z_dim, generator=torch.Generator().manual_seed(0)).to(dev)
            torch.save({"samples": ((g(z) + 1) / 2).clamp(0, 1).cpu()}, out_dir / "samples.pt")
        fids = [r["fid"] for r in history if "fid" in r]
        return {
            "history": history,
            "best_fid": min(fids) if fids else None,
            "fid": "computed"
            if fids
            else "not computed: no Inception network supplied (params.fid_features)",
        }
