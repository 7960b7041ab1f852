"""All hyperparameters of the model in one JSON-serialisable dataclass, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import tp as tp_backends

BACKENDS = tuple(tp_backends.BACKENDS)

# The weight mode each backend uses when the config does not say, as the backend declares it: cg per path (MACE's
# "uvu" convolution), cp path-weight sharing (the TDN idea, P = 1), gaunt/grid one weight per output degree.
DEFAULT_TP_WEIGHTS = {kind: tp_backends.backend(kind).default_weights for kind in BACKENDS}

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# What the model's atomic_energies (E0) are: "isolated" (isolated-atom energies or a per-element table given by
# the user), "fitted" (least squares over the training compositions, full rank), "fitted-rank-deficient" (least
# squares on too few distinct compositions: the per-element split is arbitrary, only sums over the training
# compositions are meaningful), "none" (all zero on purpose), "unknown" (files written before this was recorded).
E0_KINDS = ("isolated", "fitted", "fitted-rank-deficient", "none", "unknown")

PRESETS: dict[str, dict[str, Any]] = {
    # MACE-medium widths: 128 channels, hidden features l <= 1, spherical harmonics and messages l <= 3,
    # correlation 3, 2 layers, 5 Å cutoff, 8 Bessel functions, radial MLP 64 x 3.
    "mace-medium": dict(
        channels=128,
        lmax_hidden=1,
        lmax=3,
        correlation=3,
        num_layers=2,
        cutoff=5.0,
        num_bessel=8,
        envelope_exponent=5,
        radial_mlp=[64, 64, 64],
        readout_mlp=16,
    ),
    # A tiny model for tests and smoke runs.
    "tiny": dict(channels=8, lmax_hidden=1, lmax=2, correlation=2, num_layers=2, radial_mlp=[16], readout_mlp=8),
}


def checked_factor_record(record: Any) -> dict[str, dict[str, Any]]:
    """``record`` as ``{key: {"rank": int >= 1, "error": float >= 0}}`` (see ``ModelConfig.cp_factors``), or a
    ValueError naming the entry that is not."""
    if not isinstance(record, dict):
        raise ValueError(f"cp_factors must be a dict {{key: {{'rank': R, 'error': e}}}} or None, got {record!r}")
    checked = {}
    for key, entry in record.items():
        fields = entry if isinstance(entry, dict) else {}
        rank, error = fields.get("rank"), fields.get("error")
        if (
            not isinstance(key, str) or set(fields) != {"rank", "error"}
            or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
            or not isinstance(error, (int, float)) or isinstance(error, bool) or not error >= 0
        ):  # fmt: skip
            raise ValueError(
                f"cp_factors[{key!r}] must be {{'rank': a positive integer, 'error': a number >= 0}}, got {entry!r}"
            )
        checked[key] = {"rank": rank, "error": float(error)}
    return checked


@dataclass
class ModelConfig:
    """Hyperparameters of :class:`tdn.models.TDNModel`; ``dataclasses.asdict`` gives plain JSON types.

    Degrees: node features carry ``l <= lmax_hidden`` (scalars only entering the first layer and leaving the
    last); edge spherical harmonics and messages (the atomic basis ``A``) carry ``l <= lmax``.
    """

    elements: list[int]  # atomic numbers the model knows, in the order of atomic_energies
    tp: str = "cp"  # tensor-product backend of the convolution and the product basis: cg | cp | gaunt | grid
    tp_weights: str | None = None  # shared | degree | inout | path; None: DEFAULT_TP_WEIGHTS[tp]
    tp_options: dict[str, Any] = field(default_factory=dict)  # extra keywords for tdn.tp.build (e.g. rank, tol)
    product_options: dict[str, Any] = field(default_factory=dict)  # extra keywords for ProductBasis (cp: tol, rank)
    paths: str = "o3"  # o3 (natural parity; gaunt/grid need it) | so3
    lmax: int = 2  # spherical harmonics and messages
    lmax_hidden: int = 1  # node features between layers
    channels: int = 32
    num_layers: int = 2
    correlation: int = 3  # body order of the product basis minus one
    cutoff: float = 5.0  # Å
    num_bessel: int = 8
    envelope_exponent: int = 5  # p of the polynomial cutoff envelope
    radial_mlp: list[int] = field(default_factory=lambda: [64, 64, 64])  # hidden widths
    readout_mlp: int = 16  # hidden width of the last layer's readout
    residual_first: bool = False  # self-connection in the first layer too (MACE: no)
    avg_num_neighbors: float = 1.0  # messages are divided by it; set from the training data
    atomic_energies: list[float] | None = None  # E0 per element (eV), aligned with elements; None: zeros
    e0_kind: str = "unknown"  # what atomic_energies are: one of E0_KINDS
    scale: float = 1.0  # interaction energy per atom = scale * readouts + shift
    shift: float = 0.0
    dtype: str = "float32"  # float32 | float64
    # The CP factor sets the model was built with, recorded by TDNModel: {"{store folder}/{file stem}": {"rank": R,
    # "error": relative error}}, e.g. {"cp_factors/cp_o3_1_2_2_tol1e-04": {"rank": 20, "error": 3e-05}} (two-body)
    # and "product_cp/cp_o3_in2_out1_nu2_tol1e-04" (product basis). load_model builds these factors as placeholders
    # of the recorded ranks and loads the file's values: no lookup, no fit. None: not recorded (older files).
    cp_factors: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.elements = [int(z) for z in self.elements]
        if not self.elements:
            raise ValueError("elements must list at least one atomic number")
        bad = [z for z in self.elements if not 1 <= z <= 118]
        if bad:
            raise ValueError(f"elements must be atomic numbers in 1..118, got {bad}")
        if len(set(self.elements)) != len(self.elements):
            raise ValueError(f"elements must not repeat, got {self.elements}")
        if self.tp not in BACKENDS:
            raise ValueError(f"tp must be one of {BACKENDS}, got {self.tp!r}")
        if self.tp_weights is None:
            self.tp_weights = DEFAULT_TP_WEIGHTS[self.tp]
        # the backend's own declaration of what it supports, checked in one place (tdn.tp.check_support)
        tp_backends.check_support(self.tp, tp_backends.backend(self.tp), paths=self.paths, weights=self.tp_weights)
        for name in ("lmax", "lmax_hidden", "channels", "num_layers", "correlation", "num_bessel", "readout_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.lmax < 0 or self.lmax_hidden < 0:
            raise ValueError(f"lmax and lmax_hidden must be >= 0, got {self.lmax}, {self.lmax_hidden}")
        if self.lmax_hidden > self.lmax:
            raise ValueError(f"lmax_hidden ({self.lmax_hidden}) must not exceed lmax ({self.lmax})")
        for name in ("channels", "num_layers", "correlation", "num_bessel", "readout_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.envelope_exponent < 2:
            raise ValueError(f"envelope_exponent must be >= 2, got {self.envelope_exponent}")
        self.cutoff = float(self.cutoff)
        if self.cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {self.cutoff}")
        self.radial_mlp = [int(w) for w in self.radial_mlp]
        self.avg_num_neighbors = float(self.avg_num_neighbors)
        if self.avg_num_neighbors <= 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {self.avg_num_neighbors}")
        if isinstance(self.atomic_energies, dict):  # {Z: E0}; JSON turns the keys into strings
            energies = {int(z): float(e) for z, e in self.atomic_energies.items()}
            missing = [z for z in self.elements if z not in energies]
            if missing:
                raise ValueError(f"atomic_energies has no E0 for atomic numbers {missing}")
            self.atomic_energies = [energies[z] for z in self.elements]
        if self.atomic_energies is None:
            self.atomic_energies = [0.0] * len(self.elements)
        self.atomic_energies = [float(e) for e in self.atomic_energies]
        if len(self.atomic_energies) != len(self.elements):
            raise ValueError(
                f"atomic_energies has {len(self.atomic_energies)} values for {len(self.elements)} elements"
            )
        if self.e0_kind not in E0_KINDS:
            raise ValueError(f"e0_kind must be one of {E0_KINDS}, got {self.e0_kind!r}")
        self.scale, self.shift = float(self.scale), float(self.shift)
        if self.cp_factors is not None:
            self.cp_factors = checked_factor_record(self.cp_factors)
        if isinstance(self.dtype, torch.dtype):
            self.dtype = {v: k for k, v in DTYPES.items()}.get(self.dtype, str(self.dtype))
        self.dtype = self.dtype.removeprefix("torch.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown} (known: {sorted(known)})")
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ModelConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], **overrides})
