r"""Private compute kernels of :mod:`medreg.losses.functional`.

Two hot spots get hand-written backward passes, so that their memory stays bounded and their
cost is a few separable filters or small matrix products:

* :class:`LocalCorrelation`: the local (windowed) correlation map of LNCC. The forward pass
  filters 5 (6 with a mask) product images once; the backward pass filters 3 more per input
  that needs a gradient, instead of autograd's transposed convolutions over every saved
  intermediate.
* :class:`JointHistogram`: the Parzen-window joint histogram of MI, accumulated over chunks of
  voxels as ``W_fixedᵀ W_moving`` with dense per-chunk weight matrices (cubic B-spline: 4
  non-zeros per row; Gaussian: all bins), so no ``(voxels × bins)`` tensor ever exists in full.

Both are exact (checked with :func:`torch.autograd.gradcheck` in the tests) but do not support
double backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Smallest local weight (or count) treated as non-empty.
TINY = 1e-12


# --------------------------------------------------------------------------- filtering
def filter_separable(x: Tensor, kernels: Sequence[Tensor | None], padding: str = "zeros") -> Tensor:
    """Filter every channel of ``x`` with one symmetric 1D kernel per spatial axis.

    The same operation as :func:`medreg.core.functional.separable_filter`, laid out for speed
    on CPU: the channels are made the innermost (``channels_last``) dimension and the zero
    padding is done by the convolution itself, which makes depthwise convolution several times
    faster than on a ``(N, C, ...)``-contiguous tensor.

    Args:
        x: ``(B, K, *spatial)`` (2D or 3D spatial).
        kernels: one odd-length symmetric 1D kernel per axis in ``(x, y, z)`` order; ``None``
            (or length 1) skips the axis.
        padding: ``"zeros"`` (the output has the input's size; the filter is self-adjoint) or
            ``"replicate"``.

    Returns:
        ``(B, K, *spatial)`` filtered tensor (possibly in ``channels_last`` memory format).
    """
    d = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    k = x.shape[1]
    if padding == "replicate":
        pads: list[int] = []
        for comp in range(d):  # F.pad lists the last tensor axis (x) first
            ker = kernels[comp]
            r = 0 if ker is None else ker.numel() // 2
            pads += [r, r]
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d)
    if fmt is not None and k > 1:
        x = x.contiguous(memory_format=fmt)
    for comp, ker in enumerate(kernels):
        if ker is None or ker.numel() == 1:
            if ker is not None and float(ker.reshape(-1)[0]) != 1.0:
                x = x * ker.reshape(-1)[0].to(x)
            continue
        axis = d - 1 - comp
        shape = [1] * d
        shape[axis] = ker.numel()
        weight = ker.to(x).reshape(1, 1, *shape).expand(k, 1, *shape).contiguous()
        pad = [0] * d
        if padding == "zeros":
            pad[axis] = ker.numel() // 2
        x = conv(x, weight, padding=tuple(pad), groups=k)
    return x


def window_counts(shape: Sequence[int], kernels: Sequence[Tensor | None], *, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """Kernel mass inside the image at each voxel (zero padding), ``(1, 1, *shape)``.

    ``kernels`` are in ``(x, y, z)`` order, ``shape`` in tensor order. The result is the
    filter of an all-ones image, built as an outer product of 1D filtered ones.
    """
    d = len(shape)
    out = torch.ones((1, 1) + (1,) * d, dtype=dtype, device=device)
    for comp, ker in enumerate(kernels):
        if ker is None or ker.numel() == 1:
            continue
        axis = d - 1 - comp
        n = shape[axis]
        ones = torch.ones(1, 1, n, dtype=dtype, device=device)
        c = F.conv1d(ones, ker.to(dtype=dtype, device=device).reshape(1, 1, -1),
                     padding=ker.numel() // 2).reshape(-1)
        view = [1, 1] + [1] * d
        view[2 + axis] = n
        out = out * c.reshape(view)
    return out


# --------------------------------------------------------------------------- LNCC
def _local_moments(fixed: Tensor, warped: Tensor, mask: Tensor | None,
                   kernels: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Local weighted means ``a, b`` and (co)variances ``vf, vw, c`` and the local mass ``n``."""
    # one stacked tensor, channels innermost, filtered in one go
    if mask is None:
        fields = [fixed, warped, fixed * fixed, warped * warped, fixed * warped]
    else:
        mf, mw = mask * fixed, mask * warped
        fields = [mf, mw, mf * fixed, mw * warped, mf * warped, mask.expand_as(fixed)]
    stacked = torch.cat(fields, dim=1)
    del fields
    sums = filter_separable(stacked, kernels, "zeros").contiguous()
    del stacked
    if mask is None:
        n = window_counts(fixed.shape[2:], kernels, dtype=fixed.dtype, device=fixed.device)
        sums = sums / n
    else:
        n = sums[:, 5:6].clamp_min(TINY)
        sums = sums[:, :5] / n
    a, b, aa, bb, ab = sums.unbind(1)
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    vf = (aa.unsqueeze(1) - a * a).clamp_min_(0.0)
    vw = (bb.unsqueeze(1) - b * b).clamp_min_(0.0)
    c = ab.unsqueeze(1) - a * b
    return a, b, vf, vw, c, n


class LocalCorrelation(torch.autograd.Function):
    """Local correlation map ``r`` (squared or signed) of two single-channel image batches.

    ``r = c² / (vf·vw + eps)`` (``squared``) or ``r = c / sqrt(vf·vw + eps)``, where ``c``,
    ``vf`` and ``vw`` are the local (mask-weighted) covariance and variances under the window.
    Inputs ``(B, 1, *spatial)``; ``mask`` is ``(B, 1, *spatial)`` or None (not differentiated).
    """

    @staticmethod
    def forward(ctx, fixed: Tensor, warped: Tensor, mask: Tensor | None, kernels: list,
                eps: float, squared: bool) -> Tensor:  # type: ignore[override]
        a, b, vf, vw, c, n = _local_moments(fixed, warped, mask, kernels)
        den = vf * vw + eps
        r = c * c / den if squared else c * torch.rsqrt(den)
        ctx.save_for_backward(fixed, warped, mask, a, b, vf, vw, c, n)
        ctx.kernels = kernels
        ctx.eps = eps
        ctx.squared = squared
        return r

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        fixed, warped, mask, a, b, vf, vw, c, n = ctx.saved_tensors
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_f or need_w):
            return None, None, None, None, None, None
        den = vf * vw + ctx.eps
        if ctx.squared:
            gc = grad * 2.0 * c / den
            t = grad * c * c / (den * den)
        else:
            inv = torch.rsqrt(den)
            gc = grad * inv
            t = grad * c * inv / (2.0 * den)
        # d r / d vf = -t vw, d r / d vw = -t vf; no gradient where a variance was clamped
        gvf = torch.where(vf > 0, -t * vw, torch.zeros_like(t))
        gvw = torch.where(vw > 0, -t * vf, torch.zeros_like(t))
        del t
        # moments are S(m x) / n: upstream gradients of the filtered fields, divided by n
        fields = []
        if need_f:
            fields += [(-gc * b - 2.0 * gvf * a) / n, gvf / n]
        if need_w:
            fields += [(-gc * a - 2.0 * gvw * b) / n, gvw / n]
        fields.append(gc / n)
        del gc, gvf, gvw
        back = filter_separable(torch.cat(fields, dim=1), ctx.kernels, "zeros").contiguous()
        del fields
        s_ab = back[:, -1:]
        grad_f = grad_w = None
        i = 0
        if need_f:
            grad_f = back[:, 0:1] + 2.0 * fixed * back[:, 1:2] + warped * s_ab
            i = 2
            if mask is not None:
                grad_f = grad_f * mask
        if need_w:
            grad_w = back[:, i:i + 1] + 2.0 * warped * back[:, i + 1:i + 2] + fixed * s_ab
            if mask is not None:
                grad_w = grad_w * mask
        return grad_f, grad_w, None, None, None, None


