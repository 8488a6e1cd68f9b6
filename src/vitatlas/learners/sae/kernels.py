"""Numeric kernels of the sparse autoencoders, each with a hand-written gradient.

Why custom autograd functions: a TopK/BatchTopK SAE keeps about k of its n latents per row, yet a dense
implementation multiplies the full (B, n) code matrix into the decoder and back-propagates dense
(B, n) gradients through the encoder - about 6·B·n·d flops per step where only B·n·d (the encoder's
forward pre-activations, needed to choose the winners) are unavoidable. Here the chosen entries are a
``SparsePattern`` (row, column pairs) and

* ``gather_codes``: picks the chosen pre-activations; its backward is sparse (the encoder gradient only
  touches the chosen atoms' rows: CSR(n, B) @ x, an embedding-bag for dx, a bincount for the bias);
* ``sparse_decode``: sum of value · decoder row over the chosen entries (embedding-bag); its backward
  is a sampled dense-dense product for the values and CSR(n, B) @ grad for the decoder.

Also here: the JumpReLU straight-through estimators (Rajamanoharan et al., 2024) and the removal of
the decoder-gradient component parallel to each unit-norm decoder row. Every gradient is tested
against autograd on a dense float64 reference in ``tests/test_sae_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...arrays import csr_tensor


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return csr_tensor(crow, col, values, size, check_invariants=False)

_AMP = dict(device_type="cuda", cast_inputs=torch.float32)  # sparse kernels always run in float32+


# ---- the sparsity pattern --------------------------------------------------------------------------

@dataclass
class SparsePattern:
    """Chosen (row, column) entries of a (B, n) code matrix, sorted by row then column.

    rows, cols: (M,) int64; crow: (B + 1,) int64 CSR row pointers. The transposed (column-major) view
    used by the encoder/decoder weight gradients is built lazily once and shared by both kernels.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    n_rows: int
    n_cols: int
    _t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def from_flat(flat: torch.Tensor, n_rows: int, n_cols: int) -> SparsePattern:
        """From sorted flat indices row * n_cols + col (unique)."""
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        cols = flat - rows * n_cols
        counts = torch.bincount(rows, minlength=n_rows)
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=flat.device)
        crow[1:] = torch.cumsum(counts, 0)
        return SparsePattern(rows, cols, crow, n_rows, n_cols)

    @staticmethod
    def from_topk(indices: torch.Tensor, n_cols: int) -> SparsePattern:
        """From (B, k) column indices (k per row, any order)."""
        b, k = indices.shape
        cols = indices.sort(dim=1).values.reshape(-1)
        rows = torch.arange(b, device=indices.device).repeat_interleave(k)
        crow = torch.arange(0, b * k + 1, k, device=indices.device)
        return SparsePattern(rows, cols, crow, b, n_cols)

    @property
    def flat(self) -> torch.Tensor:
        return self.rows * self.n_cols + self.cols

    @property
    def offsets(self) -> torch.Tensor:
        return self.crow[:-1]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ccol (n+1,), rows sorted by column (M,), permutation order (M,)) for CSR of the transpose."""
        if self._t is None:
            order = torch.argsort(self.cols, stable=True)
            counts = torch.bincount(self.cols, minlength=self.n_cols)
            ccol = torch.zeros(self.n_cols + 1, dtype=torch.long, device=self.cols.device)
            ccol[1:] = torch.cumsum(counts, 0)
            self._t = (ccol, self.rows[order], order)
        return self._t

    def select(self, keep: torch.Tensor) -> SparsePattern:
        """The sub-pattern of entries where ``keep`` (M,) is True (still sorted)."""
        rows, cols = self.rows[keep], self.cols[keep]
        counts = torch.bincount(rows, minlength=self.n_rows)
        crow = torch.zeros(self.n_rows + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.cumsum(counts, 0)
        return SparsePattern(rows, cols, crow, self.n_rows, self.n_cols)


def _transpose_matmul(p: SparsePattern, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """S^T @ dense where S is the (B, n) sparse matrix with ``values`` on pattern p: result (n, d)."""
    ccol, rows_t, order = p.transposed()
    st = _csr(ccol, rows_t, values[order].contiguous(), (p.n_cols, p.n_rows))
    return st @ dense


def _sampled_dot(p: SparsePattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M,) entries of a @ b.T at the pattern: <a[rows], b[cols]> without forming a @ b.T."""
    if p.rows.numel() == 0:
        return a.new_zeros(0)
    if a.device.type in ("cpu", "cuda"):
        s = _csr(p.crow, p.cols, a.new_ones(p.rows.numel()), (p.n_rows, p.n_cols))
        return torch.sparse.sampled_addmm(s, a, b.T, beta=0.0).values()
    return (a[p.rows] * b[p.cols]).sum(1)  # pragma: no cover - other devices


