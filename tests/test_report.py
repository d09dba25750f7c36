"""The report command: built from a real small sweep (real trials), and from a synthetic one."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.analysis.maps import evaluation_method, grid_size, render_grid
from proxyattention.analysis.report import (
    BAR_FIGURE,
    ReportConfig,
    build_report,
    parse_overrides,
)
from proxyattention.analysis.table import check_tensorboard, load_results, read_scalars
from proxyattention.config import register_configs, to_trial_config
from proxyattention.identity import baseline_of, cell_id

ROOT = Path(__file__).resolve().parent.parent
register_configs()


def snapshot(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_trial_config(compose(config_name="config", overrides=list(overrides)))


def add_cell(sweep: Path, cfg) -> Path:
    d = sweep / "cells" / cell_id(cfg)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return d


def run_cell(d: Path) -> int:
    return subprocess.run([sys.executable, "-m", "proxyattention.cell", str(d)], capture_output=True,
                          text=True, cwd=ROOT).returncode


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """A proxy cell and its baseline trained for real (digits, test_resnet, 1,p,1), a cell that fails
    (missing dataset folder) and one never started."""
    sweep = tmp_path_factory.mktemp("real") / "sweep"
    common = ["model=test_resnet", "proxy.schedule='1,p,1'", "train.num_threads=2", "train.progress=false",
              "explain.images=32", "explain.steps=8"]
    proxy = snapshot(*common, "train.seed=0")
    cells = [add_cell(sweep, proxy), add_cell(sweep, baseline_of(proxy))]
    codes = [run_cell(d) for d in cells]
    assert codes == [0, 0], [(d / "trial.log").read_text()[-2000:] for d in cells]
    broken = add_cell(sweep, snapshot(*common, "dataset=imagefolder", "dataset.root=/nonexistent/images"))
    assert run_cell(broken) != 0
    add_cell(sweep, snapshot(*common, "train.seed=1"))
    return sweep


@pytest.mark.slow
def test_real_cells_record_explain_metrics_and_tensorboard_agrees(real_sweep):
    df = load_results(real_sweep)
    done = df[df["state"] == "DONE"]
    assert len(done) == 2
    for col in ("explain/ad", "explain/ai", "explain/ag", "explain/insertion", "explain/deletion",
                "timing/explain_s"):
        assert done[col].notna().all(), col
    assert (done["explain/images"] == 32).all()
    for d in done["dir"]:
        assert check_tensorboard(d) == []
        tags = set(read_scalars(Path(d) / "tb")["tag"])
        assert {"train/loss", "val/acc", "test/acc", "explain/ad"} <= tags


@pytest.mark.slow
def test_report_from_a_real_small_sweep(real_sweep, tmp_path):
    out = tmp_path / "report"
    md_path = build_report(real_sweep, ReportConfig(maps=4, images=5, out=str(out)))
    md = md_path.read_text()
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 4 and sorted(csv["state"]) == ["DONE", "DONE", "FAILED", "PENDING"]
    assert {"proxy.threshold", "test/acc", "explain/ad", "dir"} <= set(csv.columns)
    # Failed and unfinished cells are listed, with the failure's reason.
    failed = csv.loc[csv["state"] == "FAILED", "cell_id"].iloc[0]
    assert failed in md and "/nonexistent/images" in md
    assert csv.loc[csv["state"] == "PENDING", "cell_id"].iloc[0] in md
    # One seed: the report says so (missing baselines are covered on a hand-made sweep in test_results).
    assert "only 1 seed(s) (< 3)" in md
    for section in ("## Test accuracy by dataset and model", "## By schedule", "## By threshold",
                    "## By weight", "## By subset", "## Every proxy configuration", "## Explainability",
                    "## Attention maps", "TensorBoard scalars", "all agree"):
        assert section in md, section
    # Figures and the attention-map grid decode as images of the expected size.
    for fig in (out / "figures").glob("*.png"):
        with Image.open(fig) as im:
            im.verify()
    assert (out / "figures" / BAR_FIGURE).is_file()
    maps = list((out / "maps").glob("*.png"))
    assert len(maps) == 1
    with Image.open(maps[0]) as im:
        assert im.size == grid_size(5, 32) and im.mode == "RGB"
        assert np.asarray(im).std() > 10  # not blank
    assert "eigengradcam" in md  # a gradcampp-trained model judged with another method


@pytest.mark.slow
def test_real_report_cli(real_sweep, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "proxyattention.report", str(real_sweep), "report.maps=0",
                           f"report.out={out}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout and "2 DONE" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "proxyattention.report", str(real_sweep), "report.mehtod=x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "mehtod" in bad.stderr


def test_report_of_a_synthetic_sweep(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sweep = tmp_path / "sweep"
    n = bench.synthetic_sweep(sweep, cells=60, tensorboard=False)
    assert n == 60
    md = build_report(sweep, ReportConfig(maps=0)).read_text()
    df = load_results(sweep)
    assert len(df) == 60
    assert "interval contains 0" in md or "only" in md
    for name in (BAR_FIGURE, "test_acc_vs_hyperparameters.png", "learning_curves.png"):
        with Image.open(sweep / "report" / "figures" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_render_grid_size_and_pixels(tmp_path):
    k, h = 3, 20
    images = np.random.default_rng(0).random((k, h, h, 3))
    cams = np.zeros((k, h, h))
    cams[:, :5, :5] = 1
    masks = np.zeros((k, h, h), dtype=bool)
    masks[:, 5:15, 5:15] = True
    path = render_grid(images, cams, 1 - cams, [("a", "b", "c")] * k, ("image", "baseline", "proxy"),
                       tmp_path / "g.png", masks)
    with Image.open(path) as im:
        assert im.size == grid_size(k, h)
        arr = np.asarray(im.convert("RGB"))
    tile = grid_size(1, h)[0] // 3
    assert arr.shape == (grid_size(k, h)[1], grid_size(k, h)[0], 3) and tile >= 96


def test_evaluation_method_differs_from_training():
    assert evaluation_method("gradcampp", "eigengradcam") == "eigengradcam"
    assert evaluation_method("eigengradcam", "eigengradcam") == "gradcampp"


def test_report_options_are_checked():
    assert parse_overrides(["report.method=gradcam", "report.maps=0"]).maps == 0
    with pytest.raises(SystemExit, match="not an option"):
        parse_overrides(["method=gradcam"])
    with pytest.raises(SystemExit, match="choose one of"):
        parse_overrides(["report.method=nope"])
    with pytest.raises(SystemExit):
        parse_overrides(["report.maps=many"])
