"""``python -m proxyattention.data prepare|verify|weights``: get a dataset, check it, record its manifest;
put pretrained model weights into the cache.

- ``prepare NAME [ROOT]`` downloads a torchvision-backed dataset (when online) or finds and unpacks the
  archive already in ROOT; for folder datasets it says where to get them and how the folder must look.
  Then it runs ``verify``.
- ``verify DATASET_OR_PATH`` prints classes, images per class and per split, unreadable files by path,
  non-image files, folders without images and non-RGB images, and writes the dataset's **manifest**.

- ``weights [MODEL ...] [OVERRIDE ...] [--from-file MODEL=FILE]`` puts the pretrained weights of the
  named models, or of every ``model.pretrained=true`` model a sweep plans (the launcher's overrides,
  ``+sweep=thesis_thresholds``; expanded by ``python -m proxyattention.sweep.models``), into the cache trials read
  (:mod:`proxyattention.weights`): downloads them where there is internet (a cluster's login node), or
  copies a weights file into the cache (``--from-file``), then checks each loads. Cells on nodes without
  internet then start from that cache.

The manifest is a small JSON file under ``dataset.cache_dir/manifests`` — never inside the dataset
folder — with the counts and the content fingerprint. :func:`~proxyattention.data.manifest.apply_manifest`, called by
``load_samples`` in every trial, warns naming the dataset and what changed when the data no longer
matches it (so a sweep notices a dataset edited under it), and leaves out the files ``verify`` found
unreadable (with a warning that says how many and where they are listed). The first trial to load a
dataset without a manifest writes one. Embedded and generated datasets (digits, shapes) have nothing on
disk to change and get no manifest.

Speed: files are checked by reading their headers (format, mode, size; ``--decode`` also decodes the
pixels) in a process pool; 100,000 small files take seconds on 2 cores (``bench/verify.py``).
"""


from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from proxyattention.config import DatasetConfig
from proxyattention.data import listing
from proxyattention.data.manifest import (
    MANIFEST_VERSION,
    MAX_LISTED,
    manifest_path,
    summarize,
    write_manifest,
)
from proxyattention.data.registry import MIN_CLASSES, source
from proxyattention.data.samples import DataError, scan_folder
from proxyattention.data.split import make_split
from proxyattention.paths import conf_dir

# Folder datasets of the thesis: where to get them and which folder dataset.root must name.
FOLDER_DATASETS: dict[str, tuple[str, str]] = {
    "stanford_dogs": (
        "http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar, 757 MB)",
        "root = the extracted Images/ folder: Images/n02085620-Chihuahua/n02085620_10074.jpg … "
        "(120 class folders)"),
    "tsinghua_dogs": (
        "https://cg.cs.tsinghua.edu.cn/ThuDogs/ (low-resolution.zip)",
        "root = the extracted low-resolution/ folder: low-resolution/<id>-n000001-Shiba_Dog/*.jpg … "
        "(130 class folders)"),
    "asl_alphabet": (
        "https://www.kaggle.com/datasets/grassknoted/asl-alphabet (asl-alphabet.zip)",
        "root = asl_alphabet_train/asl_alphabet_train/: A/A1.jpg … Z/, del/, nothing/, space/ "
        "(29 class folders; the zip's asl_alphabet_test/ is not class folders and is not used)"),
    "plant_disease": (
        "https://data.mendeley.com/datasets/tywbtsjrjv/1 (Plant_leaf_diseases_dataset_with_augmentation"
        ".zip)",
        "root = the extracted Plant_leave_diseases_dataset_with_augmentation/: Apple___Apple_scab/*.JPG … "
        "(39 class folders, Background_without_leaves included)"),
    "imagefolder": (
        "any folder of class sub-folders",
        "root/<class>/<image> (or root/train/<class>/… + root/test/<class>/… for an official test "
        "split); class = folder name unless dataset.label_fn=module:function"),
}


# ------------------------------------------------------------------------------------------ configs

def dataset_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml"))


