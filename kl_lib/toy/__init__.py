"""The toy analysis: small autoregressive policies on which every KL configuration is computed exactly.

* ``policies``    ``TabularPolicy`` (any distribution over V^T sequences) and ``MarkovPolicy`` (tied rows, long T);
* ``exact``       exact KLs, true gradients, and each configuration's expected gradient and one-sample variance
                  (enumeration in float64, dynamic programming for Markov policies), through ``kl_lib.objectives``;
* ``montecarlo``  the same expected gradients estimated from samples, with standard errors;
* ``bias``        bias and variance of every configuration against the sequence length T;
* ``rl_problem``  a toy KL-regularised RL problem solved by exact expected-gradient ascent;
* ``gaussian``    Schulman's Gaussian experiment for the estimators' values.

Layer: imports only the core (``kl_lib.estimators``, ``kl_lib.config``, ``kl_lib.objectives``) and ``kl_lib.files``.
"""

from kl_lib.toy.policies import MarkovPolicy, TabularPolicy, check_compatible, prefix_count

__all__ = ["MarkovPolicy", "TabularPolicy", "check_compatible", "prefix_count"]
