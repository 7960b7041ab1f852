"""``tdn-train``: the Hydra entry point. ``tdn-train --help`` lists the config groups; ``--cfg job`` prints the
composed config. The config tree is the repository's ``conf/`` (an editable install is the supported layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ConfigError
from .resolvers import CONF_DIR


def _check_conf_dir() -> None:
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(
            f"tdn-train: no config tree at {CONF_DIR}; install tdn from its repository with `pip install -e .` "
            "so that conf/ sits next to the package"
        )


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from .run import train  # heavy imports after Hydra has parsed the command line (fast --help)

    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        print(f"tdn-train: configuration error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    _check_conf_dir()
    _main()


if __name__ == "__main__":
    main()
