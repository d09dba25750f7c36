"""The results table and the paired statistics, on hand-made sweep folders whose answers are known."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from launcher.cellstate import error_headline
from proxyattention import identity
from proxyattention.analysis import stats, table
from proxyattention.config import TrialConfig
from proxyattention.identity import baseline_of, cell_id

T975 = {1: 12.7062047362, 2: 4.30265272975, 3: 3.18244630528, 5: 2.57058183661, 10: 2.22813885196,
        30: 2.04227245630}


def trial(seed=0, threshold=0.4, proxy=True, dataset="digits"):
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.name = cfg.dataset.source = dataset
    cfg.train.seed = seed
    cfg.proxy.schedule = "1,p,1"
    cfg.proxy.threshold = threshold
    cfg.dataset.cache_dir = "/tmp/unused"
    return cfg if proxy else baseline_of(cfg)


def write_cell(sweep: Path, cfg, acc=None, state=None, error=None, history=None, explain=None,
               device=None) -> Path:
    """A cell folder as the launcher and the trial leave it (config snapshot, status, result/error)."""
    cid = cell_id(cfg)
    d = sweep / "cells" / cid
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if state:
        (d / "status.json").write_text(json.dumps({"state": state, "attempts": 1, "error": error}))
    if acc is not None:
        metrics = {"test/acc": acc, "test/loss": 1 - acc, "val/acc_best": acc, **(explain or {})}
        (d / "result.json").write_text(json.dumps({
            "status": "done", "trial_id": cid, "metrics": metrics, "timing": {"total_s": 1.0},
            "history": history or [], "run": {"target_layer": "layer2", "epochs": 2},
            "data": {"split": "x"}, **({"device": device} if device else {})}))
    elif error:
        (d / "error.json").write_text(json.dumps({"status": "failed", "type": "DataError", "error": error}))
    return d


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Config A (threshold 0.4): 3 seeds, all paired. Config B (0.85): 2 seeds. Config C (other data):
    its baseline FAILED. Plus a PENDING cell. Read-only for the tests."""
    s = tmp_path_factory.mktemp("results") / "sweep"
    for seed, (p, b) in enumerate([(0.80, 0.78), (0.82, 0.81), (0.84, 0.80)]):
        write_cell(s, trial(seed), p, "DONE", explain={"explain/ad": 40.0 - seed, "explain/ai": 10.0})
        write_cell(s, trial(seed, proxy=False), b, "DONE", explain={"explain/ad": 45.0, "explain/ai": 12.0})
    for seed, p in enumerate([0.79, 0.83]):
        write_cell(s, trial(seed, threshold=0.85), p, "DONE")
    write_cell(s, trial(0, dataset="shapes"), 0.6, "DONE")
    write_cell(s, trial(0, dataset="shapes", proxy=False), None, "FAILED", error="DataError: no root")
    write_cell(s, trial(5), None, None)
    return s


def test_load_results_one_row_per_cell_with_config_metrics_state(sweep):
    df = table.load_results(sweep)
    assert len(df) == 11
    assert df["state"].value_counts().to_dict() == {"DONE": 9, "FAILED": 1, "PENDING": 1}
    for col in ("cell_id", "role", "config_id", "baseline_id", "proxy.threshold", "train.seed",
                "dataset.name", "explain.method", "test/acc", "explain/ad", "dir", "result_path"):
        assert col in df.columns, col
    assert (df["cell_id"] == df["_key"]).all()  # folder names are the config's cell ids
    # The launcher-style query of the issue:
    best = df[(df["method.name"] == "gradcampp") & (df["dataset.name"] == "digits")
              & (df["proxy.threshold"] == 0.4)]["test/acc"].max()
    assert best == pytest.approx(0.84)
    failed = df[df["state"] == "FAILED"].iloc[0]
    assert failed["role"] == "baseline" and "no root" in failed["error"]


def test_baseline_ids_are_config_baseline_of(sweep):
    df = table.load_results(sweep)
    for _, r in df[df["role"] == "proxy"].iterrows():
        cfg = OmegaConf.load(Path(r["dir"]) / "config.yaml")
        assert r["baseline_id"] == cell_id(baseline_of(cfg))
        assert r["cell_id"] == cell_id(cfg)
    # Proxy cells of one configuration share config_id across seeds; configurations differ.
    proxy = df[(df["role"] == "proxy") & (df["dataset.name"] == "digits")]
    assert proxy.groupby("proxy.threshold")["config_id"].nunique().tolist() == [1, 1]


