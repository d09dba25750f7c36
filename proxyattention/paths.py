"""Where the Hydra configs (``conf/``) and the saved sweeps (``sweeps/``) live.

In a clone (an editable install) they are the repository's top-level ``conf/`` and ``sweeps/``, so an
edit there counts at once. A wheel carries the same folders as package data, ``proxyattention/_conf``
and ``proxyattention/_sweeps`` (the mapping is in pyproject.toml). Pure standard library: the launcher,
the Hydra plugins and Slurm jobs import this without paying for torch, numpy or omegaconf.
"""

from __future__ import annotations

from pathlib import Path

# A trial folder's own files, beside the ones every cell folder has (launcher.fileio: config.yaml,
# result.json, error.json).
CHECKPOINT = "checkpoint.pt"
TB_DIR = "tb"
LOG = "trial.log"

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(packaged: str, in_repo: str) -> Path:
    """The installed copy ``proxyattention/<packaged>`` if there is one, else the clone's ``<in_repo>``."""
    installed = _PACKAGE / packaged
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent / in_repo
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"proxyattention's {in_repo}/ folder is missing (looked in {installed} and "
                            f"{checkout}); reinstall the package: pip install .")


def conf_dir() -> Path:
    """The Hydra config folder (``config.yaml``, ``dataset/``, ``model/`` …)."""
    return _data_dir("_conf", "conf")


def sweeps_dir() -> Path:
    """The saved-sweeps folder: ``sweep/<name>.yaml`` runs as ``+sweep=<name>``."""
    return _data_dir("_sweeps", "sweeps")
