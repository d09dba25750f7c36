"""Structured configs for one trial, registered in Hydra's ConfigStore.

Each group in ``conf/`` (dataset, model, method, proxy, train, explain) fills one of these dataclasses, so a
misspelt key or a wrong type is an error at composition time. Value ranges and choices that a dataclass
cannot express are checked by :func:`validate`, before any data is loaded. Each group's default option
(``conf/config.yaml`` names them) lists every key of its dataclass with these defaults and comments;
``tests/test_conf_defaults.py`` keeps the two equal.

No torch here: the launcher imports this module to validate cells before any starts.
Cell identity lives in :mod:`proxyattention.identity`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from proxyattention.data.registry import SOURCES
from proxyattention.schedule import ScheduleError, parse_schedule

log = logging.getLogger(__name__)

# Every CAM method of pytorch-grad-cam, by the name used in `method=...`.
CAM_METHODS: tuple[str, ...] = (
    "gradcam", "gradcampp", "eigengradcam", "eigencam", "xgradcam", "layercam", "hirescam",
    "scorecam", "ablationcam", "fullgrad", "gradcamelementwise", "kpcacam", "shapleycam",
    "finercam", "fem", "segeigencam",
)
# Methods with a batched pure-torch implementation (same maps as the library to 1e-4).
NATIVE_CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "eigengradcam", "hirescam", "xgradcam",
                                       "layercam", "gradcamelementwise", "eigencam", "segeigencam")
CAM_IMPLS = ("auto", "native", "library")
PROXY_MODES = ("blend", "mean", "max", "min", "black", "white")
PROXY_TARGETS = ("mistake", "predicted", "true")
EXPLAIN_TARGETS = ("predicted", "true")
EXPLAIN_FILLS = ("black", "mean")
# Keys that left the schema: dropped (with a warning) from older snapshots so their cells still run.
RETIRED_KEYS = {"train.lr": "it had no effect: OneCycleLR starts at train.max_lr / 25"}
DATASET_SOURCES = tuple(SOURCES)
IN_MEMORY = ("auto", "yes", "no")
DEVICES = ("auto", "cpu", "cuda")
# Largest dataset.image_size: images are resized to it and batched on the device (see validate).
MAX_IMAGE_SIZE = 4096
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


class ConfigError(ValueError):
    """A configuration value that cannot be run; the message names the key and what is allowed."""


@dataclass
class DatasetConfig:
    name: str = "digits"  # names the dataset in ids, results and cache files
    source: str = "digits"  # the loader (proxyattention.data.registry.SOURCES)
    root: Optional[str] = None  # the folder holding the images, for the sources that read files
    image_size: int = 32  # images are resized to image_size x image_size px
    num_classes: Optional[int] = None  # filled in from the data; a set value is checked against it
    val_fraction: float = 0.15  # share of the images held out (stratified, seeded) for validation
    test_fraction: float = 0.15  # ignored where the dataset has an official test split
    label_fn: str = "parent"  # "parent" (folder name) or "module:function" taking a path, returning a label
    in_memory: str = "auto"  # hold images on the training device: auto = when they fit its memory budget
    max_memory_mb: Optional[int] = None  # cap of that budget; null: a quarter of free GPU memory (CPU: 2048)
    num_workers: Any = "auto"  # DataLoader workers for file datasets; auto: the CPUs Slurm/affinity give - 1
    val_max: Optional[int] = None  # at most this many validation images (the rest train); null: no cap
    # The content fingerprint of data read from `root`: the planner writes it into each cell's snapshot (it
    # is part of the cell id, so an id names the data, not its folder); the trial checks the data still has it.
    fingerprint: Optional[str] = None
    download: bool = False  # true: torchvision sources download into root if missing
    # Where manifests, file listings and splits are kept (never inside the dataset).
    cache_dir: str = "${oc.env:PROXYATTENTION_CACHE,${oc.env:HOME,.}/.cache/proxyattention}"


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a timm model name
    pretrained: bool = False  # true: timm's ImageNet weights
    weights: Optional[str] = None  # local checkpoint file: offline alternative to `pretrained`
    target_layer: Optional[str] = None  # module path such as "layer3"; default: chosen automatically
    batch_size: int = 128  # the thesis's batch size for this model
    amp: bool = True  # false: never fp16 (ViT is unstable in it): bf16 from compute capability 8.0, else fp32


@dataclass
class MethodConfig:
    name: str = "gradcampp"  # a CAM method of CAM_METHODS
    impl: str = "auto"  # auto: batched torch path where one exists, else pytorch-grad-cam
    batch_size: int = 64  # images per CAM batch in a proxy step


@dataclass
class ProxyConfig:
    enabled: bool = True  # false: no proxy steps (the baseline)
    schedule: str = "2,p,2"  # integers are training epochs, `p` a proxy step (proxyattention.schedule)
    threshold: float = 0.4  # pixels with cam >= threshold are replaced
    weight: float = 0.8  # how strongly mode=blend darkens them: x * (1 - weight * cam)
    subset: float = 1.0  # a seeded random fraction of the misclassified images gets proxies
    mode: str = "blend"  # what the pixels become: one of PROXY_MODES
    target: str = "mistake"  # the class the CAM explains: mistake | predicted | true (docs/method.md)
    clear_every_step: bool = True  # true: a step's proxies replace the earlier ones; false: they chain
    p_trains: bool = False  # true: each `p` is a training epoch followed by the step (the thesis's count)
    log_images: int = 8  # originals and proxies shown side by side in TensorBoard per step
    dump: bool = False  # also save every proxy image as PNG in the trial folder


@dataclass
class TrainConfig:
    seed: int = 0  # the split, initial weights, data order, augmentation and proxy subsets derive from it
    batch_size: Any = None  # null: the model's batch size; an integer; or "auto" (largest that fits)
    max_lr: float = 2e-3  # OneCycleLR's peak; it starts at max_lr / 25
    weight_decay: float = 1e-5  # AdamW's
    amp: bool = True  # mixed precision on CUDA (bf16 from capability 8.0, else fp16 + scaler unless model.amp=false)
    channels_last: Any = "auto"  # NHWC memory layout: auto = on CUDA, off on the CPU; or true/false
    # Deterministic cuDNN/cuBLAS and torch algorithms: a proxy cell and its baseline stay identical on a GPU
    # up to the first proxy step (some ops slower); false: cuDNN autotunes on CUDA (docs/method.md: Fairness)
    deterministic: bool = False
    eval_batch_size: int = 256  # images per batch when validating and testing
    checkpoint: bool = True  # a checkpoint after every epoch, used to resume
    device: str = "auto"  # auto: CUDA when a GPU is usable, else the CPU; cpu | cuda
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # a progress bar per epoch (on a terminal only)


@dataclass
class ExplainConfig:
    """Explainability metrics of the trained model on test images (``proxyattention.explain``)."""

    enabled: bool = True  # false: no explain/* metrics
    method: str = "eigengradcam"  # judge with a CAM method other than the training one (docs/method.md: Fairness)
    impl: str = "auto"  # as method.impl
    images: int = 128  # a seeded subset of the test split (the same for a cell and its baseline); 0 = all
    # N > 0: the same metrics also on a seeded subset of N validation images (the same for a cell and its
    # baseline), as val/explain/* — what a search may select on; 0 = none. Independent of enabled.
    val_images: int = 0
    steps: int = 20  # insertion / deletion steps
    batch_size: int = 128  # images per batch of its CAMs and of the metrics' forward passes
    target: str = "predicted"  # the class explained and scored: predicted (Grad-CAM++, RISE) | true
    fill: str = "black"  # what masked pixels become: black (in pixel space) | mean (pytorch-grad-cam)


@dataclass
class TrialConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)


GROUP_SCHEMAS = {
    "dataset": DatasetConfig, "model": ModelConfig, "method": MethodConfig,
    "proxy": ProxyConfig, "train": TrainConfig, "explain": ExplainConfig,
}


def register_configs() -> None:
    """Register the schemas: ``trial_schema`` for the root, ``<group>/schema`` for each group."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _in_range(key: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{key}={value!r} is out of range; it must be in {bracket}{lo}, {hi}]")


