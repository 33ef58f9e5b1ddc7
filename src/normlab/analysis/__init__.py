"""Measuring *why* a normalization helps: the analysis metrics of the papers.

* :mod:`~normlab.analysis.disturbance` — Stochastic Normalization Disturbance (Huang et al.,
  Eq. 9–10) and the condition number of the covariance of normalized outputs (Huang et al.,
  Fig. 4), for any layer or spec.
* :mod:`~normlab.analysis.statdiff` — StatDiff per channel group (Qiao et al., Eq. 35) and a
  collector of running per-channel statistics after convolutions during training (Qiao et al.,
  Fig. 6).
* :mod:`~normlab.analysis.curves` — steps to a target accuracy, relative reduction and speed-up,
  best accuracy after fractions of training (Kalayeh & Shah, Tables 2–6; Collins et al., Table 1,
  Fig. 5).
* :mod:`~normlab.analysis.activations` — Gaussian-mixture fits of per-channel activations
  (Kalayeh & Shah, Fig. 1) and activation percentiles over training (Collins et al., Fig. 4).
* :mod:`~normlab.analysis.components` — MixtureNorm component weights and effective number of
  components (Kalayeh & Shah, Fig. 8–9) and ModeNorm gate assignments (Deecke et al., Fig. 3).

The distance-to-singularity layer of Qiao et al., Eq. 33–34 is the registered norm ``fixedstats``
(:class:`normlab.nn.fixedstats.FixedStatsNorm`). Metric functions are pure (tensors / arrays in,
numbers / arrays out); each ``plot_*`` function writes a figure file (PNG by default) with
matplotlib's Agg renderer and returns its path — none uses ``pyplot`` or shows a window. How the
papers' measurements are read is in ``docs/methods/analysis.md``.
"""

from normlab.analysis import activations, components, curves, disturbance, statdiff
from normlab.analysis.activations import *  # noqa: F403
from normlab.analysis.components import *  # noqa: F403
from normlab.analysis.curves import *  # noqa: F403
from normlab.analysis.disturbance import *  # noqa: F403
from normlab.analysis.statdiff import *  # noqa: F403

__all__ = [
    *disturbance.__all__,
    *statdiff.__all__,
    *curves.__all__,
    *activations.__all__,
    *components.__all__,
]
