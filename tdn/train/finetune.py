"""Fine-tuning an exported model (``init_from``) on new data: the ``finetune`` section of the config.

- E0s (``finetune.e0``): ``refit`` adds to the file's E0s the least-squares fit, over the compositions of the training
  split, of the residual ``reference - model`` energies. The pretrained interaction energy is kept as it is; what
  changes is one offset per element, which is how the references of two electronic-structure setups usually differ.
  The minimum-norm solution leaves E0s the data cannot determine unchanged. ``keep`` keeps the file's E0s (elements
  added by fine-tuning still get theirs from that fit, the others held fixed).
- New elements (``finetune.new_elements=true``): elements of the training split the file lacks are added. Every
  per-element tensor (embedding rows, element-wise self-connections, product-basis weights, E0s) gets a row for each;
  existing rows are copied by atomic number, new ones start from the initialisation of a fresh model (seeded).
- Frozen parts (``finetune.freeze``): parameter-name prefixes (``embedding``, ``interactions.0``, ...). A frozen
  tensor is left out of the optimizer; in a frozen per-element tensor only the pretrained rows stay fixed, the rows
  of new elements train.
- ``finetune.pretrained_lr_factor``: pretrained tensors form optimizer parameter groups at ``lr * factor``. Tensors
  that gained rows for new elements train at ``lr``; their pretrained rows take ``factor`` times the optimizer's step
  (:class:`RowSteps`), so every pretrained value moves at ``lr * factor`` whatever its tensor.

Replay data (``finetune.replay``) is :mod:`tdn.train.replay`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data import collate
from ..data.sampler import pack_batches
from ..io import ModelFileError, load_model
from ..models import DEFAULT_TP_WEIGHTS, ModelConfig, TDNModel
from .errors import ConfigError

logger = logging.getLogger("tdn.train")

E0_MODES = ("refit", "keep")
MISMATCH_MODES = ("warn", "error")
# ModelConfig fields that fix the network's shape and maths (not its statistics, elements or dtype). The cutoff is
# checked against the data's neighbour lists separately.
ARCHITECTURE_KEYS = (
    "tp", "tp_weights", "tp_options", "product_options", "paths", "lmax", "lmax_hidden", "channels", "num_layers",
    "correlation", "num_bessel", "envelope_exponent", "radial_mlp", "readout_mlp", "residual_first",
)  # fmt: skip
OPTION_KEYS = ("e0", "new_elements", "freeze", "pretrained_lr_factor", "architecture_mismatch", "replay")


@dataclass
class FinetuneOptions:
    """The ``finetune`` section (replay options stay a mapping: :mod:`tdn.train.replay` reads them)."""

    e0: str = "refit"
    new_elements: bool = False
    freeze: list[str] = field(default_factory=list)
    pretrained_lr_factor: float = 1.0
    architecture_mismatch: str = "warn"
    replay: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None) -> FinetuneOptions:
        """Checked options; a ConfigError names the bad key."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(OPTION_KEYS))
        if unknown:
            raise ConfigError(f"unknown finetune option(s) {unknown}; known: {sorted(OPTION_KEYS)}")
        options = cls(**{k: v for k, v in values.items() if v is not None})
        if options.e0 not in E0_MODES:
            raise ConfigError(f"finetune.e0 must be one of {list(E0_MODES)}, got {options.e0!r}")
        if options.architecture_mismatch not in MISMATCH_MODES:
            raise ConfigError(
                f"finetune.architecture_mismatch must be one of {list(MISMATCH_MODES)}, got "
                f"{options.architecture_mismatch!r}"
            )
        if not isinstance(options.new_elements, bool):
            raise ConfigError(f"finetune.new_elements must be true or false, got {options.new_elements!r}")
        if isinstance(options.freeze, str):
            options.freeze = [options.freeze]
        if not all(isinstance(name, str) and name for name in options.freeze):
            raise ConfigError(f"finetune.freeze must be a list of parameter-name prefixes, got {options.freeze!r}")
        factor = options.pretrained_lr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < float(factor) <= 1.0:
            raise ConfigError(
                f"finetune.pretrained_lr_factor must be a number in (0, 1], got {factor!r} (freeze a part instead "
                "of a factor 0: finetune.freeze=[...])"
            )
        options.pretrained_lr_factor = float(factor)
        return options

    def used_without_init_from(self) -> list[str]:
        """The options set away from their defaults (they only mean something with ``init_from``)."""
        used = []
        if self.new_elements:
            used.append("finetune.new_elements")
        if self.freeze:
            used.append("finetune.freeze")
        if self.pretrained_lr_factor != 1.0:
            used.append("finetune.pretrained_lr_factor")
        return used


