"""Pretrained weights: where timm looks for a model's weights, whether they are cached, putting them there.

``timm.create_model(name, pretrained=True)`` (timm >= 1.0) reads the model's *pretrained cfg*: weights
with an ``hf_hub_id`` (every model of this project) come from the Hugging Face hub through
``huggingface_hub.hf_hub_download``, which keeps them in its cache::

    $HF_HUB_CACHE (default $HF_HOME/hub, $HF_HOME default ~/.cache/huggingface)
      models--timm--resnet18.a1_in1k/
        refs/main                            the snapshot "main" names (a commit hash, no newline)
        snapshots/<hash>/model.safetensors   (or pytorch_model.bin; timm tries the safetensors first)

and with ``HF_HUB_OFFLINE=1`` reads only that cache. Weights with only a ``url`` go to torch's hub cache,
``$TORCH_HOME/hub/checkpoints/<file name of the url>`` (default ``~/.cache/torch``).

Compute nodes of a cluster often have no internet, so weights are fetched ahead, on a machine that has it
(``python -m proxyattention.data weights``, :func:`fetch`), or a file copied there is put into the cache
(:func:`seed_from_file`). Before a sweep starts, the launcher refuses pretrained cells whose weights are
neither cached nor fetchable (:func:`hub_offline`, :func:`cached_path`). A trial whose weights are cached
loads that file and never asks the hub (:func:`proxyattention.models.build_model`): every cell of a
sweep starts from the same bytes, online or not.

Importing this module is cheap (standard library only): the launcher checks the cache without torch.
:func:`locate` needs timm and runs where timm is imported anyway (a trial, the model check subprocess).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from launcher import fileio

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order
_TRUE = ("1", "ON", "YES", "TRUE")  # how huggingface_hub reads a boolean environment variable
_COMMIT = re.compile(r"[0-9a-f]{40}")
COMMAND = "python -m proxyattention.data weights"


class WeightsError(RuntimeError):
    """Weights that cannot be located, fetched or cached; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# Where timm looks (needs timm)


def locate(name: str) -> dict[str, Any]:
    """What timm's pretrained cfg of ``name`` says about its weights, as plain JSON-able values.

    ``{"name", "hub_id", "hub_filename", "url", "file", "custom_load"}`` (each may be None); all four
    locations None means timm has no pretrained weights for ``name``.
    """
    import timm

    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    get = (lambda k: getattr(cfg, k, None) or None) if cfg is not None else (lambda k: None)
    return {"name": name, "hub_id": get("hf_hub_id"), "hub_filename": get("hf_hub_filename"),
            "url": get("url"), "file": get("file"), "custom_load": get("custom_load")}


def describe(loc: Mapping[str, Any]) -> str:
    """Where the weights come from, for messages: ``timm/resnet18.a1_in1k`` or the url's file name."""
    if loc.get("file"):
        return str(loc["file"])
    if loc.get("hub_id"):
        return str(loc["hub_id"])
    if loc.get("url"):
        return _url_file(str(loc["url"]))
    return "none"


# ---------------------------------------------------------------------------------------------------
# The caches (standard library only; the environment is read at each call)


