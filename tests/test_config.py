"""Config composition and rejection: every bad value names its key before any data is loaded."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from proxyattention.config import ConfigError, register_configs, to_trial_config
from proxyattention.identity import baseline_of, canonical, cell_id

CONF = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def make(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_composes_and_validates():
    cfg = to_trial_config(make())
    assert cfg.dataset.name == "digits" and cfg.model.name == "resnet18"
    assert cfg.method.name == "gradcampp" and cfg.proxy.enabled


def test_issue_example_overrides():
    cfg = to_trial_config(make("model=efficientnet_b0", "method=eigengradcam", "proxy.threshold=0.4",
                               "proxy.weight=0.8", "proxy.subset=0.2", "proxy.schedule='20,p,19'",
                               "proxy.mode=mean", "proxy.clear_every_step=false", "train.seed=3"))
    assert cfg.model.name == "efficientnet_b0" and cfg.model.batch_size == 64
    assert cfg.proxy.schedule == "20,p,19" and cfg.train.seed == 3 and not cfg.proxy.clear_every_step


def test_misspelt_key_is_rejected():
    with pytest.raises(ConfigCompositionException) as e:
        make("proxy.treshold=0.4")
    assert "treshold" in str(e.value)


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigCompositionException) as e:
        make("model=resnet19")
    assert "resnet19" in str(e.value) and "resnet18" in str(e.value)


@pytest.mark.parametrize("override,key,allowed", [
    ("proxy.threshold=1.5", "proxy.threshold", "[0.0, 1.0]"),
    ("proxy.threshold=-0.1", "proxy.threshold", "[0.0, 1.0]"),
    ("proxy.weight=2", "proxy.weight", "[0.0, 1.0]"),
    ("proxy.subset=0", "proxy.subset", "(0.0, 1.0]"),
    ("proxy.subset=1.01", "proxy.subset", "(0.0, 1.0]"),
    ("proxy.mode=grey", "proxy.mode", "blend, mean, max, min, black, white"),
    ("proxy.target=other", "proxy.target", "mistake, predicted, true"),
    ("proxy.schedule='5,q,3'", "proxy.schedule", "'p'"),
    ("proxy.schedule='p,p'", "proxy.schedule", "'p'"),
    ("proxy.schedule=''", "proxy.schedule", "empty"),
    ("proxy.schedule='3,p,-2'", "proxy.schedule", "> 0"),
    ("train.batch_size=big", "train.batch_size", "auto"),
    ("method.name=nocam", "method.name", "gradcampp"),
])
def test_out_of_range_values_name_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        to_trial_config(make(override))
    assert key in str(e.value) and allowed in str(e.value)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException) as e:
        make("proxy.threshold=high")
    assert "threshold" in str(e.value)


def test_snapshot_with_unknown_key_is_rejected():
    with pytest.raises(ConfigKeyError):
        to_trial_config({"proxy": {"treshold": 0.3}})


def test_cell_id_is_stable_and_ignores_volatile_keys():
    a = cell_id(make("proxy.threshold=0.1"))
    assert a == cell_id(make("proxy.threshold=0.1", "train.device=cpu", "dataset.num_workers=7"))
    assert a != cell_id(make("proxy.threshold=0.4"))
    assert len(a) == 12


def test_spellings_the_trial_treats_alike_are_one_cell():
    ids = {cell_id(make(f"proxy.schedule='{s}'")) for s in ("1,p,1", "1,P,1", " 1,p,1", "1, p ,1")}
    assert len(ids) == 1
    assert cell_id(make("proxy.schedule='1,p,1'")) != cell_id(make("proxy.schedule='1,p,2'"))
    speed = make("dataset.in_memory=no", "dataset.max_memory_mb=64", "train.channels_last=true")
    assert cell_id(speed) == cell_id(make())  # where images live and their layout change no result


def test_explain_and_proxy_targets_are_checked_and_true_is_a_word():
    cfg = to_trial_config(make("explain.target=true", "proxy.target=true", "explain.fill=mean"))
    assert cfg.explain.target == "true" and cfg.proxy.target == "true" and cfg.explain.fill == "mean"
    assert to_trial_config(make()).proxy.target == "mistake"
    for bad, key in (("explain.target=label", "explain.target"), ("explain.fill=grey", "explain.fill"),
                     ("proxy.target=wrong", "proxy.target")):
        with pytest.raises(ConfigError, match=key):
            to_trial_config(make(bad))


def test_a_retired_key_in_an_old_snapshot_is_dropped_and_keeps_its_id(caplog):
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(to_trial_config(make("proxy=none")))
    old["train"]["lr"] = 0.001  # what snapshots written before train.lr left the schema hold
    cfg = to_trial_config(old)
    assert "lr" not in cfg.train and "ignoring train.lr" in caplog.text
    assert cell_id(cfg) == cell_id(make("proxy=none"))


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"), ("train.seed=99999999999999999999", "train.seed"),
    ("train.eval_batch_size=0", "train.eval_batch_size"), ("method.batch_size=0", "method.batch_size"),
    ("dataset.num_workers=-1", "dataset.num_workers"), ("train.weight_decay=-0.1", "train.weight_decay"),
])
def test_values_a_trial_would_refuse_are_refused_when_composed(override, key):
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        to_trial_config(make(override))


def test_val_max_enters_an_id_only_when_set():
    assert cell_id(make("dataset.val_max=null")) == cell_id(make())
    assert cell_id(make("dataset.val_max=100")) != cell_id(make())


def test_baselines_of_different_proxy_settings_are_one_cell():
    b1 = baseline_of(make("proxy.threshold=0.1", "method=eigengradcam"))
    b2 = baseline_of(make("proxy.threshold=0.85", "proxy.mode=black"))
    explicit = make("proxy=none")
    assert cell_id(b1) == cell_id(b2) == cell_id(explicit)
    assert canonical(b1)["proxy"]["schedule"] == "4"
    assert cell_id(b1) != cell_id(make("proxy=none", "train.seed=1"))


def test_train_deterministic_is_a_checked_boolean_off_by_default():
    assert to_trial_config(make()).train.deterministic is False
    assert to_trial_config(make("train.deterministic=true")).train.deterministic is True
    with pytest.raises(ConfigCompositionException) as e:
        make("train.deterministic=sometimes")
    assert "deterministic" in str(e.value)


def test_train_deterministic_enters_an_id_only_when_on():
    """Cells run before the key existed keep their ids; a deterministic cell (and its baseline) is another."""
    from omegaconf import OmegaConf

    before = OmegaConf.to_container(to_trial_config(make("proxy.schedule='1,p,1'")))
    del before["train"]["deterministic"]  # a snapshot written before the key
    off = make("proxy.schedule='1,p,1'", "train.deterministic=false")
    on = make("proxy.schedule='1,p,1'", "train.deterministic=true")
    assert cell_id(off) == cell_id(before) == cell_id(make("proxy.schedule='1,p,1'"))
    assert cell_id(on) != cell_id(off)
    assert cell_id(baseline_of(on)) != cell_id(baseline_of(off)) == cell_id(baseline_of(before))
    assert canonical(baseline_of(on))["train"]["deterministic"] is True  # the pair runs alike