# ------------------------------------------------------------------------------------------------ architecture
def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def architecture_differences(file_config: ModelConfig, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (file value, config value)}`` for the architecture keys where ``cfg.model`` and the file differ
    (keys the config leaves out or sets to null take ModelConfig's defaults)."""
    defaults = ModelConfig(elements=[1])
    model_section = cfg.get("model") or {}
    out: dict[str, tuple[Any, Any]] = {}
    for key in ARCHITECTURE_KEYS:
        if key not in model_section:
            continue
        value = _plain(OmegaConf.select(cfg, f"model.{key}"))
        if value is None:
            value = getattr(defaults, key)
        if key == "tp_weights" and value is None:
            tp = _plain(OmegaConf.select(cfg, "model.tp")) or defaults.tp
            value = DEFAULT_TP_WEIGHTS.get(tp)
        if key == "radial_mlp":
            value = [int(w) for w in value]
        file_value = getattr(file_config, key)
        if value != file_value:
            out[key] = (file_value, value)
    return out


def check_architecture(file_config: ModelConfig, cfg: DictConfig, mode: str) -> None:
    """The file's architecture is what fine-tunes; model.* keys that differ are named in a warning (``warn``) or
    refused (``error``)."""
    differences = architecture_differences(file_config, cfg)
    if not differences:
        return
    listed = ", ".join(f"{k} (file {f!r}, config {c!r})" for k, (f, c) in differences.items())
    if mode == "error":
        raise ConfigError(
            f"init_from={cfg.init_from} has another architecture than model.*: {listed}. Set these model.* keys to "
            "the file's values, or finetune.architecture_mismatch=warn to use the file's architecture"
        )
    logger.warning("init_from: the model file's architecture is used; ignored model.* setting(s): %s", listed)


# ------------------------------------------------------------------------------------------------ new elements
def add_elements(model: TDNModel, added: Sequence[int], seed: int = 0) -> tuple[TDNModel, dict[str, torch.Tensor]]:
    """A copy of ``model`` that also knows the elements ``added`` (elements kept sorted).

    Returns the new model and, for every parameter that gained rows, the positions of its pretrained rows. Rows are
    matched by atomic number; a new element's rows are those of a fresh model built with ``seed`` (the global random
    state is left alone) and its E0 is 0 until refitted.
    """
    old = list(model.config.elements)
    elements = sorted(set(old) | {int(z) for z in added})
    values = model.sync_config().to_dict()
    e0 = dict(zip(old, values["atomic_energies"]))
    values.update(elements=elements, atomic_energies=[e0.get(z, 0.0) for z in elements])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        new = TDNModel(ModelConfig.from_dict(values))
    old_rows = torch.tensor([elements.index(z) for z in old], dtype=torch.long)
    target, source = new.state_dict(), model.state_dict()  # detached views of the models' own tensors
    per_element: list[str] = []
    with torch.no_grad():
        for key, value in source.items():
            slot = target[key]
            if slot.shape == value.shape:
                slot.copy_(value)
            elif slot.shape[1:] == value.shape[1:] and (value.shape[0], slot.shape[0]) == (len(old), len(elements)):
                slot[old_rows] = value.to(slot.dtype)
                per_element.append(key)
            else:  # a tensor whose shape depends on the elements in another way: the model changed, not the data
                raise RuntimeError(
                    f"cannot add elements to {key}: shape {tuple(value.shape)} for {len(old)} elements, "
                    f"{tuple(slot.shape)} for {len(elements)}"
                )
    new.sync_config()
    parameters = dict(new.named_parameters())
    return new.eval(), {k: old_rows for k in per_element if k in parameters}


# ------------------------------------------------------------------------------------------------ E0 refit
@torch.no_grad()
def residual_fit(
    model: TDNModel,
    dataset: Any,
    natoms: np.ndarray | None,
    *,
    batch_size: int | None,
    max_atoms: int | None = None,
    elements: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[int, float], int]:
    """Least-squares per-element offsets of ``reference - model`` energies over ``dataset`` (graphs with labels).

    ``elements`` limits the fit to these atomic numbers (the others get 0). Returns ``({Z: offset}, rank)``:
    the minimum-norm solution and the rank of the composition matrix.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    model.to(device)
    n = len(dataset)
    sizes = np.ones(n, dtype=np.int64) if natoms is None else np.asarray(natoms, dtype=np.int64)
    batches = pack_batches(np.arange(n), sizes, None, batch_size=batch_size or 16, max_atoms=max_atoms, max_edges=None)
    counts, residuals = [], []
    num_elements = len(model.config.elements)
    for positions in batches:
        batch = collate([dataset[k] for k in positions]).to(device)
        energy = model(batch, compute_forces=False)["energy"].detach()  # [B]
        index = model.element_index(batch.atomic_numbers)  # [N]
        graph = batch.batch
        count = torch.zeros(batch.num_graphs, num_elements, dtype=torch.float64, device=device)
        count.index_put_((graph, index), torch.ones_like(index, dtype=torch.float64), accumulate=True)
        counts.append(count.cpu().numpy())
        residuals.append((batch.energy.view(-1).double() - energy.double()).cpu().numpy())
    model.train(was_training)
    count_matrix, residual = np.concatenate(counts), np.concatenate(residuals)
    labelled = np.isfinite(residual)
    columns = list(range(num_elements))
    if elements is not None:
        columns = [model.config.elements.index(int(z)) for z in elements]
    matrix = count_matrix[labelled][:, columns]
    offsets = np.zeros(num_elements)
    rank = 0
    if labelled.any() and columns:
        offsets[columns] = np.linalg.lstsq(matrix, residual[labelled], rcond=None)[0]
        rank = int(np.linalg.matrix_rank(matrix))
    return {int(z): float(d) for z, d in zip(model.config.elements, offsets)}, rank


def refit_e0(
    model: TDNModel,
    datamodule: Any,
    elements: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, float]:
    """Add :func:`residual_fit` over the training split (a seeded subset of ``data.stats_max_structures`` when set)
    to the model's E0s; returns the offsets."""
    dataset, natoms, _ = datamodule.prepared("train")
    limit = getattr(datamodule, "stats_max_structures", None)
    if limit is not None and len(dataset) > limit:
        chosen = np.sort(np.random.default_rng(datamodule.seed).choice(len(dataset), limit, replace=False))
        dataset = dataset.subset(chosen)
        natoms = None if natoms is None else natoms[chosen]
    offsets, rank = residual_fit(
        model,
        dataset,
        natoms,
        batch_size=datamodule.eval_batch_size,
        max_atoms=datamodule.max_atoms,
        elements=elements,
        device=device,
    )
    model.to("cpu")
    energies = [e + offsets[z] for z, e in zip(model.config.elements, model.atomic_energies.tolist())]
    model.set_statistics(atomic_energies=energies)
    fitted = len(model.config.elements) if elements is None else len(elements)
    if elements is None:
        model.config.e0_kind = "fitted" if rank >= fitted else "fitted-rank-deficient"
    logger.info(
        "fine-tuning: E0 offsets from the training split (reference - model, least squares, rank %d of %d): %s",
        rank, fitted, ", ".join(f"Z={z}: {d:+.6g} eV" for z, d in offsets.items() if d != 0.0) or "none",
    )  # fmt: skip
    return offsets


# ------------------------------------------------------------------------------------------------ parameters
def freeze_choices(model: nn.Module) -> list[str]:
    """The module prefixes offered in messages: top-level modules and the layers of module lists."""
    out: list[str] = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        candidates = [parts[0]] + ([".".join(parts[:2])] if len(parts) > 2 and parts[1].isdigit() else [])
        out += [c for c in candidates if c not in out]
    return out


def match_prefixes(model: nn.Module, prefixes: Sequence[str], key: str = "finetune.freeze") -> set[str]:
    """Names of the parameters under the given prefixes; an unknown prefix is a ConfigError listing valid ones."""
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise ConfigError(
                f"{key}: no parameter of the model is {prefix!r} or under it; valid names: "
                f"{', '.join(freeze_choices(model))} (or any longer prefix of a parameter name)"
            )
        chosen.update(matched)
    return chosen


@dataclass
class RowRule:
    """Pretrained ``rows`` of parameter ``name`` take ``factor`` times the optimizer's step (0: they stay fixed)."""

    name: str
    rows: torch.Tensor
    factor: float


@dataclass
class ParamPlan:
    """How the parameters of a fine-tuned model train: ``lr_factors`` (name -> factor of the optimizer's lr, for
    parameters that train), ``rules`` for rows inside tensors, and the ``frozen`` names (left out of the optimizer)."""

    lr_factors: dict[str, float] = field(default_factory=dict)
    rules: list[RowRule] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` as planned."""
        for name, p in model.named_parameters():
            p.requires_grad_(name not in self.frozen)

    def row_steps(self, model: nn.Module) -> RowSteps | None:
        params = dict(model.named_parameters())
        rules = [(params[r.name], r.rows, r.factor) for r in self.rules]
        return RowSteps(rules) if rules else None


def plan_parameters(
    model: nn.Module,
    freeze: Sequence[str] = (),
    pretrained_rows: Mapping[str, torch.Tensor] | None = None,
    pretrained_lr_factor: float = 1.0,
) -> ParamPlan:
    """The plan for ``model`` after :func:`add_elements` (``pretrained_rows``: its second result)."""
    pretrained_rows = dict(pretrained_rows or {})
    frozen = match_prefixes(model, freeze)
    plan = ParamPlan()
    for name, _ in model.named_parameters():
        rows = pretrained_rows.get(name)
        if rows is None:  # every value of the tensor is pretrained
            if name in frozen:
                plan.frozen.append(name)
            else:
                plan.lr_factors[name] = pretrained_lr_factor
            continue
        plan.lr_factors[name] = 1.0  # the rows of new elements train at the full rate ...
        factor = 0.0 if name in frozen else pretrained_lr_factor
        if factor != 1.0:  # ... the pretrained ones at a scaled step
            plan.rules.append(RowRule(name, rows, factor))
    if not plan.lr_factors:
        raise ConfigError(f"finetune.freeze={list(freeze)} leaves no parameter to train")
    return plan


class RowSteps:
    """Scales the optimizer's step on chosen rows of parameters: ``p[rows] = before + factor * (after - before)``.

    Adam's (and AdamW's) step is proportional to the learning rate, so this is the step of a per-row learning rate of
    ``factor * lr``; factor 0 restores the rows exactly (bit for bit, weight decay included). The gradients of those
    rows are also zeroed, so that they do not count in gradient clipping or build up optimizer moments.
    """

    def __init__(self, rules: Sequence[tuple[nn.Parameter, torch.Tensor, float]]) -> None:
        self.rules = [(p, rows, float(f)) for p, rows, f in rules]
        self._before: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _rows(self, rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return rows if rows.device == p.device else rows.to(p.device)

    def attach(self, optimizer: torch.optim.Optimizer) -> RowSteps:
        """Hook into ``optimizer`` (hooks of an earlier call are removed first)."""
        self.detach()
        self._handles.append(optimizer.register_step_pre_hook(self._save))
        self._handles.append(optimizer.register_step_post_hook(self._scale))
        for p, rows, factor in self.rules:
            if factor == 0.0:
                self._handles.append(p.register_hook(lambda g, rows=rows: g.index_fill(0, self._rows(rows, g), 0)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _save(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._before = [p[self._rows(rows, p)].clone() for p, rows, _ in self.rules]

    @torch.no_grad()
    def _scale(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for (p, rows, factor), before in zip(self.rules, self._before):
            rows = self._rows(rows, p)
            p[rows] = before if factor == 0.0 else before + factor * (p[rows] - before)
        self._before = []


# ------------------------------------------------------------------------------------------------ the whole step
def new_element_error(init_from: str, names: str, known: Sequence[int], split: str = "training") -> ConfigError:
    """The error for elements of the data that the file's model lacks."""
    return ConfigError(
        f"element(s) {names} appear in the {split} data but the model of init_from={init_from} knows only "
        f"{sorted(known)}: add them (new embedding rows and per-element weights, trained from scratch) with "
        "finetune.new_elements=true, or leave out the structures with these elements"
    )


def refit_device(cfg: DictConfig) -> str:
    """Where the E0 refit runs: the GPU when the run trains on one."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    return "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"


def load_for_finetuning(
    cfg: DictConfig, datamodule: Any, stats: Mapping[str, Any], dtype: str
) -> tuple[TDNModel, ParamPlan]:
    """The model of ``cfg.init_from`` prepared for the new training split, and how its parameters train."""
    from ase.data import chemical_symbols

    section = cfg.get("finetune")
    options = FinetuneOptions.from_config(None if section is None else OmegaConf.to_container(section, resolve=True))
    path = Path(cfg.init_from)
    if not path.is_file():
        raise ConfigError(f"init_from: no such model file: {path}")
    try:
        model = load_model(path, dtype=dtype)
    except ModelFileError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    if abs(float(datamodule.cutoff) - float(model.config.cutoff)) > 1e-9:  # before any graph is evaluated
        raise ConfigError(
            f"the neighbour lists use cutoff {datamodule.cutoff} Å but the model of init_from was built for "
            f"{model.config.cutoff} Å: set cutoff={model.config.cutoff}"
        )
    check_architecture(model.config, cfg, options.architecture_mismatch)
    known = list(model.config.elements)
    added = sorted({int(z) for z in stats["elements"]} - set(known))
    pretrained_rows: dict[str, torch.Tensor] = {}
    if added:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in added)
        if not options.new_elements:
            raise new_element_error(str(cfg.init_from), names, known)
        model, pretrained_rows = add_elements(model, added, seed=int(cfg.seed))
        logger.info("fine-tuning: new element(s) %s added to the model of %s", names, path)
    if options.e0 == "refit":
        refit_e0(model, datamodule, device=refit_device(cfg))
    elif added:
        refit_e0(model, datamodule, elements=added, device=refit_device(cfg))
    plan = plan_parameters(model, options.freeze, pretrained_rows, options.pretrained_lr_factor)
    plan.apply(model)
    logger.info(
        "fine-tuning from %s: E0s %s, %d frozen tensor(s), pretrained lr factor %g", path,
        "refitted" if options.e0 == "refit" else "kept", len(plan.frozen), options.pretrained_lr_factor,
    )  # fmt: skip
    return model, plan