def load_dataset_config(config_name: str, /, **overrides: Any) -> DictConfig:
    """``conf/dataset/NAME.yaml`` on the DatasetConfig schema, resolved, with ``overrides`` applied."""
    file = conf_dir() / "dataset" / f"{config_name}.yaml"
    if not file.is_file():
        raise DataError(f"no dataset config {config_name!r} in {file.parent}; known: {', '.join(dataset_names())}")
    raw = OmegaConf.load(file)
    if "defaults" in raw:
        del raw["defaults"]
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw,
                          {k: v for k, v in overrides.items() if v is not None})
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.to_container(cfg, resolve=True))


def config_for(target: str, root: Optional[str] = None, **overrides: Any) -> DictConfig:
    """A named dataset config, or an ImageFolder config for a path."""
    if (conf_dir() / "dataset" / f"{target}.yaml").is_file():
        return load_dataset_config(target, root=root, **overrides)
    if os.path.isdir(target):
        path = os.path.abspath(target)
        return load_dataset_config("imagefolder", name=os.path.basename(path.rstrip(os.sep)) or "imagefolder",
                                   root=path, **overrides)
    raise DataError(f"{target!r} is neither a dataset name ({', '.join(dataset_names())}) nor a folder")


# ----------------------------------------------------------------------------------------- manifest


# -------------------------------------------------------------------------------------- file checks

def probe_image(path: str, decode: bool = False) -> tuple[Optional[str], str]:
    """(mode, "") for a readable image, (None, error) otherwise. Reads the header unless ``decode``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if decode:
                im.load()
            elif im.size[0] <= 0 or im.size[1] <= 0:
                return None, f"empty image size {im.size}"
            return mode, ""
    except Exception as e:  # PIL raises many types for bad files; each is reported by path
        return None, f"{type(e).__name__}: {str(e).strip()[:160]}"


def _probe_chunk(args: tuple[list[str], bool]) -> list[tuple[Optional[str], str]]:
    paths, decode = args
    return [probe_image(p, decode) for p in paths]


def probe_images(paths: Sequence[str], decode: bool = False, workers: Optional[int] = None,
                 progress: bool = False) -> list[tuple[Optional[str], str]]:
    """:func:`probe_image` over ``paths``, in a process pool when there are many."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(paths) < 2000:
        return [probe_image(p, decode) for p in paths]
    chunk = 1000
    chunks = [(list(paths[i:i + chunk]), decode) for i in range(0, len(paths), chunk)]
    out: list[tuple[Optional[str], str]] = []
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")  # fork: no re-import per worker
    with ctx.Pool(workers) as pool:
        it = pool.imap(_probe_chunk, chunks)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(chunks), desc="checking images", unit_scale=chunk, leave=False,
                      file=sys.stderr)
        for part in it:
            out.extend(part)
    return out


# ------------------------------------------------------------------------------------------- verify

