"""``tdn-train committee.size=N``: N models trained alike, for :class:`tdn.TDNCalculator`'s committees (mean
predictions, force spread as uncertainty).

One command runs N ordinary training runs one after the other (:func:`tdn.train.run.train`), in
``<run>/member_<k>`` with ``seed = seed + k``. The data split and the order of the epochs stay those of
``data.seed`` (by default the base ``seed``), so every member trains, validates and tests on the same structures
and the members differ by their initial weights. ``<run>/committee.json`` lists the exported models (paths relative
to ``<run>``), the seeds and each member's test metrics; ``TDNCalculator(committee_models("<run>"))`` loads them.

Kept simple: members run sequentially in one process (no multi-device training: ``devices=1 num_nodes=1``); a
member that fails stops the command, the members before it stay complete runs. ``ckpt_path`` resumes one run: resume
a member on its own (``committee.size=1`` with its directory, seeds and checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError
from .rundir import check_run_dir, is_launcher_child

logger = logging.getLogger("tdn.train")

LISTING = "committee.json"
MEMBER = "member_{k}"


@dataclass
class CommitteeResult:
    """What ``tdn-train committee.size=N`` produced: each member's run and the listing (None without export)."""

    output_dir: Path
    members: list[Any] = field(default_factory=list)  # tdn.train.run.RunResult per member
    model_paths: list[Path] = field(default_factory=list)
    listing: Path | None = None


def committee_size(cfg: DictConfig) -> int:
    """``committee.size`` (1 when the config has no ``committee`` section); ConfigError unless an integer >= 1."""
    value = OmegaConf.select(cfg, "committee.size", default=1)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"committee.size must be an integer >= 1, got {value!r} (e.g. committee.size=5)")
    return value


def committee_models(run_dir: str | Path) -> list[Path]:
    """The model files a committee run exported, from ``<run_dir>/committee.json``."""
    run_dir = Path(run_dir)
    listing = run_dir / LISTING
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} does not exist: is {run_dir} the directory of a committee run?")
    return [run_dir / path for path in json.loads(listing.read_text())["models"]]


def train_committee(
    cfg: DictConfig, output_dir: str | Path, train_one: Callable[[DictConfig, Path], Any]
) -> CommitteeResult:
    """Train ``committee.size`` members with ``train_one(member_cfg, member_dir)`` (:func:`tdn.train.run.train`)."""
    output_dir = Path(output_dir)
    size = committee_size(cfg)
    if cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path resumes one run, and a committee's members are separate runs: resume a member with "
            f"committee.size=1 hydra.run.dir=<run>/member_<k> seed=<seed + k> data.seed={cfg.data.seed} "
            "ckpt_path=<run>/member_<k>/checkpoints/last.ckpt"
        )
    if int(cfg.get("devices", 1)) * int(cfg.get("num_nodes", 1)) > 1 or is_launcher_child():
        raise ConfigError(f"committee.size={size} trains its members one after the other in one process: use "
                          "devices=1 num_nodes=1 (or train the members as separate runs with seed=...)")  # fmt: skip
    check_run_dir(output_dir, cfg)
    if cfg.get("overwrite"):  # the previous committee's members and listing are this run's outputs to replace
        for old in sorted(output_dir.glob("member_*")):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        (output_dir / LISTING).unlink(missing_ok=True)
    seed, data_seed = int(cfg.seed), int(cfg.data.seed)
    result = CommitteeResult(output_dir)
    for k in range(size):
        member = copy.deepcopy(cfg)
        with open_dict(member):
            member.committee.size = 1
            member.seed = seed + k
            member.data.seed = data_seed  # the same split and epoch order for every member
        member_dir = output_dir / MEMBER.format(k=k)
        logger.info("committee member %d of %d: seed %d, in %s", k + 1, size, seed + k, member_dir)
        result.members.append(train_one(member, member_dir))
    result.model_paths = [r.model_path for r in result.members if r.model_path is not None]
    if len(result.model_paths) == size:
        result.listing = output_dir / LISTING
        listing = {
            "models": [str(path.relative_to(output_dir)) for path in result.model_paths],
            "seeds": [seed + k for k in range(size)],
            "data_seed": data_seed,
            "test_metrics": [r.test_metrics for r in result.members],
        }
        result.listing.write_text(json.dumps(listing, indent=2))
        paths = ", ".join(f"'{path}'" for path in result.model_paths)
        print(f"committee of {size} models: {result.listing}\n  TDNCalculator([{paths}])", flush=True)
    return result