def test_exact_and_fast_ids_agree(sweep):
    for d in sorted((sweep / "cells").iterdir()):
        snap = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(d / "config.yaml")).items()}
        assert table.ids_for(snap) == table.ids_for(identity.complete(snap))


def test_t_quantile_matches_tables():
    for df, q in T975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(q, rel=1e-9)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 50, 200):
        for p in (0.9, 0.95, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8)



def test_t_quantile_is_scipy_backed():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert stats.t_cdf(stats.t_quantile(0.9, 6), 6) == pytest.approx(0.9, rel=1e-12)
    with pytest.raises(ValueError, match="0 < p < 1"):
        stats.t_quantile(1.0, 3)


def test_first_line_of_an_error_text():
    traceback = ("\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "ValueError: first\n\nDuring handling of the above exception, another exception occurred:\n"
                 "\n  File \"y.py\", line 2\nproxyattention.data.DataError: no root /data\n")
    assert error_headline(traceback) == "proxyattention.data.DataError: no root /data"
    assert error_headline("\n\n  exit code 1  \nsome stderr\nmore\n") == "exit code 1"
    assert error_headline("interrupted by the launcher; rerun to resume") == \
        "interrupted by the launcher; rerun to resume"
    assert error_headline("Traceback (most recent call last):\nKeyboardInterrupt\n") == "KeyboardInterrupt"
    assert error_headline("") == "" and error_headline(None) == "" and error_headline("\n \n") == ""
    cut = error_headline("\n" + "x" * 200, limit=20)
    assert cut == "x" * 19 + "…" and len(cut) == 20
    assert error_headline("y" * 20, limit=20) == "y" * 20

