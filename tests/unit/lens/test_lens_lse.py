"""The log-sum-exp engine (qrnca_lens/lens/lse.py): the series' truncation order."""

from __future__ import annotations

import torch

from qrnca_lens.lens import lse as lens_mod


def test_series_order_bounds_the_truncation():
    for rho in (0.01, 0.1, 0.5, 1.0, 3.0):
        n = lens_mod._series_order(rho, 1e-8)
        exact = torch.tensor(rho, dtype=torch.float64).exp()
        partial = sum(rho**k / torch.exp(torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64))) for k in range(n + 1))
        assert abs(float(exact - partial)) / float(torch.exp(torch.tensor(-rho))) <= 1e-8
        if n > 1:  # and N is the smallest such order for the bound
            bound = rho ** n * torch.exp(torch.tensor(2 * rho)) / torch.exp(torch.lgamma(torch.tensor(n + 1.0)))
            assert float(bound) > 1e-8