# ---- gather: chosen pre-activations with a sparse encoder gradient ------------------------------

class _GatherCodes(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(**_AMP)
    def forward(ctx, pre: torch.Tensor, xc: torch.Tensor, enc: torch.Tensor, b_enc: torch.Tensor,
                p: SparsePattern) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(xc, enc)
        return pre.reshape(-1)[p.flat].to(xc.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor):
        xc, enc = ctx.saved_tensors
        p: SparsePattern = ctx.p
        g = g.contiguous()
        g_xc = g_enc = g_b = None
        if ctx.needs_input_grad[1]:
            g_xc = F.embedding_bag(p.cols, enc, p.offsets, mode="sum", per_sample_weights=g) \
                if p.rows.numel() else torch.zeros_like(xc)
        if ctx.needs_input_grad[2]:
            g_enc = _transpose_matmul(p, g, xc)
        if ctx.needs_input_grad[3]:
            g_b = torch.bincount(p.cols, weights=g, minlength=p.n_cols).to(g.dtype)
        return None, g_xc, g_enc, g_b, None


def gather_codes(pre: torch.Tensor, xc: torch.Tensor, enc: torch.Tensor, b_enc: torch.Tensor,
                 p: SparsePattern) -> torch.Tensor:
    """Values (M,) of ``pre = xc @ enc.T + b_enc`` at pattern p.

    pre: (B, n) computed without grad (it is needed whole to choose the entries); xc: (B, d);
    enc: (n, d) encoder rows; b_enc: (n,). Gradients flow to xc, enc and b_enc as if the chosen
    entries had been computed by the dense product, in O(M·d) instead of O(B·n·d).
    """
    return _GatherCodes.apply(pre.detach(), xc, enc, b_enc, p)


# ---- decode: sum of chosen decoder rows ---------------------------------------------------------

class _SparseDecode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(**_AMP)
    def forward(ctx, values: torch.Tensor, dec: torch.Tensor, p: SparsePattern) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(values, dec)
        if p.rows.numel() == 0:
            return dec.new_zeros(p.n_rows, dec.shape[1])
        return F.embedding_bag(p.cols, dec, p.offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor):
        values, dec = ctx.saved_tensors
        p: SparsePattern = ctx.p
        g = g.contiguous()
        g_values = _sampled_dot(p, g, dec) if ctx.needs_input_grad[0] else None
        g_dec = _transpose_matmul(p, values, g) if ctx.needs_input_grad[1] else None
        return g_values, g_dec, None


def sparse_decode(values: torch.Tensor, dec: torch.Tensor, p: SparsePattern) -> torch.Tensor:
    """(B, d) = S @ dec where S (B, n) holds ``values`` (M,) on pattern p; dec: (n, d)."""
    return _SparseDecode.apply(values, dec, p)


# ---- fused TopK path: codes and decoding in one function, gradients to the parameters only ---------

class _SparseCodesDecode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(**_AMP)
    def forward(ctx, pre: torch.Tensor, xc: torch.Tensor, b_dec: torch.Tensor, enc: torch.Tensor,
                b_enc: torch.Tensor, dec: torch.Tensor, p: SparsePattern):
        vals = pre.reshape(-1)[p.flat].to(dec.dtype).clamp_min_(0)
        out = F.embedding_bag(p.cols, dec, p.offsets, mode="sum", per_sample_weights=vals) \
            if p.rows.numel() else dec.new_zeros(p.n_rows, dec.shape[1])
        ctx.p = p
        ctx.save_for_backward(xc, enc, dec, vals)
        ctx.mark_non_differentiable(vals)
        return out, vals

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor, _g_vals):
        xc, enc, dec, vals = ctx.saved_tensors
        p: SparsePattern = ctx.p
        g = g.contiguous()
        # d out / d value = the decoder row; ReLU passes the gradient where the value is positive
        g_vals = _sampled_dot(p, g, dec) * (vals > 0).to(g.dtype)
        g_dec = _transpose_matmul(p, vals, g) if ctx.needs_input_grad[5] else None
        g_enc = _transpose_matmul(p, g_vals, xc) if ctx.needs_input_grad[3] else None
        g_b_enc = torch.bincount(p.cols, weights=g_vals, minlength=p.n_cols).to(g.dtype)
        # pre = (x - b_dec) @ enc.T + b_enc: b_dec's gradient is minus the row-sum of x's, i.e. -g_b_enc @ enc
        g_b_dec = -(g_b_enc @ enc) if ctx.needs_input_grad[2] else None
        return (None, None, g_b_dec, g_enc, g_b_enc if ctx.needs_input_grad[4] else None, g_dec, None)