def verify(cfg: Any, seed: int = 0, decode: bool = False, workers: Optional[int] = None,
           out=None, progress: bool = True, per_class: bool = True) -> dict[str, Any]:
    """Check the dataset of ``cfg``, print what was found, write its manifest; return the report."""
    out = out or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    on_disk = source(cfg.source).needs_root and cfg.root and os.path.isdir(os.path.expanduser(str(cfg.root)))
    stamped = listing.stamp_now(cfg) if on_disk else None  # taken first: a change while loading shows
    samples = source(cfg.source).load(cfg)
    if stamped is not None:  # planning reads these facts instead of walking the folder again
        listing.remember(cfg, source(cfg.source).loader, samples, *stamped)
    summary = summarize(samples)
    root = os.path.abspath(os.path.expanduser(str(cfg.root))) if cfg.root else None
    p(f"dataset {cfg.name} (source {cfg.source}{', root ' + root if root else ''})")
    p(f"  {len(samples.classes)} classes, {len(samples)} images; official test split: "
      + (f"{summary['official_test']} images" if samples.official_test is not None else "no"))
    if len(samples.classes) < MIN_CLASSES:
        p(f"  too few classes to train on: sweeps and trials refuse a dataset with fewer than {MIN_CLASSES}")

    train, val, test = make_split(samples.labels, seed, cfg.val_fraction, cfg.test_fraction,
                                  samples.official_test, cfg.val_max)
    p(f"  per split (seed {seed}, val_fraction {cfg.val_fraction}"
      + ("" if samples.official_test is not None else f", test_fraction {cfg.test_fraction}")
      + f"): train {len(train)} / val {len(val)} / test {len(test)}")
    if per_class:
        width = max([5] + [len(c) for c in samples.classes])
        p(f"  {'class':<{width}}  {'images':>7} {'train':>7} {'val':>6} {'test':>6}")
        counts = [np.bincount(samples.labels[s], minlength=len(samples.classes)) for s in
                  (np.arange(len(samples)), train, val, test)]
        for i, c in enumerate(samples.classes):
            p(f"  {c:<{width}}  {counts[0][i]:>7} {counts[1][i]:>7} {counts[2][i]:>6} {counts[3][i]:>6}")

    report: dict[str, Any] = {"unreadable": [], "non_rgb": {}, "non_image_files": [], "empty_dirs": []}
    if samples.paths is not None:
        if cfg.source == "imagefolder":
            scans = [scan_folder(os.path.join(root, s)) for s in ("train", "test")] \
                if samples.official_test is not None else [scan_folder(root)]
            report["non_image_files"] = [f for s in scans for f in s.skipped]
            report["empty_dirs"] = [d for s in scans for d in s.empty_dirs]
        t0 = time.perf_counter()
        results = probe_images(samples.paths, decode=decode, workers=workers, progress=progress)
        by_mode: dict[str, list[str]] = {}
        for path, (mode, err) in zip(samples.paths, results):
            if mode is None:
                report["unreadable"].append({"path": path, "error": err})
            elif mode != "RGB":
                by_mode.setdefault(mode, []).append(path)
        report["non_rgb"] = by_mode
        p(f"  checked {len(samples.paths)} files ({'decoded' if decode else 'headers'}) in "
          f"{time.perf_counter() - t0:.1f} s")
        _print_list(p, "non-image files (skipped, not part of the dataset)", report["non_image_files"])
        _print_list(p, "folders without images (no class; add images or remove them)", report["empty_dirs"])
        n_nonrgb = sum(len(v) for v in by_mode.values())
        p(f"  non-RGB images (converted to RGB when loaded; alpha composited on black): {n_nonrgb}")
        for mode, paths in sorted(by_mode.items()):
            p(f"    mode {mode}: {len(paths)}")
            for x in paths[:20]:
                p(f"      {x}")
            if len(paths) > 20:
                p(f"      … {len(paths) - 20} more (listed in the manifest)")
        p(f"  unreadable images (left out of every trial until fixed): {len(report['unreadable'])}")
        for u in report["unreadable"]:
            p(f"    {u['path']}: {u['error']}")
    else:
        p("  images are decoded arrays (no files to check)")

    path = manifest_path(cfg) if source(cfg.source).needs_root else None
    if path is not None:
        write_manifest(path, {
            "version": MANIFEST_VERSION, "dataset": cfg.name, "source": cfg.source, "root": root,
            "label_fn": cfg.label_fn, "written_by": "verify", "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            **summary, "checked": samples.paths is not None, "decoded": decode,
            "unreadable": report["unreadable"][:MAX_LISTED], "unreadable_count": len(report["unreadable"]),
            "non_rgb": {m: {"count": len(v), "paths": v[:MAX_LISTED]} for m, v in report["non_rgb"].items()},
            "non_image_files": report["non_image_files"][:MAX_LISTED],
            "non_image_file_count": len(report["non_image_files"]),
            "empty_dirs": report["empty_dirs"][:MAX_LISTED],
            "split": {"seed": seed, "train": len(train), "val": len(val), "test": len(test)}})
        p(f"  manifest: {path} (fingerprint {samples.fingerprint})")
    else:
        p(f"  fingerprint {samples.fingerprint} (embedded/generated data: no manifest)")
    report.update(summary=summary, split={"train": len(train), "val": len(val), "test": len(test)},
                  manifest=str(path) if path else None)
    return report


