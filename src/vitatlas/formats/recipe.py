"""``ImportedSAE``: an SAE trained by another library, as a vitatlas ``Dictionary``.

Every supported format (see docs/formats.md) is mapped onto one forward pass, the *recipe*; each
format's reader only fills in tensors and switches::

    x1  = (x - shift) / scale                data normalisation done outside the SAE (saev's mean and
                                             norm scalar; SAELens expected_average_only_in: scale = 1/factor)
    x2  = row_norm(x1)                       SAELens constant_norm_rescale or layer_norm (per-row statistics)
    xc  = x2 - b_dec  if subtract_b_dec      SAELens apply_b_dec_to_input, saev's paper-era encode, ...
    pre = xc @ W_encᵀ + b_enc                W_enc and W_dec are stored (n_latents, d) whatever the source
    z   = activation(pre)                    ACTIVATIONS below
    y2  = z @ W_dec + b_dec
    y1  = row_norm⁻¹(y2)                     with the statistics of the rows just encoded
    x̂   = y1 · scale + shift  (+ x @ W_skipᵀ, sparsify's skip connection)

Codes are the library's own codes ``z``, unchanged. Two parts of a reconstruction depend on the input
rows and not on the codes alone: the inverse of a per-row normalisation and the skip connection. As
SAELens itself does, ``_encode`` keeps them for the rows it just encoded and ``_decode`` applies them to
codes of those rows (evaluation and interventions always decode right after encoding); decoding codes
of other rows through such an SAE is a one-line error.
"""

from __future__ import annotations

import math

import torch

from ..dictionary import ArrayLike, Dictionary
from ..errors import VitatlasError