def sparse_codes_decode(pre: torch.Tensor, xc: torch.Tensor, b_dec: torch.Tensor, enc: torch.Tensor,
                        b_enc: torch.Tensor, dec: torch.Tensor, p: SparsePattern
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded (B, d), codes (M,)): ReLU of ``pre = xc @ enc.T + b_enc`` at pattern p, decoded by ``dec``.

    ``xc = x - b_dec`` is given as a constant (computed once, without gradient, for the encoder GEMM);
    b_dec receives its gradient through xc here: ``-g_b_enc @ enc``, a vector-matrix product, instead of
    a (B, d) gradient for xc. This is ``gather_codes`` + ``sparse_decode`` in one function: the chosen
    codes are read once and the pattern's column-major view is built once for both weight gradients.
    The returned codes carry no gradient (they are for statistics).
    """
    return _SparseCodesDecode.apply(pre.detach(), xc.detach(), b_dec, enc, b_enc, dec, p)


class _SubsetDecode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(**_AMP)
    def forward(ctx, pre_sub: torch.Tensor, keep: torch.Tensor, xc: torch.Tensor, b_dec: torch.Tensor,
                enc: torch.Tensor, b_enc: torch.Tensor, dec: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        a = pre_sub.to(dec.dtype).clamp_min(0).mul_(keep)
        dec_s = dec[cols]
        ctx.save_for_backward(a, xc, enc, dec_s, cols)
        ctx.shape = (enc.shape, b_enc.shape, dec.shape)
        return a @ dec_s

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor):
        a, xc, enc, dec_s, cols = ctx.saved_tensors
        enc_shape, b_enc_shape, dec_shape = ctx.shape
        g_a = (g @ dec_s.T).mul_(a > 0)  # zero off the kept entries (a = 0 there) and where ReLU cut
        g_b_dec = g_enc = g_b_enc = g_dec = None
        g_b_s = g_a.sum(0)
        if ctx.needs_input_grad[6]:
            g_dec = g.new_zeros(dec_shape).index_copy_(0, cols, a.T @ g)
        if ctx.needs_input_grad[4]:
            g_enc = g.new_zeros(enc_shape).index_copy_(0, cols, g_a.T @ xc)
        if ctx.needs_input_grad[5]:
            g_b_enc = g.new_zeros(b_enc_shape).index_copy_(0, cols, g_b_s)
        if ctx.needs_input_grad[3]:
            g_b_dec = -(g_b_s @ enc[cols])
        return None, None, None, g_b_dec, g_enc, g_b_enc, g_dec, None


def subset_decode(pre_sub: torch.Tensor, keep: torch.Tensor, xc: torch.Tensor, b_dec: torch.Tensor,
                  enc: torch.Tensor, b_enc: torch.Tensor, dec: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, d) = (ReLU(pre_sub) ⊙ keep) @ dec[cols], dense over a subset of latents (AuxK's dead ones).

    pre_sub: (B, c) = ``pre[:, cols]`` of ``pre = xc @ enc.T + b_enc``, ``xc = x - b_dec`` (both computed
    without grad); keep: (B, c) 0/1 mask of the chosen entries. Gradients reach b_dec, enc, b_enc and
    dec as if pre had been computed with grad, through three (B, c, d) products - a GEMM is several
    times faster per entry than the sparse kernels, so this is the cheaper path when most of the c
    columns are chosen in most rows (``aux_k`` close to c).
    """
    return _SubsetDecode.apply(pre_sub.detach(), keep, xc.detach(), b_dec, enc, b_enc, dec, cols)