def _print_list(p, title: str, items: list[str], limit: int = 20) -> None:
    p(f"  {title}: {len(items)}")
    for x in items[:limit]:
        p(f"    {x}")
    if len(items) > limit:
        p(f"    … {len(items) - limit} more (listed in the manifest)")


# ------------------------------------------------------------------------------------------ prepare

def prepare(name: str, root: Optional[str] = None, download: bool = True, cache_dir: Optional[str] = None,
            **verify_kw: Any) -> int:
    """Get dataset ``name`` into ``root`` (or its configured root), then verify it. Returns an exit code."""
    cfg = load_dataset_config(name, root=root, cache_dir=cache_dir)
    if source(cfg.source).downloads:
        cfg.download = download
        if cfg.root:
            os.makedirs(os.path.expanduser(cfg.root), exist_ok=True)
        print(f"{name}: {'downloading or finding' if download else 'finding'} the data in {cfg.root}")
        source(cfg.source).load(cfg)  # torchvision's loader downloads/extracts; errors say what to do
        cfg.download = False
    elif cfg.source == "imagefolder":
        where, layout = FOLDER_DATASETS.get(name, FOLDER_DATASETS["imagefolder"])
        if not cfg.root or not os.path.isdir(os.path.expanduser(str(cfg.root))):
            print(f"{name} is a folder dataset with no download here.\n  get it from: {where}\n"
                  f"  layout: {layout}\n  then: python -m proxyattention.data prepare {name} ROOT "
                  f"(or verify it), and train with dataset={name} dataset.root=ROOT")
            return 1
    verify(cfg, **verify_kw)
    return 0


# ------------------------------------------------------------------------------------------ weights

def _is_override(arg: str) -> bool:
    return "=" in arg or arg.startswith(("+", "~"))