def test_paired_statistics_on_a_hand_made_sweep(sweep):
    df = table.load_results(sweep)
    s = stats.paired_summary(df).set_index("config_id")
    labels = table.config_labels(df)
    by_label = {labels[c]: r for c, r in s.iterrows()}
    a = by_label["dataset=digits proxy.threshold=0.4"]
    diffs = np.array([0.02, 0.01, 0.04])
    half = T975[2] * diffs.std(ddof=1) / math.sqrt(3)
    assert a["paired"] == 3 and a["diff_mean"] == pytest.approx(diffs.mean())
    assert a["diff_std"] == pytest.approx(diffs.std(ddof=1))
    assert (a["ci_lo"], a["ci_hi"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert a["contains_zero"] and a["note"] == "interval contains 0"
    assert a["baseline_mean"] == pytest.approx(np.mean([0.78, 0.81, 0.80]))

    b = by_label["dataset=digits proxy.threshold=0.85"]
    assert b["paired"] == 2 and "only 2 seed(s) (< 3)" in b["note"]
    assert b["diff_mean"] == pytest.approx(np.mean([0.79 - 0.78, 0.83 - 0.81]))

    c = by_label["dataset=shapes proxy.threshold=0.4"]
    assert c["paired"] == 0 and c["no_baseline"] == 1 and "no baseline for 1 seed(s)" in c["note"]
    assert math.isnan(c["diff_mean"])


def test_interval_excluding_zero_has_no_caveat():
    iv = stats.mean_interval([0.03, 0.031, 0.029, 0.03])
    assert iv.lo > 0 and not iv.contains_zero
    assert stats.notes_for(iv, 0, iv.n) == ""
    assert stats.mean_interval([0.1]).n == 1 and math.isnan(stats.mean_interval([0.1]).lo)


def test_grouped_paired_averages_per_seed_first(sweep):
    df = table.load_results(sweep)
    g = stats.grouped_paired(df, ["dataset.name"]).set_index("dataset.name")
    # digits: seed 0 diffs 0.02 (A) and 0.01 (B); seed 1: 0.01, 0.02; seed 2: 0.04 → per-seed means.
    per_seed = [np.mean([0.02, 0.01]), np.mean([0.01, 0.02]), 0.04]
    assert g.loc["digits", "diff_mean"] == pytest.approx(np.mean(per_seed))
    assert g.loc["digits", "paired_seeds"] == 3 and g.loc["digits", "cells"] == 5


def test_unfinished_sweep_without_results_loads(tmp_path):
    s = tmp_path / "s"
    write_cell(s, trial(0), None, "RUNNING")
    write_cell(s, trial(0, proxy=False), None, None)
    df = table.load_results(s)
    assert sorted(df["state"]) == ["PENDING", "RUNNING"]
    assert stats.paired_summary(df).empty
    with pytest.raises(table.ResultsError, match="cells/"):
        table.load_results(tmp_path / "nowhere")


def test_tensorboard_check_reads_events_and_finds_disagreement(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    cell = tmp_path / "cell"
    history = [{"epoch": e, "train/loss": 1.0 / e, "val/acc": 0.5 + e / 10} for e in (1, 2)]
    w = SummaryWriter(str(cell / "tb"))
    for h in history:
        for k, v in h.items():
            if k != "epoch":
                w.add_scalar(k, v, h["epoch"])
    w.add_scalar("test/acc", 0.75, 2)
    w.close()
    (cell / "result.json").write_text(json.dumps({"status": "done", "history": history,
                                                  "metrics": {"test/acc": 0.75}}))
    scalars = table.read_scalars(cell / "tb")
    assert set(scalars["tag"]) == {"train/loss", "val/acc", "test/acc"}
    assert table.check_tensorboard(cell) == []
    history[1]["val/acc"] = 0.9
    (cell / "result.json").write_text(json.dumps({"status": "done", "history": history,
                                                  "metrics": {"test/acc": 0.75}}))
    assert table.check_tensorboard(cell) == ["val/acc at epoch 2: TensorBoard 0.699999988079071 vs "
                                         "result.json 0.9"]


def test_results_csv_frame_puts_identity_first(sweep):
    df = table.results_csv_frame(table.load_results(sweep))
    assert list(df.columns[:3]) == ["cell_id", "state", "role"]
    assert not any(c.startswith("_") for c in df.columns)
    assert isinstance(df, pd.DataFrame)


def test_pairs_that_trained_differently_are_refused_and_mixed_devices_flagged(tmp_path):
    from proxyattention.analysis.report import _device_notes, _refused_pairs

    s = tmp_path / "sweep"
    gpu = {"type": "cuda", "name": "Tesla V100", "precision": "fp16", "batch_size": 256}
    write_cell(s, trial(0), 0.8, "DONE", device=gpu)
    write_cell(s, trial(0, proxy=False), 0.79, "DONE", device={**gpu, "batch_size": 192})
    write_cell(s, trial(1), 0.8, "DONE", device={**gpu, "type": "cpu", "batch_size": 128})
    write_cell(s, trial(1, proxy=False), 0.7, "DONE", device={**gpu, "type": "cpu", "batch_size": 128})
    df = table.load_results(s)
    assert set(df["device.type"]) == {"cuda", "cpu"} and set(df["device.batch_size"]) == {256, 192, 128}
    bad = stats.pair_mismatches(df)
    assert bad["cell_id"].tolist() == [cell_id(trial(0))]
    assert bad["differs"].iloc[0] == "batch size 256 vs 192"
    diffs = stats.paired_differences(df).set_index("cell_id")
    assert math.isnan(diffs.loc[cell_id(trial(0)), "diff"])  # refused: no difference computed
    assert diffs.loc[cell_id(trial(0)), "baseline_state"] == "not a pair"
    assert diffs.loc[cell_id(trial(1)), "diff"] == pytest.approx(0.1)
    assert "batch size 256 vs 192" in "\n".join(_refused_pairs(df))
    notes = "\n".join(_device_notes(df))
    assert "digits / test_resnet: cells ran on different device types (2 on cpu, 2 on cuda)" in notes
    one = tmp_path / "one"
    write_cell(one, trial(0), 0.8, "DONE", device=gpu)
    write_cell(one, trial(0, proxy=False), 0.79, "DONE", device=gpu)
    same = table.load_results(one)
    assert _device_notes(same) == [] and stats.pair_mismatches(same).empty


def test_a_bf16_cell_and_an_fp16_baseline_are_refused_and_devices_named(tmp_path):
    from proxyattention.analysis.report import (
        _device_notes,
        _devices_line,
        _refused_pairs,
    )

    s = tmp_path / "sweep"
    v100 = {"type": "cuda", "name": "Tesla V100-SXM2-32GB", "precision": "fp16", "batch_size": 128}
    a100 = {**v100, "name": "NVIDIA A100-SXM4-80GB", "precision": "bf16"}
    write_cell(s, trial(0), 0.8, "DONE", device=a100)
    write_cell(s, trial(0, proxy=False), 0.79, "DONE", device=v100)
    write_cell(s, trial(1), 0.8, "DONE", device=v100)
    write_cell(s, trial(1, proxy=False), 0.7, "DONE", device=v100)
    df = table.load_results(s)
    bad = stats.pair_mismatches(df)
    assert bad["cell_id"].tolist() == [cell_id(trial(0))]
    assert bad["differs"].iloc[0] == "precision bf16 vs fp16"
    diffs = stats.paired_differences(df).set_index("cell_id")
    assert math.isnan(diffs.loc[cell_id(trial(0)), "diff"])
    assert diffs.loc[cell_id(trial(0)), "baseline_state"] == "not a pair"
    assert diffs.loc[cell_id(trial(1)), "diff"] == pytest.approx(0.1)
    refused = "\n".join(_refused_pairs(df))
    assert f"- {cell_id(trial(0))} vs baseline {cell_id(trial(0, proxy=False))}: precision bf16 vs fp16" \
        in refused
    assert "share the split, batch size, device type, precision and epochs" in refused
    assert _devices_line(df) == ["- Devices: 3 cell(s) on Tesla V100-SXM2-32GB (cuda, fp16); "
                                 "1 cell(s) on NVIDIA A100-SXM4-80GB (cuda, bf16)."]
    notes = "\n".join(_device_notes(df))
    assert "cells ran on different devices (1 on NVIDIA A100-SXM4-80GB, 3 on Tesla V100-SXM2-32GB)" in notes


def test_results_without_a_recorded_precision_still_pair(tmp_path):
    """Results written before the device block (only ``run``) or without ``device.precision``: the
    precision comes from ``run.amp`` where recorded, else it is not compared."""
    s = tmp_path / "sweep"
    write_cell(s, trial(0), 0.8, "DONE", device={"type": "cuda", "name": "Tesla V100", "precision": "fp16",
                                                 "batch_size": 128})
    write_cell(s, trial(0, proxy=False), 0.79, "DONE")  # no device block, no run.amp
    write_cell(s, trial(1), 0.8, "DONE", device={"type": "cuda", "name": "Tesla V100", "batch_size": 128})
    amp = write_cell(s, trial(1, proxy=False), 0.7, "DONE")
    result = json.loads((amp / "result.json").read_text())
    result["run"].update(device="cuda:0", batch_size=128, amp="torch.float16")
    (amp / "result.json").write_text(json.dumps(result))
    df = table.load_results(s).set_index("cell_id")
    assert pd.isna(df.loc[cell_id(trial(0, proxy=False)), "device.precision"])
    assert df.loc[cell_id(trial(1, proxy=False)), "device.precision"] == "fp16"
    assert stats.pair_mismatches(df.reset_index()).empty
    diffs = stats.paired_differences(df.reset_index()).set_index("cell_id")
    assert diffs.loc[cell_id(trial(0)), "diff"] == pytest.approx(0.01)
    assert diffs.loc[cell_id(trial(1)), "diff"] == pytest.approx(0.1)
    fp32 = write_cell(tmp_path / "fp32", trial(0, proxy=False), 0.7, "DONE")
    result = json.loads((fp32 / "result.json").read_text())
    result["run"]["amp"] = None  # autocast off: fp32
    (fp32 / "result.json").write_text(json.dumps(result))
    assert table.load_results(tmp_path / "fp32")["device.precision"].tolist() == ["fp32"]


def test_holm_adjustment_and_paired_p_values():
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
    from scipy.stats import ttest_1samp

    x = [0.02, 0.03, -0.01, 0.04]
    expected = ttest_1samp(x, 0).pvalue
    assert stats.paired_p_value(float(np.mean(x)), float(np.std(x, ddof=1)), 4) == pytest.approx(expected)
    assert math.isnan(stats.paired_p_value(0.1, 0.0, 1))