def _env(env: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if env is None else env


def hub_offline(env: Optional[Mapping[str, str]] = None) -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is true, as huggingface_hub reads it."""
    e = _env(env)
    value = e.get("HF_HUB_OFFLINE") or e.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


def hf_hub_cache(env: Optional[Mapping[str, str]] = None) -> Path:
    """The Hugging Face hub cache, by the environment variables huggingface_hub reads, in its order."""
    e = _env(env)
    home = e.get("HF_HOME") or os.path.join(e.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                                    ".cache"), "huggingface")
    home = os.path.expandvars(os.path.expanduser(home))
    cache = e.get("HF_HUB_CACHE") or e.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def torch_checkpoints(env: Optional[Mapping[str, str]] = None) -> Path:
    """torch's hub checkpoint folder (``torch.hub.get_dir()/checkpoints``), where url weights go."""
    e = _env(env)
    home = e.get("TORCH_HOME") or os.path.join(e.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                                       ".cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def _url_file(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _hub_repo(hub_id: str) -> tuple[str, str]:
    """``("timm/x.tag", "main")`` for ``timm/x.tag`` (timm's ``id@revision`` names a revision)."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or "main"


def _repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def hub_filenames(loc: Mapping[str, Any]) -> tuple[str, ...]:
    """The files timm asks the hub for, in its order (safetensors alternatives first)."""
    name = loc.get("hub_filename")
    if not name:
        return HUB_FILES
    if name.endswith(".safetensors") or loc.get("custom_load") == "hf":
        return (name,)
    if name.endswith(".bin"):
        return (name[:-4] + ".safetensors", name)
    return (name,)


def source(loc: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> str:
    """Where timm loads the weights from, as it decides: ``file``, ``hub``, ``url`` or "" (none)."""
    if loc.get("file"):
        return "file"
    old_cache = (_env(env).get("TIMM_USE_OLD_CACHE") or "0").strip()
    if loc.get("url") and old_cache.isdigit() and int(old_cache) > 0 \
            and (torch_checkpoints(env) / _url_file(loc["url"])).is_file():
        return "url"  # timm prefers a cached url file when TIMM_USE_OLD_CACHE is set
    if loc.get("hub_id"):
        return "hub"
    if loc.get("url"):
        return "url"
    return ""


def cached_path(loc: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The cached weights file timm would load for ``loc`` without a download, or None."""
    kind = source(loc, env)
    if kind == "file":
        path = Path(str(loc["file"])).expanduser()
        return path if path.is_file() else None
    if kind == "url":
        path = torch_checkpoints(env) / _url_file(str(loc["url"]))
        return path if path.is_file() else None
    if kind == "hub":
        repo, revision = _hub_repo(str(loc["hub_id"]))
        folder = _repo_dir(hf_hub_cache(env), repo)
        commit = revision if _COMMIT.fullmatch(revision) else None
        if commit is None:
            try:
                commit = (folder / "refs" / revision).read_text()
            except OSError:
                return None
        for filename in hub_filenames(loc):
            path = folder / "snapshots" / commit / filename
            if path.is_file():
                return path
    return None


def cache_dir(loc: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> Path:
    """The folder the weights of ``loc`` are looked for in (for messages)."""
    kind = source(loc, env)
    if kind == "file":
        return Path(str(loc["file"])).expanduser().parent
    return torch_checkpoints(env) if kind == "url" else hf_hub_cache(env)


def fix_hint(names: list[str]) -> str:
    """The commands that put the weights of ``names`` into the cache."""
    listed = " ".join(names)
    return (f"on a machine with internet and the same HF_HOME run `{COMMAND} {listed}`, or copy a weights "
            f"file here and run `{COMMAND} --from-file {names[0]}=FILE`")


# ---------------------------------------------------------------------------------------------------
# Filling the cache (needs torch and timm)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_state_dict(path: Path) -> dict:
    """A state dict from a safetensors or torch file (raw, or under ``state_dict`` / ``model``)."""
    import torch

    if _is_safetensors(path):
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_loads(name: str, path: Path) -> None:
    """Build ``name`` with timm and load ``path`` as its pretrained weights, as a trial does (no hub)."""
    import timm

    try:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except Exception as e:
        what = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:2])[:300]
        raise WeightsError(f"{path} does not load into timm's {name} ({type(e).__name__}: {what}); "
                           "the cache is unchanged") from None


def seed_from_file(name: str, file: str | Path, env: Optional[Mapping[str, str]] = None) -> Path:
    """Put the weights file ``file`` into the cache where timm's own offline load of ``name`` finds it.

    Hub weights: a snapshot of their repository in the hub cache named by the file's content, with the
    revision timm asks for (``main``) pointing at it; the file keeps its format (``model.safetensors``
    or ``pytorch_model.bin``; a torch file holding the state dict under ``state_dict``/``model`` is
    written as the plain state dict timm's hub loader expects). Url weights: the url's file name in
    torch's hub checkpoints. The file must load into the model (checked before the cache changes).
    Returns the cached path.
    """
    src = Path(file).expanduser()
    if not src.is_file():
        raise WeightsError(f"--from-file {name}={file}: no such file")
    loc = locate(name)
    kind = source(loc, env)
    if kind == "":
        raise WeightsError(f"timm has no pretrained weights for {name!r}; nothing to cache (use "
                           "model.pretrained=false, or model.weights=PATH for a file of your own)")
    if kind == "file":
        raise WeightsError(f"timm loads {name!r} from the local file {loc['file']}; copy the weights there")
    safetensors_file = _is_safetensors(src)
    plain = src if safetensors_file else None
    state = None
    if not safetensors_file:
        state = _read_state_dict(src)  # re-saved plain: timm's hub loader does not unwrap
    digest = hashlib.sha1()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)

    if kind == "url":
        target = torch_checkpoints(env) / _url_file(str(loc["url"]))
        _write_checked(name, target, plain, state)
        return target

    repo, revision = _hub_repo(str(loc["hub_id"]))
    folder = _repo_dir(hf_hub_cache(env), repo)
    names = hub_filenames(loc)
    wanted = next((n for n in names if n.endswith(".safetensors") == safetensors_file), None)
    if wanted is None:  # the hub has this model in the other format only: convert
        wanted = names[0]
        if wanted.endswith(".safetensors"):
            state = _read_state_dict(src)
            plain = None
    commit = revision if _COMMIT.fullmatch(revision) else digest.hexdigest()
    target = folder / "snapshots" / commit / wanted
    _write_checked(name, target, plain, state, as_safetensors=wanted.endswith(".safetensors"))
    if not _COMMIT.fullmatch(revision):
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        fileio.write_text_atomic(folder / "refs" / revision, commit)  # no newline: the hub reads it raw
    return target


def _write_checked(name: str, target: Path, plain: Optional[Path], state: Optional[dict],
                   as_safetensors: bool = False) -> None:
    """Write ``target`` (a copy of ``plain``, or ``state`` saved), then check it loads; undo if not."""
    new_dirs = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_file(target, "wb") as out:
        if plain is not None:
            with open(plain, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
        elif as_safetensors:
            import safetensors.torch

            out.write(safetensors.torch.save({k: v.contiguous() for k, v in (state or {}).items()}))
        else:
            import torch

            torch.save(state, out)
    try:
        check_loads(name, target)
    except WeightsError:
        target.unlink(missing_ok=True)
        for d in new_dirs:  # innermost first: only the folders made here, and only when left empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


def fetch(name: str) -> Path:
    """Download the weights of ``name`` into the cache as timm does (needs internet); the cached path."""
    import timm

    loc = locate(name)
    if source(loc) == "":
        raise WeightsError(f"timm has no pretrained weights for {name!r} (use model.pretrained=false)")
    if hub_offline():
        raise WeightsError(f"the weights of {name} ({describe(loc)}) are not cached and HF_HUB_OFFLINE is set; "
                           f"unset it on a machine with internet, or `{COMMAND} --from-file {name}=FILE`")
    try:
        timm.create_model(name, pretrained=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise WeightsError(f"could not fetch the weights of {name} ({describe(loc)}): {type(e).__name__}: "
                           f"{first}") from None
    path = cached_path(loc)
    if path is None:
        raise WeightsError(f"timm loaded {name} but its weights are not where the cache should hold them "
                           f"({hf_hub_cache()}); check HF_HOME / HF_HUB_CACHE")
    return path
