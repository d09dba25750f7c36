"""The report command: built from a real small sweep (real trials), and from a synthetic one."""

import importlib.util
import json
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
    assert done["device.name"].notna().all() and (done["device.precision"] == "fp32").all()
    for d in done["dir"]:
        device = json.loads((Path(d) / "result.json").read_text())["device"]
        assert device["deterministic"] is False and device["tf32"] is False  # train.deterministic's default
        assert check_tensorboard(d) == []
        tags = set(read_scalars(Path(d) / "tb")["tag"])
        assert {"train/loss", "val/acc", "test/acc", "explain/ad"} <= tags


@pytest.mark.floors
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


@pytest.mark.floors
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


# --- hand-made sweeps: the paired test's degenerate case, and what "best" is selected on -------------

def _config(seed: int, threshold: float):
    """The proxy trial of the hand-made sweeps (its baseline: ``baseline_of``)."""
    from proxyattention.config import TrialConfig

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.name = cfg.dataset.source = "digits"
    cfg.dataset.cache_dir = "/tmp/unused"
    cfg.train.seed = seed
    cfg.proxy.schedule, cfg.proxy.threshold = "1,p,1", threshold
    return cfg


def _hand_cell(sweep: Path, seed: int, threshold: float, proxy: bool, metrics: dict,
               device: dict | None = None) -> None:
    """A DONE cell folder (config snapshot, status, result) with the given metrics (and ``device`` block)."""
    cfg = _config(seed, threshold)
    cfg = cfg if proxy else baseline_of(cfg)
    d = sweep / "cells" / cell_id(cfg)
    if d.exists():  # the shared baseline of a seed, written once
        return
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "status.json").write_text(json.dumps({"state": "DONE", "attempts": 1, "error": None}))
    (d / "result.json").write_text(json.dumps({
        "status": "done", "trial_id": cell_id(cfg), "metrics": {"test/loss": 0.5, **metrics},
        "timing": {"total_s": 1.0}, "history": [], "run": {"target_layer": "layer3", "epochs": 2},
        "data": {"split": "x"}, **({"device": device} if device else {})}))