# --------------------------------------------------------------------------- MI
def _bspline_weights(t: Tensor, bins: int, derivative: bool) -> tuple[Tensor, Tensor | None]:
    """Dense cubic B-spline Parzen weights ``(c, bins)`` (and d/dt) for bin coordinates ``t``.

    ``t`` must lie in ``[2, bins - 3]`` so that the 4 supporting bins are inside.
    """
    i0 = t.floor().clamp_(2, bins - 3)
    u = (t - i0).unsqueeze(1)  # (c, 1) in [0, 1]
    idx = i0.long().unsqueeze(1) + torch.arange(-1, 3, device=t.device)
    u2 = u * u
    u3 = u2 * u
    w = torch.cat([(1 - u) ** 3 / 6, (3 * u3 - 6 * u2 + 4) / 6,
                   (-3 * u3 + 3 * u2 + 3 * u + 1) / 6, u3 / 6], dim=1)
    dense = torch.zeros(t.shape[0], bins, dtype=t.dtype, device=t.device).scatter_(1, idx, w)
    if not derivative:
        return dense, None
    dw = torch.cat([-0.5 * (1 - u) ** 2, 1.5 * u2 - 2 * u, -1.5 * u2 + u + 0.5, 0.5 * u2], dim=1)
    ddense = torch.zeros_like(dense).scatter_(1, idx, dw)
    return dense, ddense


