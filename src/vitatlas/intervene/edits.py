"""Edits on dictionary codes inside the residual stream: the one kernel every intervention goes through.

At a layer, the chosen tokens x (rows of the residual stream) are encoded with the dictionary, the
chosen atoms' codes are changed (f -> f'), decoded, and the error term is added back:

    x' = decode(f') + (x - decode(f))  =  x + (decode(f') - decode(f))

We compute the right-hand form: it is the same number mathematically, but an edit that changes no
code leaves x bit-for-bit unchanged (the left form would add rounding noise of the order of
1e-7·|x|), and it keeps whatever the dictionary cannot explain — the error term — exactly in place.

Operations on atom a (value v; ``relative=True`` multiplies v by the atom's max observed activation):
    ablate  f'_a = 0
    clamp   f'_a = v
    scale   f'_a = v · f_a          (v is a factor; ``relative`` does not apply)
    add     f'_a = f_a + v          (adds v·atom_a to the residual stream for a linear decoder)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dictionary import Dictionary
from ..errors import VitatlasError

OPS = ("ablate", "clamp", "scale", "add")


@dataclass(frozen=True)
class Edit:
    """Change atom ``atom``'s code: ``op`` in ablate/clamp/scale/add, ``value`` in units of the atom's max
    observed activation when ``relative`` (clamp, add), a plain factor for scale."""

    atom: int
    op: str = "clamp"
    value: float = 0.0
    relative: bool = True

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise VitatlasError(f"unknown edit op {self.op!r}: use one of {', '.join(OPS)}")
        if isinstance(self.atom, bool) or not isinstance(self.atom, (int, np.integer)):
            raise VitatlasError(f"edit atom must be an integer atom id, got {self.atom!r}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise VitatlasError(f"edit value must be a number, got {self.value!r}") from None
        if not math.isfinite(value):
            raise VitatlasError(f"edit value (strength) must be a finite number, got {self.value!r}")
        object.__setattr__(self, "atom", int(self.atom))
        object.__setattr__(self, "value", value)

    @property
    def needs_max(self) -> bool:
        """Whether this edit needs the atom's max observed activation."""
        return self.relative and self.op in ("clamp", "add")


def as_edits(edits: Edit | dict | Iterable[Edit | dict]) -> list[Edit]:
    """Edits from Edit objects or dicts like ``{"atom": 3, "value": 0}`` (op defaults to clamp, relative)."""
    if isinstance(edits, (Edit, dict)):
        edits = [edits]
    out = []
    for e in edits:
        if isinstance(e, Edit):
            out.append(e)
        elif isinstance(e, dict):
            unknown = set(e) - {"atom", "op", "value", "relative"}
            if unknown or "atom" not in e:
                raise VitatlasError(f"an edit dict needs 'atom' and may have 'op', 'value', 'relative'; got {e}")
            out.append(Edit(**e))
        else:
            raise VitatlasError("an edit must be an Edit or a dict like {'atom': 3, 'value': 0}, "
                                f"got {type(e).__name__}")
    return out


def check_edits(edits: Sequence[Edit], n_atoms: int, max_activations: torch.Tensor | None) -> None:
    """One-line errors for atoms out of range and relative edits without max activations."""
    for e in edits:
        if not 0 <= e.atom < n_atoms:
            raise VitatlasError(f"atom {e.atom} is out of range: this dictionary has {n_atoms} atoms "
                                f"(0..{n_atoms - 1})")
    if max_activations is None and any(e.needs_max for e in edits):
        raise VitatlasError("relative edit values need each atom's max observed activation: pass max_activations "
                            "(from AtomCards, or vitatlas.intervene.maxact.max_activations(dictionary, store)) "
                            "or use relative=False")


def as_max_activations(values: Any, n_atoms: int) -> torch.Tensor | None:
    """(n_atoms,) float32 max activations from an array/tensor/list, checked; None stays None."""
    if values is None:
        return None
    t = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                                   dtype=np.float64)).float()
    if t.ndim != 1 or t.shape[0] != n_atoms:
        raise VitatlasError(f"max_activations must have one value per atom ({n_atoms}), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise VitatlasError("max_activations has NaN or Inf values")
    return t


def apply_edits(codes: torch.Tensor, edits: Sequence[Edit], max_activations: torch.Tensor | None) -> torch.Tensor:
    """Codes (n, A) -> edited copy. Edits apply in order (two edits on one atom compose)."""
    out = codes.clone()
    for e in edits:
        scale = float(max_activations[e.atom]) if e.needs_max else 1.0
        col = out[:, e.atom]
        if e.op == "ablate":
            out[:, e.atom] = 0
        elif e.op == "clamp":
            out[:, e.atom] = e.value * scale
        elif e.op == "scale":
            out[:, e.atom] = col * e.value
        else:  # add
            out[:, e.atom] = col + e.value * scale
    return out


def edit_rows(x: torch.Tensor, dictionary: Dictionary, edits: Sequence[Edit],
              max_activations: torch.Tensor | None, *, direction: torch.Tensor | None = None,
              codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edit rows x (n, d) of the residual stream. Returns (x', codes f, edited codes f').

    ``direction`` (d,) turns the edit into its random-direction control: each row moves by
    ‖decode(f') − decode(f)‖ along ``direction`` (unit) instead of along the edited atoms. ``codes``
    (n, A) are x's codes when the caller already has them (several edits of the same rows).
    """
    dev, dt = dictionary.device, dictionary.dtype
    xd = x.to(dev, dt)
    codes = dictionary._encode(xd) if codes is None else codes.to(dev, dt)
    edited = apply_edits(codes, edits, max_activations.to(dev) if max_activations is not None else None)
    delta = dictionary._decode(edited) - dictionary._decode(codes)
    if direction is not None:
        unit = direction.to(dev, dt) / direction.norm()
        delta = delta.norm(dim=1, keepdim=True) * unit
    # rows whose codes did not change get exactly zero delta (decode is deterministic per row)
    return x + delta.to(x.device, x.dtype), codes, edited
