"""MCMC settings shared by the simulator tests."""

import math

#: Small, fast MCMC settings for slcp references in tests of shapes and caching: too short to
#: converge, so the convergence checks are switched off (test_mcmc.py tests those).
FAST_MCMC = {"num_chains": 10, "warmup": 20, "thin": 1, "max_rhat": math.inf, "min_ess": 0}
