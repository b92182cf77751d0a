"""Checks of user-given values shared by the model, data and analysis code: each failure
is a one-line :class:`~resunit.errors.ConfigError` that names the value and what it must be."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

from resunit.errors import ConfigError


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean x?)`` naming the choices closest to ``word``; empty if none is close."""
    if not isinstance(word, str):
        return ""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), by_lower, n=3)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


def require_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer ≥ ``minimum``; a ConfigError otherwise.

    Checked here because torch accepts a float stride or a zero channel count silently (or
    fails deep inside a layer). Booleans are refused although Python counts them as ints.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def require_fraction(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a number in [0, 1) (a drop probability); a
    ConfigError otherwise. Booleans are refused although Python counts them as numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


__all__ = ["did_you_mean", "require_fraction", "require_int"]
