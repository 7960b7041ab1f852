"""``tdn-train``: the Hydra entry point. ``tdn-train --help`` lists the config groups; ``--cfg job`` prints the
composed config. The config tree ships with the package (``tdn/conf``, the repository's ``conf/``); a user's own
config directory layers on top with ``tdn-train --config-dir my_conf ...``.

A user's mistake (a bad option, a bad file, a bad record, a run directory that holds another run, a loss that
stopped being finite) is reported in one or two lines on stderr, without a traceback, and the exit status is 2
(1 for a training run that diverged). ``debug=true`` or ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ConfigError, NonFiniteLossError
from .resolvers import CONF_DIR

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def _check_conf_dir() -> None:
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(
            f"tdn-train: no config tree at {CONF_DIR}: the installation is incomplete; reinstall tdn "
            "(pip install tdn, or pip install -e . in a checkout)"
        )


def use_hydra_logging() -> None:
    """Send Lightning's log records through Hydra's handlers only. Lightning adds a console handler of its own to
    its loggers on import; with Hydra's root handler as well, every line was printed twice."""
    if not logging.getLogger().handlers:
        return  # no root handler to propagate to: keep Lightning's own
    for name in LIGHTNING_LOGGERS:
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's console handlers (not file handlers)
                log.removeHandler(handler)
        log.propagate = True


def user_error_message(error: BaseException) -> tuple[str, int] | None:
    """The one- or two-line report of a user's mistake, with the exit status; None for anything else (a bug)."""
    from ..data import InvalidRecordError, UnsafePickleError
    from ..io import ModelFileError, NonFiniteModelError

    if isinstance(error, ConfigError):
        return f"configuration error: {error}", 2
    if isinstance(error, UnsafePickleError):
        return (
            f"refused to unpickle {error.path} [key {error.key}]: {error.detail.split(';')[0]}\n"
            "  only if you trust the file: data.reader_options.trusted=true",
            2,
        )
    if isinstance(error, InvalidRecordError):
        return (
            f"bad training data: {error}\n"
            "  fix or remove that structure, or skip invalid structures (counted and reported) with "
            "data.skip_invalid=true",
            2,
        )
    if isinstance(error, (ModelFileError, NonFiniteModelError, FileNotFoundError, IsADirectoryError)):
        return f"error: {error}", 2
    if isinstance(error, NonFiniteLossError):
        return str(error), 1
    return None


def report_user_error(prog: str, error: BaseException, debug: bool) -> None:
    """Exit with the one- or two-line report of a user's mistake (:func:`user_error_message`); re-raise a bug, or
    anything under ``debug``. Call it from an ``except`` block."""
    report = None if debug else user_error_message(error)
    if report is None:
        raise error  # a bug, or debug: the full traceback
    message, status = report
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from .run import train  # heavy imports after Hydra has parsed the command line (fast --help)

    use_hydra_logging()  # after the import: Lightning adds its handlers when it is imported

    debug = bool(cfg.get("debug", False)) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:  # noqa: BLE001 - sorted into a user's mistake or a bug
        report_user_error("tdn-train", error, debug)


def main() -> None:
    _check_conf_dir()
    _main()


if __name__ == "__main__":
    main()