def _table_row(md: str, first_cells: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {first_cells} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_test_with_all_differences_equal_is_degenerate(tmp_path):
    """Every proxy seed beats its baseline by the same +0.02: the differences have zero spread (up to
    floating point), so the t statistic is undefined; no p = 0, no zero-width interval."""
    from proxyattention.analysis import stats

    sweep = tmp_path / "sweep"
    for seed, base in enumerate([0.78, 0.81, 0.80]):
        _hand_cell(sweep, seed, 0.4, False, {"test/acc": base, "val/acc": base, "val/acc_best": base})
        _hand_cell(sweep, seed, 0.4, True, {"test/acc": base + 0.02, "val/acc": base, "val/acc_best": base})
    df = load_results(sweep)
    s = stats.paired_summary(df).iloc[0]
    assert s["paired"] == 3 and s["diff_mean"] == pytest.approx(0.02)
    assert s["degenerate"] and np.isnan(s["p"]) and np.isnan(s["p_holm"])
    assert np.isnan(s["ci_lo"]) and np.isnan(s["ci_hi"])
    assert "all 3 differences equal (+0.02)" in s["note"] and "t statistic is undefined" in s["note"]
    g = stats.grouped_paired(df, ["dataset.name"]).iloc[0]
    assert np.isnan(g["ci_lo"]) and "all 3 differences equal" in g["note"]
    md = build_report(sweep, ReportConfig(maps=0, tb_check=0)).read_text()
    row = _table_row(md, "proxy")  # the one configuration's label
    assert row[3] == "+0.020" and row[5] == "–"  # Δ alone, no interval; no p-value
    assert "degenerate test: all 3 differences equal (+0.02)" in row[7]
    assert "< 0.001" not in md


def test_degenerate_cases_of_every_statistic():
    from proxyattention.analysis import stats

    assert np.isnan(stats.paired_p_value(0.02, 0.0, 3))  # all equal, not zero: no p (was 0)
    assert np.isnan(stats.paired_p_value(0.0, 0.0, 3))  # all zero: no p (was 1)
    assert np.isnan(stats.paired_p_value(0.02, 1e-18, 3))  # equal up to rounding
    assert np.isnan(stats.paired_p_value(0.02, float("nan"), 3)) and np.isnan(stats.paired_p_value(0.1, 0.0, 1))
    assert stats.paired_p_value(0.02, 0.01, 3) == pytest.approx(0.0742, abs=1e-4)  # a real test still runs
    iv = stats.mean_interval([0.1 - 0.08, 0.3 - 0.28, 0.5 - 0.48, float("nan")])
    assert iv.n == 3 and iv.degenerate and np.isnan(iv.lo) and np.isnan(iv.hi)
    assert "all 3 differences equal" in stats.notes_for(iv, 0, 3)
    one = stats.mean_interval([0.02])
    assert not one.degenerate and np.isnan(one.lo) and "differences equal" not in stats.notes_for(one, 0, 1)
    spread = stats.mean_interval([0.01, 0.03, 0.02])
    assert not spread.degenerate and spread.lo < 0.02 < spread.hi


def test_best_configuration_is_selected_on_the_final_validation_accuracy(tmp_path):
    """Threshold 0.4 has the higher *peak* validation accuracy, threshold 0.85 the higher *final* one
    (the model whose test accuracy is reported): 0.85 is the best configuration."""
    sweep = tmp_path / "sweep"
    for seed in range(3):
        base = 0.80 + 0.01 * seed
        _hand_cell(sweep, seed, 0.4, False, {"test/acc": base, "val/acc": base, "val/acc_best": base})
        _hand_cell(sweep, seed, 0.4, True, {"test/acc": 0.70 + 0.01 * seed, "val/acc": 0.75,
                                            "val/acc_best": 0.95})
        _hand_cell(sweep, seed, 0.85, True, {"test/acc": 0.85 + 0.02 * seed, "val/acc": 0.88,
                                             "val/acc_best": 0.90})
    md = build_report(sweep, ReportConfig(maps=0, tb_check=0)).read_text()
    row = _table_row(md, "digits | test_resnet")
    assert row[5] == "0.870 ± 0.020 (n=3)", row  # threshold 0.85's test accuracy, not 0.4's 0.710
    assert "final val acc" in md and "`val/acc`" in md and "not the peak `val/acc_best`" in md


def test_report_refuses_a_bf16_proxy_against_an_fp16_baseline_and_names_the_gpus(tmp_path):
    """Seed 0's proxy cell ran in bf16 on an A100, its baseline in fp16 on a V100: not a pair, listed
    under "Pairs refused"; the two other seeds pair. The checks name every device the cells ran on."""
    sweep = tmp_path / "sweep"
    v100 = {"type": "cuda", "name": "Tesla V100-SXM2-32GB", "capability": "7.0", "precision": "fp16",
            "batch_size": 128, "deterministic": False}
    a100 = {**v100, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "precision": "bf16"}
    for seed, base in enumerate([0.78, 0.81, 0.80]):
        accs = {"test/acc": base, "val/acc": base, "val/acc_best": base}
        _hand_cell(sweep, seed, 0.4, False, accs, device=v100)
        _hand_cell(sweep, seed, 0.4, True, {**accs, "test/acc": base + 0.01 * (seed + 1)},
                   device=a100 if seed == 0 else v100)
    md = build_report(sweep, ReportConfig(maps=0, tb_check=0)).read_text()
    refused = md.split("## Pairs refused", 1)[1].split("\n## ", 1)[0]
    proxy0 = cell_id(_config(0, 0.4))
    assert f"- {proxy0} vs baseline {cell_id(baseline_of(_config(0, 0.4)))}: precision bf16 vs fp16" in refused
    assert "1 proxy cell(s) were not compared" in refused
    row = _table_row(md, "proxy")
    assert row[2].endswith("(n=2)") and row[3].startswith("+0.025")  # seeds 1 and 2 only: +0.02, +0.03
    checks = md.split("## Checks", 1)[1]
    assert ("- Devices: 5 cell(s) on Tesla V100-SXM2-32GB (cuda, fp16); "
            "1 cell(s) on NVIDIA A100-SXM4-80GB (cuda, bf16).") in checks
    assert "cells ran on different devices (1 on NVIDIA A100-SXM4-80GB, 5 on Tesla V100-SXM2-32GB)" in checks

