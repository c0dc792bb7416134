"""ewc: Elastic Weight Consolidation (Kirkpatrick et al., 2017) for PyTorch.

The diagonal Fisher is a per-sample mean, ``F_i = (1/N) Σ_n (∂ log p(y_n|x_n, θ)/∂θ_i)²``, and the
penalty is ``(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``.
"""

from ._memo import clear_route_cache
from .estimate import fisher_diagonal, fisher_route
from .fisher import Fisher
from .hessian import hessian_diagonal
from .kfac import KFAC, KronBlock, fisher_kfac
from .kfac_penalty import KFACEWC
from .likelihoods import Categorical, CustomNLL, Gaussian, Likelihood
from .mas import MAS, mas_importance, mas_route
from .penalty import EWC, L2
from .posterior import DiagonalGaussian, predictive
from .si import SI

__version__ = "0.1.0"

__all__ = [
    # Fisher estimation
    "fisher_diagonal",
    "fisher_route",
    "clear_route_cache",
    "Fisher",
    # likelihoods
    "Likelihood",
    "Categorical",
    "Gaussian",
    "CustomNLL",
    # penalties
    "EWC",
    "L2",
    # the Laplace view: posterior, predictive, Hessian
    "DiagonalGaussian",
    "predictive",
    "hessian_diagonal",
    # other regularisers in EWC's interface
    "mas_importance",
    "mas_route",
    "MAS",
    "SI",
    # Kronecker-factored curvature (KFAC)
    "fisher_kfac",
    "KFAC",
    "KronBlock",
    "KFACEWC",
]
