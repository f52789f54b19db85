"""The activation registry: classes, q, beta1, h_sigma (SPEC §4) and the torch functions.

The expected values are derived by hand from the Taylor series at 0, independently of the
registry's sympy code: for sigma(z) = sum a_k z^k, phi_sigma(z) = z sigma'(z) - sigma(z) has
coefficients c_k = (k - 1) a_k, so c_0 = -sigma(0), c_1 = 0 and the leading term decides the class.
"""
import math

import pytest
import torch

from saddle_escape.sim import activations
from saddle_escape.book.params import ParameterError

SQRT_PI = math.sqrt(math.pi)

# name: (class, q, beta1, h_sigma, sigma(0))
#   tanh = z - z^3/3 + ...          -> c3 = 2 * (-1/3) = -2/3
#   sin  = z - z^3/6 + ...          -> c3 = 2 * (-1/6) = -1/3
#   erf  = 2/sqrt(pi) (z - z^3/3)   -> beta1 = 2/sqrt(pi), c3 = -4 / (3 sqrt(pi))
#   gelu = z/2 (1 + erf(z/sqrt2)) = z/2 + z^2/sqrt(2 pi) + ...  -> c2 = 1/sqrt(2 pi)
#   swish = z (1/2 + z/4 - ...)     -> beta1 = 1/2, c2 = 1/4
#   sigmoid = 1/2 + z/4 - z^3/48    -> c0 = -1/2, beta1 = 1/4
#   softplus = log 2 + z/2 + z^2/8  -> c0 = -log 2, beta1 = 1/2
EXPECTED = {
    "linear": ("A", None, 1.0, 0.0, 0.0),
    "relu": ("A", None, 1.0, 0.0, 0.0),
    "tanh": ("B", 3, 1.0, -2 / 3, 0.0),
    "sin": ("B", 3, 1.0, -1 / 3, 0.0),
    "erf": ("B", 3, 2 / SQRT_PI, -4 / (3 * SQRT_PI), 0.0),
    "gelu": ("C", 2, 0.5, 1 / math.sqrt(2 * math.pi), 0.0),
    "swish": ("C", 2, 0.5, 0.25, 0.0),
    "sigmoid": ("D", 0, 0.25, -0.5, 0.5),
    "softplus": ("D", 0, 0.5, -math.log(2), math.log(2)),
    "quadratic": ("C", 2, 1.0, 0.5, 0.0),   # default a = 0.5: h = a
}


def test_every_registered_activation_is_tabulated():
    assert set(activations.NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_table(name):
    cls, q, beta1, h, s0 = EXPECTED[name]
    act = activations.get(name)
    assert act.cls == cls
    assert act.q == q
    assert act.beta1 == pytest.approx(beta1, rel=1e-14)
    assert act.h_sigma == pytest.approx(h, rel=1e-14, abs=1e-15)
    assert act.sigma0 == pytest.approx(s0, rel=1e-14, abs=1e-15)
    # c_k = (k - 1) a_k for every coefficient (the Euler-defect series from sigma's series)
    for k, (a, c) in enumerate(zip(act.sigma_coefficients, act.phi_coefficients)):
        assert float(c) == pytest.approx((k - 1) * float(a), abs=1e-15)


def test_next_terms_of_the_series():
    # tanh = z - z^3/3 + 2 z^5/15: c5 = 4 * 2/15
    assert float(activations.get("tanh").phi_coefficients[5]) == pytest.approx(8 / 15, rel=1e-14)
    # sin: a5 = 1/120 -> c5 = 4/120
    assert float(activations.get("sin").phi_coefficients[5]) == pytest.approx(1 / 30, rel=1e-14)
    # sigmoid: a3 = -1/48 -> c3 = -1/24
    assert float(activations.get("sigmoid").phi_coefficients[3]) == pytest.approx(-1 / 24, rel=1e-14)


@pytest.mark.parametrize("a", [0.25, -1.5, 2.0])
def test_quadratic_parameter(a):
    act = activations.get("quadratic", a=a)
    assert (act.cls, act.q, act.beta1) == ("C", 2, 1.0)
    assert act.h_sigma == pytest.approx(a, rel=1e-14)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert torch.allclose(act.fn(x), x + a * x * x, rtol=0, atol=1e-15)


def test_by_class_groups():
    assert set(activations.by_class("A")) == {"linear", "relu"}
    assert set(activations.by_class("B")) == {"tanh", "sin", "erf"}
    assert set(activations.by_class("C")) == {"gelu", "swish", "quadratic"}
    assert set(activations.by_class("D")) == {"sigmoid", "softplus"}
    assert activations.get("silu") is activations.get("swish")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torch_function_and_derivative_match_sympy_and_autograd(name):
    act = activations.get(name)
    # avoid ReLU's kink at exactly 0
    x = torch.linspace(-3.1, 2.9, 41, dtype=torch.float64).requires_grad_(True)
    y = act.fn(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    x = x.detach()
    assert y.dtype == torch.float64
    assert torch.allclose(act.dfn(x), dy, rtol=1e-12, atol=1e-14)
    # the sympy expression is the same function
    import sympy as sp
    f = sp.lambdify(activations.z, act.expr, modules=["math", {"Max": max, "erf": math.erf}])
    ref = torch.tensor([float(f(float(v))) for v in x], dtype=torch.float64)
    assert torch.allclose(y.detach(), ref, rtol=1e-12, atol=1e-14)
    # phi = x sigma'(x) - sigma(x)
    assert torch.allclose(act.phi(x), x * dy - y.detach(), rtol=1e-12, atol=1e-14)


def test_relu_and_linear_have_zero_phi():
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)
    for name in ("linear", "relu"):
        assert torch.all(activations.get(name).phi(x) == 0)
        assert activations.get(name).phi_series_latex() == "0"


def test_unknown_activation_names_the_parameter():
    with pytest.raises(ParameterError) as err:
        activations.get("swishy")
    assert err.value.name == "activation"
    assert "tanh" in str(err.value)          # lists what is allowed
    with pytest.raises(ParameterError, match="activation"):
        activations.get("tanh", a=1.0)