def sweep_models(overrides: Sequence[str]) -> list[dict]:
    """``[{"name", "pretrained"}]`` of the sweep ``python -m launcher OVERRIDES`` would plan (the
    launcher expands it: ``python -m proxyattention.sweep.models``). Raises DataError with its message."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "proxyattention.sweep.models", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip() or f"python -m proxyattention.sweep.models exited {proc.returncode}"
        raise DataError(msg.removeprefix("error: "))
    return json.loads(proc.stdout)


def weights_command(targets: Sequence[str], from_files: Sequence[str], check_only: bool = False,
                    out=None) -> int:
    """Put the pretrained weights of ``targets`` (model names and/or sweep overrides) and of each
    ``MODEL=FILE`` of ``from_files`` into the cache; one line per model. Returns an exit code."""
    from proxyattention import weights

    out = out or sys.stdout
    seeds: dict[str, str] = {}
    for item in from_files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--from-file {item!r}: write it as MODEL=FILE, e.g. resnet18=~/model.safetensors")
        seeds[name] = path
    names = [t for t in targets if not _is_override(t)]
    overrides = [t for t in targets if _is_override(t)]
    if overrides:
        planned = sweep_models(overrides)
        chosen = [m["name"] for m in planned if m["pretrained"]]
        if not chosen and not names and not seeds:
            print(f"no cell of this sweep sets model.pretrained=true (its models: "
                  f"{', '.join(m['name'] for m in planned)}): no weights to fetch", file=out)
            return 0
        names += chosen
    names = list(dict.fromkeys([*seeds, *names]))
    if not names:
        raise DataError("name the models (resnet18 efficientnet_b0), a sweep (+sweep=thesis_thresholds, "
                        "model=resnet18 model.pretrained=true), or --from-file MODEL=FILE")
    failed = 0
    for name in names:
        try:
            if name in seeds:
                path = weights.seed_from_file(name, seeds[name])
                print(f"{name}: cached from {seeds[name]}: {path}", file=out)
                continue
            import timm

            if not timm.is_model(name):
                raise weights.WeightsError(f"{name!r} is not a timm model")
            loc = weights.locate(name)
            path = weights.cached_path(loc)
            if path is not None:
                print(f"{name}: cached: {path}", file=out)
            elif check_only:
                raise weights.WeightsError(f"not cached ({weights.describe(loc)}; looked in "
                                           f"{weights.cache_dir(loc)})")
            else:
                path = weights.fetch(name)
                print(f"{name}: fetched {weights.describe(loc)}: {path}", file=out)
        except weights.WeightsError as e:
            failed += 1
            print(f"{name}: error: {e}", file=out)
    if failed:
        print(f"{failed} of {len(names)} models have no cached weights; cells with model.pretrained=true "
              "on them cannot start offline", file=out)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxyattention.data",
                                     description="Prepare and verify datasets; cache pretrained weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="where manifests go (default: dataset.cache_dir)")
    common.add_argument("--seed", type=int, default=0, help="seed of the split whose sizes are shown")
    common.add_argument("--workers", type=int, default=None, help="processes for file checks (all cores)")
    common.add_argument("--decode", action="store_true", help="decode every image, not just its header")
    common.add_argument("--no-per-class", action="store_true", help="skip the per-class table")
    pp = sub.add_parser("prepare", parents=[common], help="download or find a dataset, then verify it")
    pp.add_argument("name", help="a dataset config name: " + ", ".join(dataset_names()))
    pp.add_argument("root", nargs="?", help="where the data goes (default: the config's dataset.root)")
    pp.add_argument("--no-download", action="store_true", help="only look for data already in ROOT")
    pv = sub.add_parser("verify", parents=[common], help="check a dataset and write its manifest")
    pv.add_argument("target", metavar="DATASET_OR_PATH")
    pv.add_argument("--root", help="dataset.root for a named dataset")
    pv.add_argument("--strict", action="store_true", help="exit 1 when unreadable files are found")
    pw = sub.add_parser(
        "weights", help="put pretrained model weights into the cache trials read (fetch, or from a file)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Put the pretrained weights of models into the cache that trials with model.pretrained=true\n"
            "read (the Hugging Face hub cache, $HF_HOME/hub; torch's $TORCH_HOME/hub/checkpoints for url\n"
            "weights), so that cells on machines without internet (a cluster's compute nodes; Slurm cells\n"
            "run with HF_HUB_OFFLINE=1) start from them. A cell loads cached weights without asking the hub.\n"
            "\n"
            "Name the models, or give a sweep's overrides exactly as to `python -m launcher` (every model\n"
            "of the sweep with model.pretrained=true). Run it where there is internet (a login node), with\n"
            "the HF_HOME the cells will see. --from-file copies a weights file (safetensors, or a torch state\n"
            "dict) into the cache instead: no network needed. Each new file is checked to load into its model."),
        epilog=("examples:\n"
                "  %(prog)s +sweep=thesis_thresholds\n"
                "  %(prog)s resnet18 efficientnet_b0\n"
                "  %(prog)s --from-file resnet18=~/resnet18.safetensors\n"
                "  %(prog)s --check +sweep=thesis_weights dataset=cifar100"))
    pw.add_argument("targets", nargs="*", metavar="MODEL_OR_OVERRIDE",
                    help="timm model names (resnet18) and/or sweep overrides (+sweep=NAME, model=a,b ...)")
    pw.add_argument("--from-file", action="append", default=[], metavar="MODEL=FILE",
                    help="cache FILE as the pretrained weights of MODEL (repeatable); no network needed")
    pw.add_argument("--check", action="store_true",
                    help="only say which weights are cached; download nothing (exit 1 if any is missing)")
    args = parser.parse_args(argv)
    if args.command == "weights":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return weights_command(args.targets, args.from_file, check_only=args.check)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    kw = dict(seed=args.seed, decode=args.decode, workers=args.workers, per_class=not args.no_per_class)
    try:
        if args.command == "prepare":
            return prepare(args.name, args.root, download=not args.no_download, cache_dir=args.cache_dir,
                           **kw)
        cfg = config_for(args.target, root=args.root, cache_dir=args.cache_dir)
        report = verify(cfg, **kw)
        return 1 if args.strict and report["unreadable"] else 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
