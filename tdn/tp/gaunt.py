"""Gaunt product in the 2-D Fourier basis (Luo et al. 2024, "Enabling efficient equivariant operations in the
Fourier basis via Gaunt tensor products").

A sphere function of degree ``<= L``, ``f = sum_k x_k Y_k``, written in the angles of

.. math::

    r(\\theta, \\phi) = (\\sin\\theta \\sin\\phi,\\ \\cos\\theta,\\ \\sin\\theta \\cos\\phi)

(e3nn's polar axis is ``y``) is a polynomial of degree ``<= L`` in ``x, y, z``, hence a trigonometric polynomial
of degree ``<= L`` in both angles once ``theta`` runs over the whole circle ``[0, 2 pi)``:

.. math::

    f(\\theta, \\phi) = \\sum_{|u|, |v| \\le L} F_{uv} e^{i (u \\theta + v \\phi)}.

Real ``Y_lm`` only has ``v = \\pm m`` and ``u \\equiv l \\pmod 2``, so the change of basis ``x -> F`` is sparse.
The product of two such functions is the 2-D linear convolution of their coefficients, done here by FFT
(the pointwise product of the zero-padded inverse transforms), and is projected back onto ``Y_k`` exactly:

.. math::

    \\mathrm{out}_k = \\frac{1}{4\\pi} \\int_0^{2\\pi}\\!\\!\\int_0^\\pi h\\, Y_k \\sin\\theta\\, d\\theta\\, d\\phi
                   = \\sum_{uv} H_{uv} P_{kuv},
    \\qquad P_{kuv} = \\frac{1}{2} \\sum_{u'} \\hat Y_{k, u', -v}\\, I(u + u'),

with ``I(n) = int_0^pi e^{i n theta} sin(theta) d theta = (1 + (-1)^n) / (1 - n^2)`` (``n != +-1``), ``+-i pi / 2``
(``n = +-1``). The result is the Gaunt tensor ``G[k, i, j] = <Y_k Y_i Y_j>`` of :func:`tdn.o3.gaunt_tensor`
applied to ``x, y``, so this backend equals the "grid" backend to float round-off.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from ..o3 import dim, spherical_harmonics
from .base import TensorProduct
from .grid import GauntSupport


def torus_points(n_theta: int, n_phi: int) -> torch.Tensor:
    """``[n_theta, n_phi, 3]`` unit vectors ``r(theta_a, phi_b)`` on the uniform grid of ``[0, 2 pi)^2`` (float64)."""
    theta = 2 * math.pi * torch.arange(n_theta, dtype=torch.float64) / n_theta
    phi = 2 * math.pi * torch.arange(n_phi, dtype=torch.float64) / n_phi
    theta, phi = torch.meshgrid(theta, phi, indexing="ij")
    return torch.stack([theta.sin() * phi.sin(), theta.cos(), theta.sin() * phi.cos()], dim=-1)


@cache
def _sh_fourier(lmax: int) -> torch.Tensor:
    n = 2 * lmax + 1  # enough samples for a trigonometric polynomial of degree lmax: the FFT is exact
    y = spherical_harmonics(lmax, torus_points(n, n), normalize=False)  # [n, n, d]
    coeffs = torch.fft.fft2(y.permute(2, 0, 1), norm="forward")  # [d, u, v], FFT order
    coeffs = torch.fft.fftshift(coeffs, dim=(1, 2))  # [d, 2L+1, 2L+1], index lmax + u, lmax + v
    coeffs = (coeffs + coeffs.flip(1, 2).conj()) / 2  # real functions: exactly Hermitian
    scale = coeffs.abs().amax()
    return torch.where(coeffs.abs() < 1e-14 * scale, torch.zeros_like(coeffs), coeffs)  # exact sparsity


def sh_to_fourier(lmax: int) -> torch.Tensor:
    """``T [(lmax+1)^2, 2L+1, 2L+1]`` complex128, centred: ``Y_k = sum_uv T[k, L+u, L+v] e^{i(u theta + v phi)}``.

    Exact: the samples of ``Y_k`` on a ``(2L+1) x (2L+1)`` torus grid determine its modes, read off by an FFT.
    """
    return _sh_fourier(lmax).clone()


def _sin_integral(n: torch.Tensor) -> torch.Tensor:
    """``I(n) = int_0^pi e^{i n theta} sin(theta) d theta`` for integer ``n`` (complex128)."""
    n = n.to(torch.float64)
    even = torch.where(n.remainder(2) == 0, 2 / (1 - n**2), torch.zeros_like(n))
    odd = torch.where(n.abs() == 1, n * math.pi / 2, torch.zeros_like(n))
    return torch.complex(even, odd)


@cache
def _fourier_to_sh(lmax_out: int, band: int) -> torch.Tensor:
    y = _sh_fourier(lmax_out)  # [d_out, 2L3+1, 2L3+1], index lmax_out + u', lmax_out + v'
    u = torch.arange(-band, band + 1)
    u_prime = torch.arange(-lmax_out, lmax_out + 1)
    sin_int = _sin_integral(u[:, None] + u_prime[None, :])  # [2B+1, 2L3+1]: I(u + u')
    # phi integral: 2 pi delta(v + v'), so mode v of h meets mode -v of Y_k; then P = (2 pi / 4 pi) sum_u' ...
    y_neg_v = y.flip(2)  # [d_out, u', v] = Y_k[u', -v]
    p = 0.5 * torch.einsum("uw,kwv->kuv", sin_int, y_neg_v)  # [d_out, 2B+1, 2L3+1], v in -L3..L3
    if band < lmax_out:  # modes |v| > band of h are zero: keep the [2B+1, 2B+1] block
        p = p[:, :, lmax_out - band : lmax_out + band + 1]
    elif band > lmax_out:  # modes |v| > lmax_out of h are orthogonal to every Y_k
        p = torch.nn.functional.pad(p, (band - lmax_out, band - lmax_out))
    return p


def fourier_to_sh(lmax_out: int, band: int) -> torch.Tensor:
    """``[(lmax_out+1)^2, 2 band + 1, 2 band + 1]`` complex128: the exact sphere projection of Fourier modes,

    ``P[k, B+u, B+v] = (1/4pi) int_0^2pi int_0^pi e^{i(u theta + v phi)} Y_k sin(theta) d theta d phi``.
    """
    return _fourier_to_sh(lmax_out, band).clone()


def fft_shape(lmax_in: int, lmax_sh: int, lmax_out: int) -> tuple[int, int]:
    """``(n_theta, n_phi)`` of the FFT: a linear (not circular) convolution for every mode the projection reads.

    ``h = f g`` has ``|u|, |v| <= lmax_in + lmax_sh``. All its ``u`` modes are needed (``n_theta >= 2 B + 1``); only
    ``|v| <= lmax_out`` are, so ``n_phi >= B + lmax_out + 1`` keeps those free of wrap-around; and the inputs
    need ``n_phi >= 2 lmax + 1`` for their half spectra to fit.
    """
    band = lmax_in + lmax_sh
    return 2 * band + 1, max(band + lmax_out + 1, 2 * max(lmax_in, lmax_sh) + 1)


@cache
def _tables(lmax_in: int, lmax_sh: int, lmax_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_theta, _ = fft_shape(lmax_in, lmax_sh, lmax_out)
    band = lmax_in + lmax_sh
    v_out = min(lmax_out, band)

    def to_half_spectrum(lmax: int) -> torch.Tensor:
        # [d, 2L+1, 2L+1] centred -> [d, (L+1) * n_theta * 2] real: v >= 0 major, u in FFT order zero-padded to n_theta
        t = _sh_fourier(lmax)[:, :, lmax:].transpose(1, 2)  # [d, L+1 (v >= 0), 2L+1 (u)]
        padded = t.new_zeros(dim(lmax), lmax + 1, n_theta)
        padded[:, :, : lmax + 1] = t[:, :, lmax:]  # u = 0..L
        if lmax > 0:
            padded[:, :, -lmax:] = t[:, :, :lmax]  # u = -L..-1
        return torch.view_as_real(padded).reshape(dim(lmax), -1)

    # out_k = sum over all (u, v) of H P = sum over v >= 0 of c_v Re(H P), c_0 = 1, c_v = 2 (h, Y_k real)
    p = _fourier_to_sh(lmax_out, band)[:, :, band : band + v_out + 1]  # [d_out, 2B+1 (u centred), v_out+1]
    p = torch.fft.ifftshift(p, dim=1).transpose(1, 2)  # [d_out, v, u in FFT order], as the forward pass makes H
    p = p * torch.tensor([1.0] + [2.0] * v_out, dtype=torch.float64)[:, None]
    project = torch.stack([p.real, -p.imag], dim=-1)  # Re(H P) = H.re P.re - H.im P.im
    project = project.reshape(dim(lmax_out), -1).T.contiguous()  # [(v_out+1) * n_theta * 2, d_out]
    return to_half_spectrum(lmax_in), to_half_spectrum(lmax_sh), project


class GauntProduct(GauntSupport, TensorProduct):
    """Gaunt product via 2-D FFT: ``out[e, c] = w[e, c] * G(x[e, c], y[e])`` with ``G`` the Gaunt tensor.

    Per row ``x [d_in] -> F [L1+1 (v >= 0), n_theta (u)]``: the half spectrum (``F[-u, -v] = conj F[u, v]`` as
    ``f`` is real), zero-padded in ``u`` so that the FFT convolution is linear; ``f = irfft2(F)`` on the
    ``n_theta x n_phi`` torus grid; the same for ``y``; ``H = rfft2(f g) = F * G`` (only ``v <= lmax_out``);
    ``out = Re(H : P)`` with the exact projection ``P``. The tables are built once per degrees in float64 (cached)
    and hold only the ``v >= 0`` half, with the zero padding folded in, so the forward pass makes no copies.
    """

    kind = "gaunt"

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int, channels: int, paths: str = "o3",
                 weights: str = "shared") -> None:
        super().__init__(lmax_in, lmax_sh, lmax_out, channels, paths, weights)
        self.n_theta, self.n_phi = fft_shape(lmax_in, lmax_sh, lmax_out)
        self.v_out = min(lmax_out, lmax_in + lmax_sh)
        to_in, to_sh, project = _tables(lmax_in, lmax_sh, lmax_out)
        self.register_buffer("to_fourier_in", to_in.clone())  # [d_in, (L1+1) * n_theta * 2]
        self.register_buffer("to_fourier_sh", to_sh.clone())  # [d_sh, (L2+1) * n_theta * 2]
        self.register_buffer("from_fourier", project.clone())  # [(v_out+1) * n_theta * 2, d_out]

    def _samples(self, coeffs: torch.Tensor, table: torch.Tensor, lmax: int) -> torch.Tensor:
        """SH coefficients ``[..., d]`` -> values on the torus grid ``[..., n_theta, n_phi]``: ``irfft2`` of the
        half spectrum, as two 1-D passes along the last axis (several times faster than ``irfft2`` on a CPU)."""
        spectrum = torch.view_as_complex((coeffs @ table).unflatten(-1, (lmax + 1, self.n_theta, 2)))  # [..., v, u]
        spectrum = torch.fft.ifft(spectrum, dim=-1, norm="forward").transpose(-1, -2)  # [..., theta, v >= 0]
        return torch.fft.irfft(spectrum, n=self.n_phi, dim=-1, norm="forward")  # [..., theta, phi], real

    def product(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # no edges: an FFT of an empty batch is an error in some FFT libraries (MKL)
            return (x @ x.new_zeros(x.shape[2], self.dims[2])) * self.expand_weights(w)  # [0, C, d_out], in the graph
        # FFTs and complex views exist for float32 / float64 only: half-precision inputs (a bf16 model, or bf16
        # features under CUDA autocast) are widened here, with autocast off, and the result handed back narrow.
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            f = self._samples(x.to(dtype), self.to_fourier_in.to(dtype), self.lmax_in)  # [E, C, n_theta, n_phi]
            g = self._samples(y.to(dtype), self.to_fourier_sh.to(dtype), self.lmax_sh)  # [E, n_theta, n_phi]
            h = torch.fft.rfft(f * g.unsqueeze(1), dim=-1, norm="forward")  # [E, C, theta, n_phi // 2 + 1]
            h = torch.fft.fft(h[..., : self.v_out + 1].transpose(-1, -2), dim=-1, norm="forward")  # [E, C, v, u]
            h = torch.view_as_real(h).flatten(-3)  # [E, C, (v_out+1) * n_theta * 2]: the modes the projection reads
            out = h @ self.from_fourier.to(dtype)  # [E, C, d_out]
        return out.to(x.dtype) * self.expand_weights(w)  # [E, C, d_out]
