"""normlab: normalization layers from five papers, and a laboratory to reproduce and measure them.

One line puts a layer into a model::

    import normlab
    norm = normlab.make_norm("mixture(k=3, em_iters=2)", 128)
    normlab.convert(model, "bcn", include="layer2.*")
"""

from normlab.convert import convert, convert_conv
from normlab.deploy import FoldResult, fold
from normlab.nn import *  # noqa: F403
from normlab.nn import __all__ as _nn_all
from normlab.nn.registry import available_norms, make_norm, parse_spec, register_norm

__version__ = "0.1.0"

__all__ = [
    "FoldResult",
    "__version__",
    "available_norms",
    "convert",
    "convert_conv",
    "fold",
    "make_norm",
    "parse_spec",
    "register_norm",
    *_nn_all,
]
