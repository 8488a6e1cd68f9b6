"""Learner options: declared constraints checked by one function, plus small cross-option rules.

Every learner keeps its options in a frozen dataclass deriving from ``Options``. Each field declares
its constraint with ``option(default, rule)`` — a type, a range or a set of choices — and
``check_options`` (run by ``__post_init__``) checks and normalises every field the same way, raising
a one-line ``OptionError`` (a ``VitatlasError`` and a ``ValueError``). Rules between options (k below
the number of atoms, prefix sizes ending at the width, ...) are the small named helpers at the end.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(Options):
    ...     n: int = option(8, Int(min=1))
    ...     rate: float = option(0.5, Real(min=0, max=1))
    >>> Demo(n=4)
    Demo(n=4, rate=0.5)
    >>> Demo(rate=float("nan"))
    Traceback (most recent call last):
    ...
    vitatlas.errors.OptionError: rate must be a number in [0, 1], got nan
    >>> Demo.from_dict({"n": 2, "speed": 1})
    Traceback (most recent call last):
    ...
    vitatlas.errors.OptionError: unknown option 'speed' for Demo: known options are n, rate
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from ..devices import check_device
from ..errors import OptionError

INT_MAX = 2**31 - 1  # counts and seeds above this are typos, not requests
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)) and not isinstance(value, bool))


class Rule:
    """A declared constraint: ``check(name, value)`` returns the normalised value or raises OptionError."""

    optional = False  # None is allowed (and means "automatic")

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        return value

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not self.accepts(value):
            auto = f" or None ({getattr(self, 'none_means', 'automatic')})" if self.optional else ""
            raise OptionError(f"{name} must be {self.describe()}{auto}, got {_short(value)}")
        return self.normalise(value)


def _bounds(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


@dataclass(frozen=True)
class Int(Rule):
    """An integer (not a bool) in [min, max]."""

    min: int | None = None
    max: int = INT_MAX
    optional: bool = False

    def describe(self) -> str:
        if self.min == 1 and self.max == INT_MAX:
            return "a positive integer"
        if self.min == 0 and self.max == INT_MAX:
            return "a non-negative integer"
        return f"an integer {_bounds(self.min, self.max, False, False)}"

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.min is None or value >= self.min) and value <= self.max

    def normalise(self, value: Any) -> int:
        return int(value)


@dataclass(frozen=True)
class Real(Rule):
    """A finite real number in the given range (ints are accepted and become floats)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.min is None and self.max is None:
            return "a finite number"
        if self.min == 0 and self.max is None:
            return "a positive number" if self.min_open else "a finite number >= 0"
        return f"a number {_bounds(self.min, self.max, self.min_open, self.max_open)}"

    def accepts(self, value: Any) -> bool:
        if not _is_real(value) or not math.isfinite(float(value)):
            return False
        v = float(value)
        low_ok = self.min is None or (v > self.min if self.min_open else v >= self.min)
        high_ok = self.max is None or (v < self.max if self.max_open else v <= self.max)
        return low_ok and high_ok

    def normalise(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class Flag(Rule):
    """True or False."""

    def describe(self) -> str:
        return "True or False"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def normalise(self, value: Any) -> bool:
        return bool(value)


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of values (compared by type and value, so 1 never matches True)."""

    choices: tuple = ()
    what: str = ""  # e.g. "SAE kind": the error then says "unknown SAE kind ..."
    optional: bool = False

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def accepts(self, value: Any) -> bool:
        def same_kind(c):  # str subclasses (numpy.str_) are strings; True is not the choice 1
            return isinstance(value, str) if isinstance(c, str) else type(value) is type(c)
        return any(same_kind(c) and value == c for c in self.choices)

    def normalise(self, value: Any) -> Any:
        return str(value) if isinstance(value, str) else value

    def check(self, name: str, value: Any) -> Any:
        if self.what and not (value is None and self.optional) and not self.accepts(value):
            raise OptionError(f"unknown {self.what} {_short(value)}: choose {self.describe()}")
        return super().check(name, value)


@dataclass(frozen=True)
class Either(Rule):
    """A value any of several rules accepts (e.g. 'auto' or a positive integer)."""

    rules: tuple = ()
    optional: bool = False
    none_means: str = "automatic"

    def describe(self) -> str:
        return " or ".join(r.describe() for r in self.rules)

    def accepts(self, value: Any) -> bool:
        return any(r.accepts(value) for r in self.rules)

    def normalise(self, value: Any) -> Any:
        return next(r for r in self.rules if r.accepts(value)).normalise(value)


@dataclass(frozen=True)
class Ints(Rule):
    """A non-empty list or tuple of integers >= min, stored as a tuple (hashable, so configs compare)."""

    min: int = 1
    optional: bool = False

    def describe(self) -> str:
        return f"a list of integers >= {self.min}"

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and all(Int(min=self.min).accepts(v) for v in value))

    def normalise(self, value: Any) -> tuple[int, ...]:
        return tuple(int(v) for v in value)


@dataclass(frozen=True)
class Device(Rule):
    """'cpu', 'cuda' or 'cuda:N', available on this machine."""

    def describe(self) -> str:
        return "a device string such as 'cpu' or 'cuda'"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def normalise(self, value: str) -> str:
        return resolve_device(str(value))


@dataclass(frozen=True)
class DType(Rule):
    """A floating-point dtype name the learners compute in."""

    def describe(self) -> str:
        return "one of " + ", ".join(repr(d) for d in DTYPES)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def normalise(self, value: str) -> str:
        resolve_dtype(str(value))
        return str(value)


def option(default: Any = dataclasses.MISSING, rule: Rule | None = None, doc: str = "") -> Any:
    """A dataclass field with its declared constraint (and a one-line description for the docs)."""
    return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc})


def check_options(config: Options) -> None:
    """Check and normalise every declared field of ``config`` in place (the one validation function)."""
    for f in fields(config):
        rule = f.metadata.get("rule")
        if rule is not None:
            object.__setattr__(config, f.name, rule.check(f.name, getattr(config, f.name)))
    config.check_rules()


@dataclass(frozen=True)
class Options:
    """Base of every learner's options: checked on construction, compared with ``==``, JSON-able."""

    what: ClassVar[str] = "options"  # how errors name the owner, e.g. "a topk SAE"

    def __post_init__(self) -> None:
        check_options(self)

    def check_rules(self) -> None:
        """Cross-option rules (subclasses call the named helpers below)."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> Options:
        """Build from keyword options, naming unknown or missing ones in a one-line OptionError."""
        unknown = [k for k in values if k not in cls.names()]
        if unknown:
            raise OptionError(f"unknown option {unknown[0]!r} for {cls.__name__}: known options are "
                              f"{', '.join(cls.names())}")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise OptionError(f"{cls.what} needs {missing[0]}")
        return cls(**values)

    def to_dict(self) -> dict:
        """Field values as JSON-able Python (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# ---- device and dtype ------------------------------------------------------------------------------

def resolve_dtype(name: str) -> torch.dtype:
    """'float32' / 'float64' -> torch dtype, or a one-line error."""
    if not isinstance(name, str) or name not in DTYPES:
        raise OptionError(f"unknown dtype {_short(name)}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    """Check a device string; a CUDA device on a machine without one is a clear error (an OptionError)."""
    return check_device(device, error=OptionError)


# ---- cross-option rules ----------------------------------------------------------------------------

def require_k_below(k: int, n: int, n_name: str) -> None:
    """Sparsity strictly below a count (an SAE's k < n_latents)."""
    if k >= n:
        raise OptionError(f"k={k} must be smaller than {n_name}={n}")


def require_enough_atoms(k: int, n_atoms: int) -> None:
    """A sample cannot use more atoms than exist."""
    if n_atoms < k:
        raise OptionError(f"n_atoms={n_atoms} is smaller than k={k}: a sample cannot use more atoms than exist")


def require_prefix_sizes(groups: tuple[int, ...] | None, total: int, total_name: str, first_at_least: int = 1) -> None:
    """Matryoshka prefix sizes: strictly increasing, the first >= ``first_at_least``, the last == total."""
    if groups is None:
        return
    increasing = all(b > a for a, b in zip(groups, groups[1:]))
    if not increasing or groups[0] < first_at_least or groups[-1] != total:
        example = f"[{max(first_at_least, total // 4)}, {total}]"
        raise OptionError(f"groups must be increasing prefix sizes from at least {first_at_least} ending at "
                          f"{total_name}={total}, e.g. {example}; got {list(groups)}")