def _gaussian_weights(t: Tensor, bins: int, sigma: float,
                      derivative: bool) -> tuple[Tensor, Tensor | None]:
    """Row-normalised Gaussian Parzen weights ``(c, bins)`` (and d/dt), centres at 0..bins-1."""
    centres = torch.arange(bins, dtype=t.dtype, device=t.device)
    z = (t.unsqueeze(1) - centres) / sigma
    e = torch.exp(-0.5 * z * z)
    w = e / e.sum(1, keepdim=True)
    if not derivative:
        return w, None
    s = -z / sigma  # d log e / dt
    dw = w * (s - (w * s).sum(1, keepdim=True))
    return w, dw


def parzen_weights(t: Tensor, bins: int, parzen: str, sigma: float,
                   derivative: bool = False) -> tuple[Tensor, Tensor | None]:
    """Parzen weights of bin coordinates ``t`` ``(c,)`` → ``(c, bins)`` (rows sum to 1)."""
    if parzen == "bspline":
        return _bspline_weights(t, bins, derivative)
    return _gaussian_weights(t, bins, sigma, derivative)


def _chunk_size(bins: int) -> int:
    return max(1024, (1 << 20) // max(bins, 1))


class JointHistogram(torch.autograd.Function):
    """Parzen joint histogram ``P[b, i, j] = Σ_v m_v K(tf_v − i) K(tm_v − j)``.

    Inputs ``tf, tm``: ``(B, V)`` bin coordinates; ``mask``: ``(B, V)`` weights or None (not
    differentiated). Output ``(B, bins, bins)`` (unnormalised: sums to ``Σ m``).
    """

    @staticmethod
    def forward(ctx, tf: Tensor, tm: Tensor, mask: Tensor | None, bins: int, parzen: str,
                sigma: float) -> Tensor:  # type: ignore[override]
        nb, nv = tf.shape
        out = torch.zeros(nb, bins, bins, dtype=tf.dtype, device=tf.device)
        step = _chunk_size(bins)
        for i in range(nb):
            for s in range(0, nv, step):
                wf, _ = parzen_weights(tf[i, s:s + step], bins, parzen, sigma)
                wm, _ = parzen_weights(tm[i, s:s + step], bins, parzen, sigma)
                if mask is not None:
                    wf = wf * mask[i, s:s + step].unsqueeze(1)
                out[i].addmm_(wf.t(), wm)
        ctx.save_for_backward(tf, tm, mask)
        ctx.bins, ctx.parzen, ctx.sigma = bins, parzen, sigma
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        tf, tm, mask = ctx.saved_tensors
        need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_f = torch.zeros_like(tf) if need_f else None
        grad_m = torch.zeros_like(tm) if need_m else None
        if not (need_f or need_m):
            return None, None, None, None, None, None
        bins, parzen, sigma = ctx.bins, ctx.parzen, ctx.sigma
        nb, nv = tf.shape
        step = _chunk_size(bins)
        for i in range(nb):
            g = grad[i]
            for s in range(0, nv, step):
                sl = slice(s, s + step)
                wf, dwf = parzen_weights(tf[i, sl], bins, parzen, sigma, derivative=need_f)
                wm, dwm = parzen_weights(tm[i, sl], bins, parzen, sigma, derivative=need_m)
                m = None if mask is None else mask[i, sl]
                if need_m:
                    left = wf if m is None else wf * m.unsqueeze(1)
                    grad_m[i, sl] = ((left @ g) * dwm).sum(1)
                if need_f:
                    gf = ((wm @ g.t()) * dwf).sum(1)
                    grad_f[i, sl] = gf if m is None else gf * m
        return grad_f, grad_m, None, None, None, None


def entropy_terms(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Marginal and joint entropies (nats) of normalised joint histograms ``(B, bins, bins)``."""
    def h(q: Tensor, dims: tuple[int, ...]) -> Tensor:
        return -(q * torch.log(q.clamp_min(1e-30))).sum(dims)

    return h(p.sum(2), (1,)), h(p.sum(1), (1,)), h(p, (1, 2))

