"""kl_lib: KL estimators, KL configurations and their exact gradients, for RL fine-tuning of LLMs.

Companion package of the compendium for *A Comedy of Estimators: On KL Regularization in RL Training of
LLMs* (Shah et al., arXiv 2512.21852). ``../DESIGN.md`` (shared) is the mathematical contract:

* ``kl_lib.estimators`` — k1, k2, k3 and the analytic per-state KL, with a registry;
* ``kl_lib.config``     — ``KLConfig``: estimator × placement × β × reward-to-go × importance weighting;
* ``kl_lib.objectives`` — every configuration's loss term, implemented once, shared by the exact analysis
  and the RL trainer;
* ``kl_lib.toy``        — ``TabularPolicy`` and ``MarkovPolicy``;
* ``kl_lib.toy.exact``      — exact KLs, true gradients, expected gradients and variances of configurations.
"""

from kl_lib.config import KLConfig
from kl_lib.estimators import analytic, get_estimator, k1, k2, k3

__all__ = ["KLConfig", "analytic", "get_estimator", "k1", "k2", "k3"]
__version__ = "0.1.0"
