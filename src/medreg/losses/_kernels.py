r"""Private compute kernels of :mod:`medreg.losses.functional`.

The hot spots get hand-written backward passes, so that memory stays at a few image-sized
tensors and the cost is a few separable filters, gathers or scatters:

* :class:`LocalCorrelation`: the local (windowed) correlation map of LNCC. The forward pass
  filters 5 (6 with a mask) product images once; the backward pass filters 3 more per input
  that needs a gradient, instead of autograd's transposed convolutions over every saved
  intermediate.
* :class:`JointHistogram`: the Parzen-window joint histogram of MI, accumulated over chunks of
  voxels (sparse weights: 4 bins per sample for the cubic B-spline, ``2⌈6σ⌉+1`` for the
  Gaussian, spread into one reused ``(chunk, bins)`` matrix per image and multiplied), so
  no ``(voxels × bins)`` tensor ever exists.
* :class:`LocalMean`, :class:`GatherWindows`, :class:`MindDescriptor`: the three stages of
  MIND-SSC (patch distances, shifted copies, normalisation).
* :class:`StencilEnergy`: quadratic finite-difference energies (diffusion, bending).

All are exact (checked with :func:`torch.autograd.gradcheck` in the tests) but do not support
double backward.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Smallest local weight (or count) treated as non-empty.
TINY = 1e-12


# --------------------------------------------------------------------------- filtering
def filter_separable(x: Tensor, kernels: Sequence[Tensor | None]) -> Tensor:
    """Filter every channel of ``x`` with one symmetric 1D kernel per axis, zero padding.

    The operation of :func:`medreg.core.functional.separable_filter` with
    ``padding="constant"``, laid out for speed on CPU: the channels are made the innermost
    (``channels_last``) dimension and the padding is done by the convolution itself, which
    makes depthwise convolution several times faster than on an ``(N, C, ...)``-contiguous
    tensor. With symmetric kernels the operator is self-adjoint.

    Args:
        x: ``(B, K, *spatial)`` (2D or 3D spatial).
        kernels: one odd-length symmetric 1D kernel per axis in ``(x, y, z)`` order; ``None``
            or a length-1 kernel (which must be ``[1]``) skips the axis.

    Returns:
        ``(B, K, *spatial)`` filtered tensor (possibly in ``channels_last`` memory format).
    """
    d = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    k = x.shape[1]
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d)
    for comp, ker in enumerate(kernels):
        if ker is None or ker.numel() == 1:
            continue
        axis = d - 1 - comp
        shape = [1] * d
        shape[axis] = ker.numel()
        weight = ker.to(x).reshape(1, 1, *shape).expand(k, 1, *shape).contiguous()
        pad = [0] * d
        pad[axis] = ker.numel() // 2
        if fmt is not None and k > 1:  # a no-op when the previous pass kept the layout
            x = x.contiguous(memory_format=fmt)
        x = _depthwise(conv, x, weight, pad, k)
    return x


def _depthwise(conv, x: Tensor, weight: Tensor, pad: list[int], groups: int) -> Tensor:
    """``conv(x, weight, padding=pad, groups=groups)``. On CPU in float32 a 3D one goes straight
    to oneDNN (mkldnn): with one thread PyTorch's dispatcher picks its generic ``slow_conv3d``
    for these depthwise convolutions, 15–30× slower (148 ms vs 8 ms for 5 channels of
    80×96×112), with two it picks oneDNN itself: one thread now gets the kernel two threads
    always had (not bit-identical to ``slow_conv3d``'s sums)."""
    if (x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return torch.ops.aten.mkldnn_convolution(x, weight, None, list(pad), [1, 1, 1], [1, 1, 1],
                                                 groups)
    return conv(x, weight, padding=tuple(pad), groups=groups)


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


class LocalMean(torch.autograd.Function):
    """Mean of every channel over a window truncated at the image border, ``S(x) / S(1)``.

    ``S`` is :func:`filter_separable` (zero padding, self-adjoint for symmetric kernels),
    so the backward pass is ``S(g / S(1))``: one more filter, and nothing is saved but the
    kernels. Input ``(B, K, *spatial)``; output contiguous, same shape.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernels: list) -> Tensor:  # type: ignore[override]
        ctx.kernels = kernels
        counts = window_counts(x.shape[2:], kernels, dtype=x.dtype, device=x.device)
        return (filter_separable(x, kernels) / counts).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        counts = window_counts(grad.shape[2:], ctx.kernels, dtype=grad.dtype,
                               device=grad.device)
        return filter_separable(grad / counts, ctx.kernels).contiguous(), None


def _window_view(x: Tensor, start: Sequence[int], size: Sequence[int]) -> Tensor:
    for a, (s0, n) in enumerate(zip(start, size)):
        x = x.narrow(2 + a, s0, n)
    return x


class GatherWindows(torch.autograd.Function):
    """Stack shifted windows of channels: ``out[:, t] = src[:, k_t, start_t : start_t + size]``.

    The backward pass accumulates into one zero tensor (autograd would allocate a full-size
    zero tensor per slice). ``taps`` is a tuple of ``(channel, start)`` with ``start`` per
    spatial axis in tensor order.
    """

    @staticmethod
    def forward(ctx, src: Tensor, taps: tuple, size: tuple) -> Tensor:  # type: ignore[override]
        ctx.taps, ctx.size, ctx.src_shape = taps, size, src.shape
        out = src.new_empty(src.shape[0], len(taps), *size)
        for t, (k, start) in enumerate(taps):
            out[:, t].copy_(_window_view(src[:, k:k + 1], start, size)[:, 0])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gsrc = grad.new_zeros(ctx.src_shape)
        for t, (k, start) in enumerate(ctx.taps):
            _window_view(gsrc[:, k:k + 1], start, ctx.size)[:, 0].add_(grad[:, t])
        return gsrc, None, None


class MindDescriptor(torch.autograd.Function):
    """MIND's normalisation of patch distances: ``exp(−(D − min D) / V)``.

    Input ``D`` ``(B, P, *spatial)`` (``P`` pair distances per voxel). ``V`` is the mean of
    ``D − min D`` over the pairs, clamped to ``[lo, hi] × level`` with ``level`` its mean over
    the voxels of each row (then ``+ 1e-12``). Saves ``D − min D`` and the per-voxel ``V``;
    the backward pass includes the paths through the minimum, ``V`` and the clamp bounds.
    """

    @staticmethod
    def forward(ctx, dist: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        mn, arg = dist.min(1, keepdim=True)
        e = dist - mn
        vraw = e.mean(1, keepdim=True)
        dims = tuple(range(2, dist.dim()))
        level = vraw.mean(dims, keepdim=True)
        v = torch.minimum(torch.maximum(vraw, lo * level), hi * level)
        # which bound is active: 0 none, 1 low, 2 high
        state = (vraw < lo * level).to(torch.uint8) + 2 * (vraw > hi * level).to(torch.uint8)
        v = v + 1e-12
        desc = torch.div(e, v).neg_().exp_()
        ctx.save_for_backward(e, v, arg.to(torch.uint8), state)  # desc is recomputed
        ctx.lo, ctx.hi = lo, hi
        return desc

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        e, v, arg, state = ctx.saved_tensors
        p = e.shape[1]
        gd = torch.div(e, v).neg_().exp_().mul_(grad)  # grad · desc
        gv = (gd * e).sum(1, keepdim=True) / (v * v)
        ge = gd.div_(v).neg_()  # direct path
        dims = tuple(range(2, e.dim()))
        nvox = math.prod(e.shape[2:])
        zero = torch.zeros_like(gv)
        glevel = (torch.where(state == 1, gv * ctx.lo, zero)
                  + torch.where(state == 2, gv * ctx.hi, zero)).sum(dims, keepdim=True)
        gvraw = torch.where(state == 0, gv, torch.zeros_like(gv)) + glevel / nvox
        ge.add_(gvraw / p)
        # e = D − D[argmin]: the minimum's channel receives minus the sum
        return ge.scatter_add_(1, arg.long(), -ge.sum(1, keepdim=True)), None, None


# --------------------------------------------------------------------------- LNCC
def _stack_channels_last(fields: Sequence[Tensor]) -> Tensor:
    """Stack ``(B, 1, *spatial)`` tensors into ``(B, K, *spatial)`` laid out channels-last."""
    return torch.stack([f[:, 0] for f in fields], dim=-1).movedim(-1, 1)


def _masked_products(fixed: Tensor, warped: Tensor, mask: Tensor) -> list[Tensor]:
    mf, mw = mask * fixed, mask * warped
    return [mf, mw, mf * fixed, mw * warped, mf * warped, mask.expand_as(fixed)]


def _local_moments(fixed: Tensor, warped: Tensor, mask: Tensor | None,
                   kernels: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Local weighted means ``a, b`` and (co)variances ``vf, vw, c`` and the local mass ``n``."""
    # one channels-last stack of the product fields, filtered in one go; no name keeps the
    # products or the stack alive, so each is freed as soon as it has been consumed
    if mask is None:
        sums = filter_separable(_stack_channels_last(
            [fixed, warped, fixed * fixed, warped * warped, fixed * warped]), kernels)
    else:
        sums = filter_separable(_stack_channels_last(_masked_products(fixed, warped, mask)),
                                kernels)
    if mask is None:
        n = window_counts(fixed.shape[2:], kernels, dtype=fixed.dtype, device=fixed.device)
    else:
        n = sums[:, 5:6].clamp_min(TINY)
        sums = sums[:, :5]
    sums = sums.div_(n)
    a, b, aa, bb, ab = (sums[:, i:i + 1] for i in range(5))
    vf = torch.addcmul(aa, a, a, value=-1.0).clamp_min_(0.0)
    vw = torch.addcmul(bb, b, b, value=-1.0).clamp_min_(0.0)
    c = torch.addcmul(ab, a, b, value=-1.0)
    # copies of the means, so that the 5-field tensor is freed before the backward pass
    return a.contiguous(), b.contiguous(), vf, vw, c, n


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
        den = torch.mul(vf, vw).add_(eps)
        r = torch.mul(c, c).div_(den) if squared else torch.mul(c, den.rsqrt_())
        del den
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
        den = torch.mul(vf, vw).add_(ctx.eps)
        if ctx.squared:  # r = c²/den: dr/dc = 2c/den, dr/dden = −c²/den²
            gc = torch.div(c, den).mul_(grad)
            t = torch.mul(gc, c).div_(den)
            gc.mul_(2.0)
        else:  # r = c/√den: dr/dc = 1/√den, dr/dden = −c/(2 den^1.5)
            inv = den.rsqrt_()
            gc = torch.mul(grad, inv)
            t = torch.mul(gc, c).mul_(inv).mul_(inv).mul_(0.5)
        del den
        # dr/dvf = −t·vw, dr/dvw = −t·vf; no gradient where a variance was clamped at 0
        gvf = torch.mul(t, vw).neg_().masked_fill_(vf <= 0, 0.0)
        gvw = torch.mul(t, vf).neg_().masked_fill_(vw <= 0, 0.0)
        del t
        # the moments are S(m·x)/n: gradients of the filtered fields are (upstream)/n
        fields = []
        if need_f:  # d/da = −gc·b − 2 gvf·a, d/d(aa) = gvf
            fields += [torch.mul(gc, b).addcmul_(gvf, a, value=2.0).neg_().div_(n),
                       gvf.div_(n)]
        if need_w:
            fields += [torch.mul(gc, a).addcmul_(gvw, b, value=2.0).neg_().div_(n),
                       gvw.div_(n)]
        fields.append(gc.div_(n))  # d/d(ab) = gc
        # hand the stack over without keeping a name on it: freed after the first pass
        holder = [_stack_channels_last(fields)]
        del fields, gc, gvf, gvw
        back = filter_separable(holder.pop(), ctx.kernels)
        s_ab = back[:, -1:]
        grad_f = grad_w = None
        i = 0
        if need_f:
            grad_f = torch.addcmul(back[:, 0:1], fixed, back[:, 1:2], value=2.0)
            grad_f.addcmul_(warped, s_ab)
            i = 2
            if mask is not None:
                grad_f.mul_(mask)
        if need_w:
            grad_w = torch.addcmul(back[:, i:i + 1], warped, back[:, i + 1:i + 2], value=2.0)
            grad_w.addcmul_(fixed, s_ab)
            if mask is not None:
                grad_w.mul_(mask)
        return grad_f, grad_w, None, None, None, None


# --------------------------------------------------------------------------- MI
#: Gaussian Parzen windows are truncated where the weight falls below exp(-18) of the peak
#: (beyond 6σ + ½ bin), far below float32 resolution of the normalised weights.
GAUSS_TRUNCATE = 6.0


def parzen_support(bins: int, parzen: str, sigma: float) -> int:
    """Number ``S`` of consecutive bins a sample contributes to."""
    if parzen == "bspline":
        return 4
    return min(bins, 2 * int(math.ceil(GAUSS_TRUNCATE * sigma)) + 1)


#: Cubic B-spline weights of the 4 supporting bins as polynomials in the fractional position
#: ``u``: ``w = [1, u, u², u³] @ _BSPLINE`` and ``dw/du = [1, u, u²] @ _BSPLINE_D``.
_BSPLINE = ((1 / 6, 4 / 6, 1 / 6, 0.0),
            (-3 / 6, 0.0, 3 / 6, 0.0),
            (3 / 6, -1.0, 3 / 6, 0.0),
            (-1 / 6, 3 / 6, -3 / 6, 1 / 6))
_BSPLINE_D = ((-0.5, 0.0, 0.5, 0.0),
              (1.0, -2.0, 1.0, 0.0),
              (-0.5, 1.5, -1.5, 0.5))


def parzen_weights(t: Tensor, bins: int, parzen: str, sigma: float, derivative: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sparse Parzen weights of bin coordinates ``t`` ``(..., c)``.

    Returns:
        ``start`` ``(..., c)`` long: first supporting bin; ``w`` ``(..., c, S)``: the weights of
        bins ``start .. start + S − 1`` (each row sums to 1, all bins valid); ``dw``
        ``(..., c, S)``: their derivative w.r.t. ``t`` (or None).

    B-spline (cubic): ``t`` must lie in ``[2, bins − 3]``. Gaussian: centres at ``0..bins−1``,
    standard deviation ``sigma`` bins, renormalised over the bins that exist (as a dense
    evaluation over all bins would be, up to the truncation at ``6σ + ½`` bins).
    """
    if parzen == "bspline":
        i0 = t.floor().clamp_(2, bins - 3)
        # powers [1, u, u², u³] of the fractional part, then one small matrix product
        powers = torch.sub(t, i0).unsqueeze(-1).pow(torch.arange(4, device=t.device,
                                                                 dtype=t.dtype))
        w = powers @ torch.tensor(_BSPLINE, dtype=t.dtype, device=t.device)
        dw = None
        if derivative:
            dw = powers[..., :3] @ torch.tensor(_BSPLINE_D, dtype=t.dtype, device=t.device)
        return i0.long().sub_(1), w, dw
    size = parzen_support(bins, parzen, sigma)
    start = t.round().sub_(size // 2).clamp_(0, bins - size)
    z = (t - start).unsqueeze(-1).sub(torch.arange(size, dtype=t.dtype, device=t.device))
    z.div_(sigma)
    w = torch.mul(z, z).mul_(-0.5).exp_()
    w.div_(w.sum(-1, keepdim=True))
    dw = None
    if derivative:  # dw_k/dt = w_k (s_k − Σ_j w_j s_j) with s = −z / σ
        s = z.mul_(-1.0 / sigma)
        dw = s.sub_((w * s).sum(-1, keepdim=True)).mul_(w)
    return start.long(), w, dw


def _chunk_size(bins: int) -> int:
    """Voxels per chunk: dense ``(chunk, bins)`` weight matrices of about 8 M entries (32 MB in
    float32). Large chunks keep the number of (thread-synchronised) tensor operations small."""
    return max(4096, (1 << 23) // max(bins, 1))


class _Dense:
    """A reusable zero ``(2, chunk, bins)`` buffer for the dense Parzen weight matrices.

    Rows are filled by ``scatter_`` from the sparse weights and zeroed again after use; reusing
    one buffer avoids a fresh (page-faulting) allocation per chunk.
    """

    def __init__(self, rows: int, bins: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.zeros(2, rows, bins, dtype=dtype, device=device)
        self.arange = None

    def fill(self, start: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """``start`` ``(2, c)``, ``w`` ``(2, c, S)`` → dense ``(2, c, bins)`` view and indices."""
        c, size = w.shape[1], w.shape[2]
        if self.arange is None or self.arange.numel() != size:
            self.arange = torch.arange(size, device=w.device)
        idx = start.unsqueeze(2) + self.arange
        dense = self.buf[:, :c]
        dense.scatter_(2, idx, w)
        return dense, idx

    def clear(self, idx: Tensor) -> None:
        self.buf[:, :idx.shape[1]].zero_()  # a plain fill is cheaper than scattering zeros


class JointHistogram(torch.autograd.Function):
    """Parzen joint histogram ``P[b, i, j] = Σ_v m_v K(tf_v − i) K(tm_v − j)``.

    Inputs ``tf, tm``: ``(B, V)`` bin coordinates; ``mask``: ``(B, V)`` weights or None (not
    differentiated). Output ``(B, bins, bins)`` in float64 for lower-precision inputs
    (unnormalised: sums to ``Σ m``). Per chunk of voxels, the sparse Parzen weights of both
    images (4 bins per sample for the B-spline, ``2⌈6σ⌉+1`` for the Gaussian) are evaluated
    together, spread into dense ``(chunk, bins)`` matrices and multiplied (``W_fᵀ W_m``); the
    backward pass multiplies by the upstream gradient and gathers at the supporting bins.
    """

    @staticmethod
    def forward(ctx, tf: Tensor, tm: Tensor, mask: Tensor | None, bins: int, parzen: str,
                sigma: float) -> Tensor:  # type: ignore[override]
        nb, nv = tf.shape
        acc = torch.float64 if tf.dtype != torch.float64 else tf.dtype
        out = torch.zeros(nb, bins, bins, dtype=acc, device=tf.device)
        step = min(_chunk_size(bins), nv)
        dense = _Dense(step, bins, tf.dtype, tf.device)
        for i in range(nb):
            for s in range(0, nv, step):
                t = torch.stack([tf[i, s:s + step], tm[i, s:s + step]])
                start, w, _ = parzen_weights(t, bins, parzen, sigma)
                if mask is not None:
                    w[0].mul_(mask[i, s:s + step].unsqueeze(1))
                wd, idx = dense.fill(start, w)
                out[i] += (wd[0].t() @ wd[1]).to(acc)
                dense.clear(idx)
        ctx.save_for_backward(tf, tm, mask)
        ctx.bins, ctx.parzen, ctx.sigma = bins, parzen, sigma
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        tf, tm, mask = ctx.saved_tensors
        need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_f or need_m):
            return None, None, None, None, None, None
        grad_f = torch.zeros_like(tf) if need_f else None
        grad_m = torch.zeros_like(tm) if need_m else None
        bins, parzen, sigma = ctx.bins, ctx.parzen, ctx.sigma
        nb, nv = tf.shape
        step = min(_chunk_size(bins), nv)
        dense = _Dense(step, bins, tf.dtype, tf.device)
        for i in range(nb):
            g = grad[i].to(tf.dtype)
            for s in range(0, nv, step):
                sl = slice(s, s + step)
                t = torch.stack([tf[i, sl], tm[i, sl]])
                start, w, dw = parzen_weights(t, bins, parzen, sigma, derivative=True)
                m = None if mask is None else mask[i, sl].unsqueeze(1)
                if m is not None:
                    w[0].mul_(m)
                wd, idx = dense.fill(start, w)
                # ∂L/∂tm_v = Σ_ab m_v Wf[v,a] G[a,b] dWm[v,b]; ∂L/∂tf_v likewise with Gᵀ
                if need_m:
                    grad_m[i, sl] = (wd[0] @ g).gather(1, idx[1]).mul_(dw[1]).sum(1)
                if need_f:
                    gf = (wd[1] @ g.t()).gather(1, idx[0]).mul_(dw[0]).sum(1)
                    grad_f[i, sl] = gf if m is None else gf.mul_(m[:, 0])
                dense.clear(idx)
        return grad_f, grad_m, None, None, None, None


def entropy_terms(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Marginal and joint entropies (nats) of normalised joint histograms ``(B, bins, bins)``."""
    def h(q: Tensor, dims: tuple[int, ...]) -> Tensor:
        return -(q * torch.log(q.clamp_min(1e-30))).sum(dims)

    return h(p.sum(2), (1,)), h(p.sum(1), (1,)), h(p, (1, 2))



# --------------------------------------------------------------------------- stencil energies
#: A finite-difference stencil: ``((offset per spatial axis in tensor order, coefficient), ...)``.
Stencil = tuple[tuple[tuple[int, ...], float], ...]


def _apply_stencil(u: Tensor, stencil: Stencil, size: Sequence[int]) -> Tensor:
    out = None
    for offset, coeff in stencil:
        term = _window_view(u, offset, size)
        out = term * coeff if out is None else out.add_(term, alpha=coeff)
    return out


def _stencil_size(shape: Sequence[int], stencil: Stencil) -> tuple[int, ...]:
    extent = [max(off[a] for off, _ in stencil) for a in range(len(shape))]
    return tuple(n - e for n, e in zip(shape, extent))


class StencilEnergy(torch.autograd.Function):
    """Per-sample ``Σ_t w_t · mean_x |L_t u(x)|²`` for linear finite-difference stencils ``L_t``.

    ``u``: ``(N, D, *spatial)``; each stencil is evaluated on the voxels where it is defined
    and summed over the ``D`` components. The energy is quadratic, so the backward pass is
    ``2 Σ_t w_t / count_t · L_tᵀ L_t u`` built from slice additions into one buffer (autograd
    would allocate a full zero tensor per slice). Returns ``(N,)``.
    """

    @staticmethod
    def forward(ctx, u: Tensor, stencils: tuple,  # type: ignore[override]
                weights: tuple) -> Tensor:
        total = u.new_zeros(u.shape[0])
        for stencil, w in zip(stencils, weights):
            size = _stencil_size(u.shape[2:], stencil)
            if min(size) < 1:
                continue
            r = _apply_stencil(u, stencil, size)
            total += w * r.flatten(1).square().sum(1) / math.prod(size)
        ctx.save_for_backward(u)
        ctx.stencils, ctx.weights = stencils, weights
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        gu = torch.zeros_like(u)
        scale = grad.reshape(-1, *([1] * (u.dim() - 1)))
        for stencil, w in zip(ctx.stencils, ctx.weights):
            size = _stencil_size(u.shape[2:], stencil)
            if min(size) < 1:
                continue
            r = _apply_stencil(u, stencil, size).mul_(scale * (2.0 * w / math.prod(size)))
            for offset, coeff in stencil:
                _window_view(gu, offset, size).add_(r, alpha=coeff)
        return gu, None, None
