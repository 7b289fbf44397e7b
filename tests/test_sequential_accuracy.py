"""TSNPE against an exact posterior: a narrow Gaussian inside a wide box prior, 2,000 simulations.

Model: ``theta ~ U([-14, 14]^2)``, ``x = theta + 0.02 * noise``; for ``x_o = (1, -2)`` the posterior is
``N(x_o, 0.02^2 I)`` (the box cuts off nothing measurable), 700 times narrower than the prior.
Measured with these seeds (the test prints the numbers): TSNPE with the affine MAF (4 rounds of 500,
patience 30) 0.514 and 0.506 in two runs; TSNPE with its default spline flow 0.545 and 0.547 (its
regions 4 to 300 times larger than the MAF's, up to 0.005 and 0.010 of the prior in those two runs,
which the same seeds did not reproduce bit for bit between a plain and a two-worker pytest run on
this machine: splines on the prior-scaled interval build so narrow a peak poorly); amortized NPE
with its defaults (patience 20, one step drop) 0.597; on an AVX-512 machine the MAF's 0.509, the
spline flow's 0.572 and amortized NPE's 0.574. (Before refits kept their validation rows,
0.516 and 0.554.) With a posterior 200 times narrower (noise 0.07) amortized NPE was already close:
0.521 against TSNPE's 0.500 once the step drop became NPE's default
(0.575 with patience 10, before it); at 0.035, 0.551 against 0.502.
"""

import pytest
import torch

from sbiflows import NPE, TSNPE, box_uniform, simulate_from_prior
from sbiflows.diagnostics import c2st

HALF, SIGMA = 14.0, 0.02
X_O = torch.tensor([1.0, -2.0])
PRIOR = box_uniform([-HALF, -HALF], [HALF, HALF])


def simulator(theta, seed):
    return theta + SIGMA * torch.randn(theta.shape, generator=torch.Generator().manual_seed(int(seed)))


EXACT = X_O + SIGMA * torch.randn(5000, 2, generator=torch.Generator().manual_seed(99))


def tsnpe_c2st(**options) -> tuple[float, list[float]]:
    """C2ST of TSNPE (4 rounds of 500) against the exact posterior, and its rounds' truncated volumes."""
    tsnpe = TSNPE(PRIOR, **options)
    posterior = tsnpe.run(simulator, X_O, rounds=4, simulations=2000, seed=0, check_simulations=0)
    return c2st(EXACT, posterior.sample(5000, seed=1), seed=0).accuracy, [round(r.volume, 5) for r in tsnpe.rounds]


@pytest.mark.slow
def test_tsnpe_reaches_the_exact_posterior_where_amortized_npe_does_not():
    score, volumes = tsnpe_c2st(estimator="maf")
    sims = simulate_from_prior(simulator, PRIOR, 2000, seed=0)
    amortized = NPE(PRIOR).fit(sims.theta, sims.x, seed=0, progress=False)
    single = c2st(EXACT, amortized.sample(5000, X_O, seed=1), seed=0).accuracy
    print(f"C2ST against the exact posterior: TSNPE with the MAF {score:.3f}, amortized NPE {single:.3f}; "
          f"volumes {volumes}")
    assert all(v < 2e-3 for v in volumes[1:])  # tiny regions after the first round
    assert score <= 0.55
    assert single > 0.55


@pytest.mark.slow
def test_tsnpe_with_its_default_flow_narrows_onto_the_posterior():
    """A test of its own (it takes as long as the MAF's and amortized NPE's together), so that the two run side
    by side. The spline flow is not as close as the MAF here (module docstring): 0.545-0.572 on two machines,
    where amortized NPE scored 0.574-0.597; 0.60 holds for those and fails a flow that did not narrow."""
    score, volumes = tsnpe_c2st()
    print(f"C2ST against the exact posterior: TSNPE with its default flow {score:.3f}; volumes {volumes}")
    assert all(v < 0.05 for v in volumes[1:])
    assert score <= 0.60
