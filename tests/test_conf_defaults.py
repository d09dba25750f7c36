"""``conf/`` shows every default, and shows it truly.

- Each group's default option (the one ``conf/config.yaml`` selects) lists every key of the group's schema
  dataclass (``proxyattention/config.py``) at its default value, each with a comment.
- Each model file says in one regular line which layer the automatic CAM layer choice takes at the input
  sizes it names (``# Automatic CAM layer: layer4 at 224 px (7x7), layer2 at 32 px (4x4).``, ``none at
  32 px`` where no layer qualifies); the planner's model check (the automatic choice on the ``meta``
  device, as a trial makes it) must agree.
- The default options change no value: a config composed with them equals one composed without them,
  and so do the cell ids.
"""

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from proxyattention.config import GROUP_SCHEMAS, TrialConfig, register_configs, to_trial_config
from proxyattention.identity import cell_id
from proxyattention.modelcheck import check

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
MODEL_FILES = sorted((CONF / "model").glob("*.yaml"))
register_configs()

LAYER_LINE = re.compile(r"^# Automatic CAM layer: (?P<claims>.+)$", re.M)
CLAIM = re.compile(r"(?P<layer>[A-Za-z_][\w.]*\w) at (?P<px>\d+) px(?: \((?P<h>\d+)x(?P<w>\d+)\))?")
CLAIM_SEPARATORS = re.compile(r"^[\s,.;]*$")
AUTOMATIC_WORD = re.compile(r"\bautomatic\b", re.I)


def default_options() -> dict[str, str]:
    """group -> the option ``conf/config.yaml``'s defaults list selects."""
    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not key.startswith("override ") and "/" not in key:
                    out[key] = value
    return out


def compose_all(override_lists):
    """Compose many configs under one Hydra initialisation."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [compose(config_name="config", overrides=list(o)) for o in override_lists]


def plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


# ---------------------------------------------------------------------------------------------------
# (a) the default option of each group lists its schema in full


def test_every_schema_group_has_a_default_option():
    options = default_options()
    missing = sorted(set(GROUP_SCHEMAS) - set(options))
    assert not missing, f"conf/config.yaml selects no option of the group(s) {missing}"
    for group, option in options.items():
        assert (CONF / group / f"{option}.yaml").is_file(), f"conf/{group}/{option}.yaml is missing"


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_default_option_lists_every_key_at_its_schema_default(group):
    option = default_options().get(group)
    assert option, f"conf/config.yaml selects no {group} option"
    path = CONF / group / f"{option}.yaml"
    listed = plain(OmegaConf.load(path))
    assert listed.pop("defaults", None) == ["schema", "_self_"], f"{path}: its defaults list is not [schema, _self_]"
    schema = plain(OmegaConf.structured(GROUP_SCHEMAS[group]))
    assert set(listed) == set(schema), (f"{path} lists {sorted(listed)}; the schema has {sorted(schema)}: "
                                        f"missing {sorted(set(schema) - set(listed))}, "
                                        f"unknown {sorted(set(listed) - set(schema))}")
    for key, default in schema.items():  # interpolations stay strings on both sides
        assert (type(listed[key]), listed[key]) == (type(default), default), (
            f"{path}: {key}: {listed[key]!r} ({type(listed[key]).__name__}), but the schema's default is "
            f"{default!r} ({type(default).__name__})")


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_key_of_a_default_option_has_a_comment(group):
    path = CONF / group / f"{default_options()[group]}.yaml"
    lines = path.read_text().splitlines()
    keys = {f.name for f in dataclasses.fields(GROUP_SCHEMAS[group])}
    bare = []
    for i, line in enumerate(lines):
        m = re.match(r"([A-Za-z_]\w*):", line)
        if m and m[1] in keys and " #" not in line and not (i and lines[i - 1].startswith("#")):
            bare.append(m[1])
    assert not bare, f"{path}: keys without a comment (on their line or just above): {bare}"


# ---------------------------------------------------------------------------------------------------
# (b) what the model files say about the automatic CAM layer is what the code chooses


def layer_claims(path: Path) -> list[tuple[str, int, tuple[int, int] | None]]:
    """``(layer or "none", px, (h, w) or None)`` of the file's ``# Automatic CAM layer:`` line."""
    text = path.read_text()
    lines = LAYER_LINE.findall(text)
    assert len(lines) == 1, f"{path}: {len(lines)} '# Automatic CAM layer:' lines; want exactly one"
    stray = [c for c in text.splitlines() if c.startswith("#") and AUTOMATIC_WORD.search(c)
             and not LAYER_LINE.match(c)]
    assert not stray, f"{path}: say what the automatic layer is on the '# Automatic CAM layer:' line only: {stray}"
    claims = list(CLAIM.finditer(lines[0]))
    assert claims and CLAIM_SEPARATORS.match(CLAIM.sub("", lines[0])), (
        f"{path}: cannot read {lines[0]!r}; write 'LAYER at N px (HxW)' or 'none at N px', comma-separated")
    return [(m["layer"], int(m["px"]), (int(m["h"]), int(m["w"])) if m["h"] else None) for m in claims]


@pytest.mark.parametrize("path", MODEL_FILES, ids=[p.stem for p in MODEL_FILES])
def test_model_comment_names_the_automatic_layer_the_code_chooses(path):
    name = OmegaConf.load(path).name
    for layer, px, hw in layer_claims(path):
        got = check({"name": name, "target_layer": None, "image_size": px})
        if layer == "none":
            assert got["error"] and "no layer with a map of at least" in got["error"], (
                f"{path}: says no layer qualifies at {px} px, but the code chooses {got}")
            continue
        assert got["error"] is None, f"{path}: says {layer} at {px} px, but: {got['error']}"
        assert got["layer"] == layer, f"{path}: says {layer} at {px} px; the code chooses {got['layer']}"
        if hw is not None:
            assert tuple(got["map"]) == hw, f"{path}: says {layer} is {hw[0]}x{hw[1]} at {px} px; it is {got['map']}"


# ---------------------------------------------------------------------------------------------------
# (c) the default options change no value


# A plain trial and a saved sweep's (which sets keys of two groups in the global package).
BASES = ([], ["+sweep=thesis_thresholds"])


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, ...], dict]:
    """The plain config of each base, and of each base without each group's default option (``~group``
    drops it from the defaults list; the schema's node stays), composed under one Hydra initialisation."""
    lists = [tuple(b) for b in BASES]
    lists += [(*b, f"~{g}") for g in sorted(GROUP_SCHEMAS) for b in BASES]
    return {o: plain(cfg) for o, cfg in zip(lists, compose_all(lists))}


def test_composed_defaults_are_the_schema_defaults(composed):
    schema = plain(OmegaConf.structured(TrialConfig))
    for group in GROUP_SCHEMAS:
        differ = {k: (v, schema[group][k]) for k, v in composed[()][group].items() if v != schema[group][k]}
        assert not differ, f"the composed {group} group differs from its schema (composed, schema): {differ}"


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_a_default_option_changes_no_value_and_no_cell_id(group, composed):
    without = {o[:-1]: cfg for o, cfg in composed.items() if o and o[-1] == f"~{group}"}
    for base, cfg in without.items():
        assert cfg == composed[base], f"{group}'s default option changes the config composed from {list(base)}"
        assert cell_id(to_trial_config(cfg)) == cell_id(to_trial_config(composed[base]))
