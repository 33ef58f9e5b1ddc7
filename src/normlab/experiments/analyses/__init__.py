"""Experiments that are not one classifier training run: the analysis runners.

* ``snd_conditioning`` (:mod:`~normlab.experiments.analyses.snd`) — SND and output conditioning,
  Huang et al., Sec. 4, Fig. 4–5, of any registered layer, on Gaussian pools or on convolution
  activations of the digits;
* ``cost`` (:mod:`~normlab.experiments.analyses.cost`) — iterations per second with one norm
  replaced, Kalayeh & Shah, Sec. 5.1, Table 7;
* ``gan`` (:mod:`~normlab.experiments.analyses.gan`) — the DCGAN, Kalayeh & Shah, Sec. 4.5.

Each computes one run's result; :mod:`normlab.report.analyses` renders their tables and figures.
Register another with :func:`register_analysis`.
"""

from normlab.experiments.analyses.cost import Cost
from normlab.experiments.analyses.gan import GAN, frechet_distance, load_feature_fn
from normlab.experiments.analyses.registry import (
    ANALYSES,
    AnalysisRunner,
    get_runner,
    register_analysis,
)
from normlab.experiments.analyses.snd import SNDConditioning, activation_pool, gaussian_pool

__all__ = [
    "ANALYSES",
    "GAN",
    "AnalysisRunner",
    "Cost",
    "SNDConditioning",
    "activation_pool",
    "frechet_distance",
    "gaussian_pool",
    "get_runner",
    "load_feature_fn",
    "register_analysis",
]
