"""One formatter for every number a reader sees: claims tables, "Checked below" sentences, the
ledger, tables made with ``run.table``.

Rules: digits that match the tolerance of the claim (a value checked to ±0.05 shows three
decimals, never more); an R² is shown as 1 − R², where the digits are; powers of ten as powers
(``3.2×10⁻¹³`` in plain text, ``$3.2\\times10^{-13}$`` in markdown, never ``3.2e-13``, which a
browser may break at the hyphen); a real minus sign.
"""
from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any

MINUS = "\u2212"
_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_R2 = re.compile(r"R²|R\^2|\bR2\b")
FIXED_RANGE = (1e-3, 1e4)  # outside it, powers of ten


def format_number(value: Any, *, sig: int = 4, decimals: int | None = None,
                  math_mode: bool = False) -> str:
    """A number as the page shows it.

    `decimals` fixes the digits after the point (used when a tolerance says which digits
    matter); otherwise `sig` significant digits, trailing zeros dropped. Values outside
    ``1e-3 <= abs(x) < 1e4`` are written as powers of ten: in plain text with superscripts, with
    ``math_mode`` as inline TeX. Anything that is not a real number is returned as ``str``.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return _minus(str(value)) if isinstance(value, str) and _looks_numeric(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_number(v, sig=sig, decimals=decimals, math_mode=math_mode)
                               for v in value) + "]"
    if isinstance(value, Integral) and abs(int(value)) < 10 ** 6:
        return _minus(str(int(value)))
    if not isinstance(value, Real):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return ("" if x > 0 else MINUS) + "∞"
    if x == 0:
        return "0"
    lo, hi = FIXED_RANGE
    if lo <= abs(x) < hi:
        if decimals is not None:
            return _minus(f"{x:.{max(0, decimals)}f}")
        d = max(0, sig - 1 - math.floor(math.log10(abs(x))))
        return _minus(_strip(f"{x:.{d}f}"))
    return _power_of_ten(x, sig, math_mode)


def _power_of_ten(x: float, sig: int, math_mode: bool) -> str:
    k = math.floor(math.log10(abs(x)))
    mantissa = round(x / 10 ** k, max(0, sig - 1))
    if abs(mantissa) >= 10:  # 9.999 rounded up
        mantissa, k = mantissa / 10, k + 1
    m = _strip(f"{mantissa:.{max(0, sig - 1)}f}")
    sign = "-" if m.startswith("-") else ""
    m = m.lstrip("-")
    if math_mode:
        body = f"10^{{{k}}}" if m == "1" else f"{m}\\times10^{{{k}}}"
        return f"${sign}{body}$"
    body = f"10{str(k).translate(_SUPERSCRIPT)}"
    return (MINUS if sign else "") + (body if m == "1" else f"{m}×{body}")


def _strip(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def _minus(text: str) -> str:
    return text.replace("-", MINUS) if text.startswith("-") else text


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"-\d+(\.\d+)?", text))


def _decimals_for(resolution: float) -> int:
    """Digits after the point that resolve a tolerance: one finer than its first digit."""
    return min(8, max(0, 1 - math.floor(math.log10(resolution))))


def _is_r2(claim: dict) -> bool:
    e, m = claim.get("expected"), claim.get("measured")
    return (claim.get("kind") == "min" and bool(_R2.search(str(claim.get("statement", ""))))
            and isinstance(e, Real) and isinstance(m, Real) and e < 1 and m <= 1)


def claim_view(claim: dict, *, math_mode: bool = False) -> dict:
    """How a claim reads on the page: ``label`` (``""`` or ``"1 − R²"``), ``measured``,
    ``expected`` (with its relation: ``−1 ± 0.02``, ``≤ 10⁻¹⁰``), ``limit`` (the number alone),
    ``bound`` (True for one-sided claims) and ``usage``: how much of its allowance the
    measurement uses (0 = exactly on the prediction, 1 = at the limit, > 1 = failed), which
    picks the worst case of a family."""
    kind, m, e = claim.get("kind", "abs"), claim.get("measured"), claim.get("expected")
    tol = claim.get("tolerance") or 0.0
    fmt = lambda v, **kw: format_number(v, math_mode=math_mode, **kw)  # noqa: E731
    if kind == "equal" or not _numeric(m) or not _numeric(e):
        return dict(label="", measured=fmt(m), expected=f"= {fmt(e)}", limit=fmt(e), bound=False,
                    usage=0.0 if claim.get("passed") else math.inf)
    m, e = float(m), float(e)
    if _is_r2(claim):
        kind, m, e, tol, label = "max", 1 - m, 1 - (e - tol), 0.0, "1 − R²"
    else:
        label = ""
    if kind in ("abs", "rel"):
        allowance = tol if kind == "abs" else tol * abs(e)
        if allowance > 0 and math.isfinite(m):
            digits = _decimals_for(allowance)
            lo, hi = FIXED_RANGE
            if lo <= abs(m) < hi:
                measured = fmt(m, decimals=digits)
            else:
                sig = math.floor(math.log10(abs(m))) - math.floor(math.log10(allowance)) + 2 if m else 2
                measured = fmt(m, sig=min(6, max(2, sig)))
        else:
            measured = fmt(m)
        spread = fmt(tol, sig=2) if kind == "abs" else f"{format_number(100 * tol, sig=2)}%"
        usage = abs(m - e) / allowance if allowance > 0 else (0.0 if m == e else math.inf)
        return dict(label=label, measured=measured, expected=f"{fmt(e, sig=6)} ± {spread}",
                    limit=fmt(e, sig=6), bound=False, usage=_finite_or_inf(usage))
    limit = e + tol if kind == "max" else e - tol
    if kind == "max":
        usage = m / limit if limit > 0 and m >= 0 else (0.0 if m <= limit else math.inf)
    else:
        usage = limit / m if limit > 0 and m > 0 else (0.0 if m >= limit else math.inf)
    return dict(label=label, measured=fmt(m, sig=2), bound=True, limit=fmt(limit, sig=3),
                expected=("≤ " if kind == "max" else "≥ ") + fmt(limit, sig=3),
                usage=_finite_or_inf(usage))


def _numeric(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) or v in ("nan", "inf", "-inf")


def _finite_or_inf(u: float) -> float:
    return u if math.isfinite(u) else math.inf
