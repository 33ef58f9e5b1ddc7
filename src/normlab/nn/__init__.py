"""normlab's layers, one file per method family. Importing this package registers every layer."""

from normlab.nn import (
    batch_channel,
    fixedstats,
    mixture,
    mode,
    renorm,
    simple,
    standard,
    std_loss,
    switchable,
    sync,
    weight_std,
    whitening,
)
from normlab.nn._kernels import kernels_enabled, set_kernels_enabled, use_kernels
from normlab.nn.batch_channel import *  # noqa: F403
from normlab.nn.fixedstats import *  # noqa: F403
from normlab.nn.mixture import *  # noqa: F403
from normlab.nn.mode import *  # noqa: F403
from normlab.nn.renorm import *  # noqa: F403
from normlab.nn.simple import *  # noqa: F403
from normlab.nn.standard import *  # noqa: F403
from normlab.nn.std_loss import *  # noqa: F403
from normlab.nn.switchable import *  # noqa: F403
from normlab.nn.sync import *  # noqa: F403
from normlab.nn.weight_std import *  # noqa: F403
from normlab.nn.whitening import *  # noqa: F403

__all__ = [
    "kernels_enabled",
    "set_kernels_enabled",
    "use_kernels",
    *simple.__all__,
    *standard.__all__,
    *weight_std.__all__,
    *batch_channel.__all__,
    *std_loss.__all__,
    *mixture.__all__,
    *mode.__all__,
    *whitening.__all__,
    *fixedstats.__all__,
    *switchable.__all__,
    *renorm.__all__,
    *sync.__all__,
]