ACTIVATIONS = (
    "relu",              # relu(pre)
    "topk",              # the k largest pre-activations per row, then relu (SAELens, sparsify, dictionary_learning)
    "topk_signed",       # the k largest pre-activations per row, kept as they are (saev's later TopK / BatchTopK)
    "jumprelu",          # relu(pre) where pre > threshold (>= with inclusive=True: overcomplete)
    "groupmax",          # relu(pre) split into k equal groups, the maximum of each kept (sparsify)
    "gated",             # (xc@W_encᵀ + b_gate > 0) · relu((xc@W_encᵀ)·exp(r_mag) + b_mag) (SAELens gated)
    "matching_pursuit",  # non-negative matching pursuit on xc with the tied decoder (SAELens)
)
ROW_NORMS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ImportedSAE(Dictionary):
    """An SAE read from another library's checkpoint (``vitatlas.formats``); inference only.

    ``source`` records where it came from (format, architecture, file, the checkpoint's own metadata).
    Saved and loaded like any vitatlas run (config.json + dictionary.safetensors, learner "imported").
    """

    learner = "imported"
    TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag", "shift", "W_skip")

    def __init__(self, n_latents: int, activation: str, *, k: int | None = None, subtract_b_dec: bool = True,
                 row_norm: str = "none", scale: float = 1.0, inclusive: bool = False,
                 residual_threshold: float = 0.0, max_iterations: int | None = None,
                 stop_on_duplicate_support: bool = True, source: dict | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        if activation not in ACTIVATIONS:
            raise VitatlasError(f"unknown imported-SAE activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if row_norm not in ROW_NORMS:
            raise VitatlasError(f"unknown row normalisation {row_norm!r}: expected one of {', '.join(ROW_NORMS)}")
        if activation in ("topk", "topk_signed", "groupmax") and not (isinstance(k, int) and 0 < k <= n_latents):
            raise VitatlasError(f"a {activation} SAE needs k between 1 and n_latents={n_latents}, got {k!r}")
        if activation == "groupmax" and n_latents % k:
            raise VitatlasError(f"a groupmax SAE needs n_latents ({n_latents}) divisible by k ({k})")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise VitatlasError(f"the input scale must be a positive number, got {scale!r}")
        if dtype not in DTYPES:
            raise VitatlasError(f"unknown dtype {dtype!r}: use float32 or float64")
        self.n_atoms, self.activation, self.k = int(n_latents), activation, k
        self.subtract_b_dec, self.row_norm, self.scale = bool(subtract_b_dec), row_norm, float(scale)
        self.inclusive = bool(inclusive)
        self.residual_threshold, self.max_iterations = float(residual_threshold), max_iterations
        self.stop_on_duplicate_support = bool(stop_on_duplicate_support)
        self.source = dict(source or {})
        self.device, self.dtype, self.dtype_name = device, DTYPES[dtype], dtype
        self.d = None
        self.fit_info = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._rows: tuple | None = None  # (n_rows, out_mul, out_add, skip) of the rows last encoded

    # ---- construction -------------------------------------------------------------------------------
    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> ImportedSAE:
        """Install the recipe's tensors (already checked by the format's reader); sets ``d``."""
        unknown = set(tensors) - set(self.TENSORS)
        if unknown:
            raise VitatlasError(f"unknown imported-SAE tensors {sorted(unknown)}: expected some of {', '.join(self.TENSORS)}")
        for name in ("W_dec", "b_dec") + (() if self.activation == "matching_pursuit" else ("W_enc", "b_enc")):
            if name not in tensors:
                raise VitatlasError(f"imported SAE is missing tensor {name}: the checkpoint is incomplete")
        self.tensors = {k: v.detach().to(self.device, self.dtype).contiguous() for k, v in tensors.items()}
        self.d = int(self.tensors["W_dec"].shape[1])
        return self

    def fit(self, X: ArrayLike, **kwargs) -> ImportedSAE:
        raise VitatlasError("an imported SAE is used as trained by its library: vitatlas does not train it further "
                            "(fit a vitatlas SAE with `vitatlas fit sae` instead)")

    # ---- Dictionary interface -----------------------------------------------------------------------
    @property
    def atoms(self) -> torch.Tensor:
        self._check_fitted()
        w = self.tensors["W_dec"]
        return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def _config(self) -> dict:
        return {"n_latents": self.n_atoms, "activation": self.activation, "k": self.k,
                "subtract_b_dec": self.subtract_b_dec, "row_norm": self.row_norm, "scale": self.scale,
                "inclusive": self.inclusive, "residual_threshold": self.residual_threshold,
                "max_iterations": self.max_iterations, "stop_on_duplicate_support": self.stop_on_duplicate_support,
                "source": self.source, "device": self.device, "dtype": self.dtype_name}

    def _state(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.set_tensors({k: v for k, v in tensors.items() if k in self.TENSORS})
        if self.d != int(meta["d"]):
            raise VitatlasError(f"saved imported SAE has W_dec of width {self.d} but its config says d={meta['d']}: "
                                "the run is damaged; import it again")

    @property
    def needs_rows(self) -> bool:
        """Whether decoding depends on the rows encoded (a per-row normalisation or a skip connection)."""
        return self.row_norm != "none" or "W_skip" in self.tensors

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        x1 = x
        if "shift" in t:
            x1 = x1 - t["shift"]
        if self.scale != 1.0:
            x1 = x1 / self.scale
        x2, mul, add = self._row_norm_in(x1)
        xc = x2 - t["b_dec"] if self.subtract_b_dec else x2
        z = self._activate(xc)
        skip = x @ t["W_skip"].T if "W_skip" in t else None
        self._rows = (x.shape[0], mul, add, skip) if self.needs_rows else None
        return z

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        y = codes @ t["W_dec"] + t["b_dec"]
        skip = None
        if self.needs_rows:
            if self._rows is None or self._rows[0] != codes.shape[0]:
                raise VitatlasError(
                    f"this SAE's reconstruction depends on the input rows ({self._row_dependence()}): decode codes "
                    "right after encoding the same rows, or use reconstruct(X)")
            _, mul, add, skip = self._rows
            if mul is not None:
                y = y * mul + add
        if self.scale != 1.0:
            y = y * self.scale
        if "shift" in t:
            y = y + t["shift"]
        return y if skip is None else y + skip

    def _row_dependence(self) -> str:
        parts = [f"normalize_activations={self.row_norm}"] if self.row_norm != "none" else []
        return ", ".join(parts + (["skip connection W_skip"] if "W_skip" in self.tensors else []))

    # ---- the recipe's steps -------------------------------------------------------------------------
    def _row_norm_in(self, x: torch.Tensor):
        """x -> (normalised x, mul, add) with the inverse y -> y · mul + add (SAELens's run-time norms)."""
        if self.row_norm == "constant_norm_rescale":
            coeff = math.sqrt(x.shape[1]) / x.norm(dim=1, keepdim=True)
            return x * coeff, 1 / coeff, 0.0
        if self.row_norm == "layer_norm":
            mu = x.mean(dim=1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=1, keepdim=True)  # unbiased, as torch's default in SAELens
            return xc / (std + LAYER_NORM_EPS), std, mu
        return x, None, None

    def _activate(self, xc: torch.Tensor) -> torch.Tensor:
        t, act = self.tensors, self.activation
        if act == "matching_pursuit":
            return matching_pursuit(xc, t["W_dec"], self.residual_threshold,
                                    self.max_iterations or xc.shape[1], self.stop_on_duplicate_support)
        lin = xc @ t["W_enc"].T
        if act == "gated":
            gate = (lin + t["b_gate"]) > 0
            return gate * torch.relu(lin * t["r_mag"].exp() + t["b_mag"])
        pre = lin + t["b_enc"]
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            keep = pre >= t["threshold"] if self.inclusive else pre > t["threshold"]
            return torch.relu(pre) * keep
        if act == "groupmax":
            values, idx = torch.relu(pre).unflatten(1, (self.k, -1)).max(dim=2)
            offsets = torch.arange(0, self.n_atoms, self.n_atoms // self.k, device=pre.device)
            return torch.zeros_like(pre).scatter_(1, idx + offsets, values)
        values, idx = torch.topk(pre, self.k, dim=1)
        if act == "topk":
            values = torch.relu(values)
        return torch.zeros_like(pre).scatter_(1, idx, values)


def matching_pursuit(residual: torch.Tensor, W_dec: torch.Tensor, residual_threshold: float, max_iterations: int,
                     stop_on_duplicate_support: bool) -> torch.Tensor:
    """Non-negative matching pursuit with the tied decoder, as SAELens's matching_pursuit architecture runs it.

    Each step takes the atom of largest relu(correlation) with the residual, adds relu(<r, atom>) to its
    code (an atom may be taken again) and subtracts that from the residual. A row stops (its later
    steps add nothing) once its support did not change in a step (``stop_on_duplicate_support``) or
    its residual norm fell below ``residual_threshold`` (> 0 to use it); all stop after ``max_iterations``.
    """
    r = residual.clone()
    n = r.shape[0]
    codes = torch.zeros(n, W_dec.shape[0], device=r.device, dtype=r.dtype)
    support = torch.zeros(n, W_dec.shape[0], dtype=torch.bool, device=r.device)
    done = torch.zeros(n, dtype=torch.bool, device=r.device)
    for _ in range(max_iterations):
        best = (r @ W_dec.T).relu().argmax(dim=1, keepdim=True)
        atom = W_dec[best.squeeze(1)]
        value = (r * atom).sum(dim=1, keepdim=True).relu() * (~done).unsqueeze(1)
        codes.scatter_add_(1, best, value)
        r = r - value * atom
        if stop_on_duplicate_support:
            now = codes != 0
            done = done | (now == support).all(dim=1)
            support = now
        if residual_threshold > 0:
            done = done | (r.norm(dim=1) < residual_threshold)
        if bool(done.all()):
            break
    return codes
