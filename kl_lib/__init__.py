"""kl_lib: KL estimators, KL configurations and their exact gradients, for RL fine-tuning of LLMs.

Companion package of the compendium for *A Comedy of Estimators: On KL Regularization in RL Training of
LLMs* (Shah et al., arXiv 2512.21852). ``docs/contract.md`` in the repository is the mathematical contract.

The core, exported here, is three modules:

* ``kl_lib.estimators`` — k1, k2, k3 and the analytic per-state KL, with a registry;
* ``kl_lib.config``     — ``KLConfig``: estimator × placement × β × reward-to-go × importance weighting;
* ``kl_lib.objectives`` — every configuration's loss term, implemented once, shared by the exact analysis
  and the RL trainer.

The layers above it are packages: ``kl_lib.toy`` (policies and the exact analysis), ``kl_lib.audit`` (which
gradient a library's KL flags give), ``kl_lib.lm`` (models),
``kl_lib.tasks`` (tasks with verifiable rewards), ``kl_lib.rl`` (the trainer) and ``kl_lib.study`` (tables,
findings, figures, the report, the notebook runner). ``kl_lib.files`` (safe writes, digests) serves them all.
"""

from kl_lib.config import KLConfig
from kl_lib.estimators import analytic, get_estimator, k1, k2, k3

__all__ = ["KLConfig", "analytic", "get_estimator", "k1", "k2", "k3"]
__version__ = "0.1.0"