class _SquaredError(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(**_AMP)
    def forward(ctx, target: torch.Tensor, out: torch.Tensor, b_dec: torch.Tensor | None):
        e = target - out
        flat = e.reshape(-1)
        ctx.save_for_backward(e)
        ctx.has_bias = b_dec is not None
        ctx.mark_non_differentiable(e)
        return torch.dot(flat, flat), e

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor, _g_e):
        (e,) = ctx.saved_tensors
        g_out = e * (-2.0 * g)
        return None, g_out, (g_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None)


def squared_error(target: torch.Tensor, out: torch.Tensor, b_dec: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖target - out‖², the residual target - out (no gradient)), with the gradient in one pass.

    With ``b_dec``: target is ``x - b_dec`` computed without gradient, and b_dec gets the gradient of
    ‖x - b_dec - out‖² (the row-sum of out's), so the reconstruction x̂ = out + b_dec is never formed.
    """
    return _SquaredError.apply(target.detach(), out, b_dec)


# ---- choosing the entries -------------------------------------------------------------------------

def topk_pattern(pre: torch.Tensor, k: int) -> SparsePattern:
    """k largest pre-activations of every row (ReLU is applied to the gathered values afterwards)."""
    idx = torch.topk(pre, k, dim=1, sorted=False).indices
    return SparsePattern.from_topk(idx, pre.shape[1])


def batch_topk_pattern(pre: torch.Tensor, k: int) -> tuple[SparsePattern, torch.Tensor]:
    """The B·k largest positive pre-activations of the whole batch (BatchTopK, Bussmann et al. 2024).

    Returns the pattern and the smallest kept value (this batch's threshold, 0-d tensor).
    """
    b, n = pre.shape
    vals, flat = torch.topk(pre.reshape(-1), min(b * k, b * n), sorted=False)
    keep = vals > 0
    vals, flat = vals[keep], flat[keep]
    threshold = vals.min() if vals.numel() else pre.new_zeros(())
    return SparsePattern.from_flat(flat.sort().values, b, n), threshold


def threshold_pattern(pre: torch.Tensor, threshold: torch.Tensor) -> SparsePattern:
    """Entries with pre > threshold (threshold: 0-d or (n,)), i.e. the JumpReLU support."""
    b, n = pre.shape
    flat = torch.nonzero((pre > threshold).reshape(-1)).squeeze(1)
    return SparsePattern.from_flat(flat, b, n)


# ---- JumpReLU straight-through estimators ------------------------------------------------------

def _rect(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel: 1 on (-1/2, 1/2)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g * (pre > threshold).to(g.dtype)
        # d/dθ [z·H(z-θ)] ≈ -(θ/ε)·K((z-θ)/ε) (pseudo-derivative, Rajamanoharan et al. 2024, eq. 11)
        g_th = (-(threshold / eps) * _rect((pre - threshold) / eps) * g).sum(0)
        return g_pre, g_th, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # d/dθ H(z-θ) ≈ -(1/ε)·K((z-θ)/ε); no gradient to z (the L0 term trains only the thresholds)
        g_th = (-(1.0 / eps) * _rect((pre - threshold) / eps) * g).sum(0)
        return None, g_th, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """z·H(z - θ) per latent, θ (n,) trained through the straight-through pseudo-derivative."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(z - θ) (the L0 count's summands) with the straight-through pseudo-derivative for θ."""
    return _Step.apply(pre, threshold, bandwidth)


# ---- unit-norm decoder rows -------------------------------------------------------------------------

@torch.no_grad()
def remove_parallel_grad(dec: torch.Tensor, grad: torch.Tensor) -> None:
    """In place: grad_i -= (grad_i · w_i) w_i for unit-norm decoder rows w_i (dec, grad: (n, d)).

    This is the gradient of the loss as a function of w/‖w‖ at ‖w‖ = 1, so a step moves along the
    sphere to first order; the renormalisation after the step removes the second-order drift.
    """
    grad.sub_((grad * dec).sum(1, keepdim=True) * dec)


@torch.no_grad()
def normalize_rows_(w: torch.Tensor, eps: float = 1e-12) -> None:
    """In place: each row scaled to unit norm."""
    w.div_(w.norm(dim=1, keepdim=True).clamp_min(eps))