def validate(cfg: DictConfig | TrialConfig) -> None:
    """Check ranges and choices; raise :class:`ConfigError` naming the first offending key."""
    c: Any = cfg
    try:
        parse_schedule(c.proxy.schedule)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    _in_range("proxy.threshold", c.proxy.threshold, 0.0, 1.0)
    _in_range("proxy.weight", c.proxy.weight, 0.0, 1.0)
    _in_range("proxy.subset", c.proxy.subset, 0.0, 1.0, lo_open=True)
    _choice("proxy.mode", c.proxy.mode, PROXY_MODES)
    _choice("proxy.target", c.proxy.target, PROXY_TARGETS)
    _choice("explain.target", c.explain.target, EXPLAIN_TARGETS)
    _choice("explain.fill", c.explain.fill, EXPLAIN_FILLS)
    _choice("method.name", c.method.name, CAM_METHODS)
    _choice("method.impl", c.method.impl, CAM_IMPLS)
    if c.method.impl == "native" and c.method.name not in NATIVE_CAM_METHODS:
        raise ConfigError(f"method.impl=native has no batched path for method.name={c.method.name!r}; "
                          f"native methods: {', '.join(NATIVE_CAM_METHODS)}; use method.impl=auto")
    _choice("dataset.source", c.dataset.source, DATASET_SOURCES)
    _choice("dataset.in_memory", c.dataset.in_memory, IN_MEMORY)
    _choice("train.device", c.train.device, DEVICES)
    if SOURCES[c.dataset.source].needs_root and not c.dataset.root:
        raise ConfigError(f"dataset.root is not set for dataset.source={c.dataset.source!r}; "
                          "pass dataset.root=PATH (the folder holding the images)")
    if c.dataset.image_size < 8:
        raise ConfigError(f"dataset.image_size={c.dataset.image_size} is too small; use 8 or more")
    if c.dataset.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"dataset.image_size={c.dataset.image_size} is too large; use at most {MAX_IMAGE_SIZE} "
                          "(at that size one RGB image is already 48 MiB as uint8 and 192 MiB as float32, so a "
                          "batch and its activations outgrow a GPU; the thesis trains at 224)")
    if not _PLAIN_NAME.fullmatch(str(c.dataset.name)) or c.dataset.name in (".", ".."):
        raise ConfigError(f"dataset.name={c.dataset.name!r} is not a plain name; use letters, digits, '.', '_' "
                          "and '-' (it names files in the cache folder, so it may not hold a path)")
    fp = c.dataset.fingerprint
    if fp is not None and not (isinstance(fp, str) and _FINGERPRINT.fullmatch(fp)):
        raise ConfigError(f"dataset.fingerprint={fp!r} is not a fingerprint (16 hex digits); leave it unset: "
                          "the planner fills it in from the data")
    _in_range("dataset.val_fraction", c.dataset.val_fraction, 0.0, 0.9, lo_open=True)
    _in_range("dataset.test_fraction", c.dataset.test_fraction, 0.0, 0.9, lo_open=True)
    if c.dataset.num_workers != "auto" and not (isinstance(c.dataset.num_workers, int) and c.dataset.num_workers >= 0):
        raise ConfigError(f"dataset.num_workers={c.dataset.num_workers!r} must be auto or an integer >= 0")
    if c.dataset.max_memory_mb is not None and c.dataset.max_memory_mb < 0:
        raise ConfigError(f"dataset.max_memory_mb={c.dataset.max_memory_mb} must be >= 0 (or null: automatic)")
    if c.dataset.val_max is not None and c.dataset.val_max < 1:
        raise ConfigError(f"dataset.val_max={c.dataset.val_max} must be >= 1 (or null: no cap)")
    if c.dataset.val_fraction + c.dataset.test_fraction >= 0.95:
        raise ConfigError("dataset.val_fraction + dataset.test_fraction must leave images to train on "
                          f"(now {c.dataset.val_fraction} + {c.dataset.test_fraction})")
    bs = c.train.batch_size
    if not (bs is None or bs == "auto" or (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0)):
        raise ConfigError(f"train.batch_size={bs!r} is not allowed; use null (the model's batch size), "
                          "a positive integer, or auto")
    if c.train.channels_last not in ("auto", True, False):
        raise ConfigError(f"train.channels_last={c.train.channels_last!r} is not allowed; use auto (on CUDA, "
                          "off on the CPU), true or false")
    if c.model.batch_size <= 0:
        raise ConfigError(f"model.batch_size={c.model.batch_size} must be a positive integer")
    if not c.train.max_lr > 0:
        raise ConfigError(f"train.max_lr={c.train.max_lr} must be > 0")
    if not 0 <= c.train.seed < 2**32:  # what numpy's and torch's generators both accept
        raise ConfigError(f"train.seed={c.train.seed} must be an integer in [0, 2**32)")
    for key, value in (("train.eval_batch_size", c.train.eval_batch_size), ("method.batch_size", c.method.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if c.proxy.log_images < 0:
        raise ConfigError(f"proxy.log_images={c.proxy.log_images} must be >= 0")
    if c.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={c.train.weight_decay} must be >= 0")
    _choice("explain.method", c.explain.method, CAM_METHODS)
    _choice("explain.impl", c.explain.impl, CAM_IMPLS)
    for key, lo in (("images", 0), ("val_images", 0), ("steps", 1), ("batch_size", 1)):
        if c.explain[key] < lo:
            raise ConfigError(f"explain.{key}={c.explain[key]} must be >= {lo}")
    if c.model.pretrained and c.model.weights:
        raise ConfigError("model.pretrained=true and model.weights are both set; choose one "
                          "(model.weights=PATH loads a local file, model.pretrained downloads timm's)")


def spell_targets(plain: dict) -> dict:
    """``proxy.target=true`` / ``explain.target=true`` on a command line arrive as a YAML boolean (or,
    through a str-typed schema, as ``"True"``): the value meant is the word ``true``. Every path from
    overrides to a trial config (this module's :func:`to_trial_config`, the planner's shortcut) calls this."""
    out = dict(plain)
    for group in ("proxy", "explain"):
        if isinstance(out.get(group), dict) and out[group].get("target") in (True, "True"):
            out[group] = {**out[group], "target": "true"}
    return out


def to_trial_config(cfg: DictConfig | dict) -> DictConfig:
    """Merge a plain config (e.g. a cell's ``config.yaml`` snapshot) onto the schema and validate it.

    Unknown keys are errors; missing keys take their defaults. Only the trial keys are kept (a
    composed Hydra config also has ``hydra``).
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain = {k: v for k, v in plain.items() if k in GROUP_SCHEMAS}
    plain = spell_targets(plain)
    for key, why in RETIRED_KEYS.items():
        group, name = key.split(".")
        if isinstance(plain.get(group), dict) and name in plain[group]:
            plain[group] = {k: v for k, v in plain[group].items() if k != name}
            log.warning("ignoring %s from an older config: %s", key, why)
    schema = OmegaConf.structured(TrialConfig)
    merged = OmegaConf.merge(schema, plain)
    validate(merged)
    return merged
