"""The README and docs/ stay true to the code.

Each check reads the pages as a newcomer would and compares what they state with what the code does: the
links resolve, every override they write names a real key, the config groups and their keys are the
ones in ``conf/``, the environment variables' defaults are the ones the configs read, the model table's
CAM layers are the ones the automatic choice picks, and the thesis-sweep table's counts are the planner's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CONF = REPO / "conf"
SWEEPS = REPO / "sweeps" / "sweep"
THESIS_SWEEPS = sorted(p.stem for p in SWEEPS.glob("thesis_*.yaml"))
TRIAL_GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())}
WORDS = {n: w for w, n in NUMBER_WORDS.items()}

FENCE = re.compile(r"^[ \t]*```([\w-]*)\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
DASHES = str.maketrans({"–": "-", "—": "-"})


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def fenced(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def code_snippets(text: str) -> list[str]:
    """What a reader would type: shell and text code blocks, and inline code spans outside blocks."""
    blocks = [body for lang, body in fenced(text) if lang in ("", "bash", "text", "sh")]
    return blocks + INLINE.findall(prose(text))


def section(text: str, heading: str) -> str:
    """The body of the section whose heading line is ``heading``, up to the next heading of its level or
    above (headings inside code blocks do not count)."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines()
    start = lines.index(heading) + 1
    body, in_fence = [], False
    for line in lines[start:]:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,%d} " % level, line):
            break
        body.append(line)
    return "\n".join(body)


def table(text: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule left out) of the first Markdown table in ``text``."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows[1:]


def ticked(cell: str) -> list[str]:
    return INLINE.findall(cell)


def unparenthesised(cell: str) -> str:
    """``cell`` without its parenthesised remarks (where the keys column names values, not keys)."""
    while True:
        shorter = re.sub(r"\([^()]*\)", "", cell)
        if shorter == cell:
            return cell
        cell = shorter


def listed(cell: str) -> set[str]:
    return {x.strip() for x in cell.split(",") if x.strip()}


@pytest.fixture(scope="module")
def composed(composer_fn):
    return composer_fn([])


# ---------------------------------------------------------------------------------------------------
# The front door


def test_the_readme_is_a_front_door_of_under_200_lines():
    n = len(README.read_text().splitlines())
    assert n < 200, f"README.md has {n} lines: move detail into docs/ and link it"


def test_the_readme_links_every_docs_page():
    links = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]+)?\)", README.read_text()))
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages and pages <= links, f"docs pages the README does not link: {sorted(pages - links)}"


# ---------------------------------------------------------------------------------------------------
# Links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    bad = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{rel(page)}: " + "; ".join(bad)


# ---------------------------------------------------------------------------------------------------
# Config keys and options the pages write


OVERRIDE = re.compile(r"(?<![\w./$-])(\+?)([a-z_]+(?:\.[A-Za-z_][\w-]*)+)=")
CHOICE = re.compile(r"(?<![\w./-])(\+?)(dataset|model|method|proxy|train|explain|sweep|hydra/launcher|hydra/sweeper)"
                    r"=([\w,]+)")
# Names that are not options of this repository, each deliberately allowed.
NOT_OURS = {
    ("sweep", "NAME"): "a placeholder for a saved sweep's name",
    ("sweep", "mine"): "the reader's own saved sweep, defined in docs/package.md",
    ("dataset", "mine"): "the reader's own dataset, defined in docs/package.md",
    ("hydra/sweeper", "optuna"): "the project's Optuna sweeper, registered in code (launcher/optuna_sweeper.py)",
    ("hydra/launcher", "basic"): "Hydra's own launcher",
}


# Keys written as forms, not as settings, each deliberately allowed (and any key whose last part is in
# capitals, such as `report.KEY=VALUE`).
NOT_KEYS = {"group.key": "the form of an override, `group.key=value`"}


def launcher_keys() -> set[str]:
    from launcher.plugin import LocalLauncherConf
    from launcher.slurm import SlurmLauncherConf

    return {f.name for cls in (LocalLauncherConf, SlurmLauncherConf) for f in dataclasses.fields(cls)}


def report_keys() -> set[str]:
    from proxyattention.analysis.report import ReportConfig

    return {f.name for f in dataclasses.fields(ReportConfig)}


def unknown_keys(snippets: list[str], composed) -> list[str]:
    """Every ``group.key=`` override in ``snippets`` whose key does not exist (``+`` keys and hydra's own
    keys other than ``hydra.launcher.*`` are Hydra's to check)."""
    missing, sentinel = [], object()
    launcher, report = launcher_keys(), report_keys()
    for snippet in snippets:
        for plus, key in OVERRIDE.findall(snippet):
            group, name = key.split(".", 1)
            if plus or key in NOT_KEYS or key.rsplit(".", 1)[-1].isupper():
                continue
            if group == "hydra":
                if name.startswith("launcher.") and name.split(".")[1] not in launcher:
                    missing.append(key)
            elif group == "report":
                if name not in report:
                    missing.append(key)
            elif group not in TRIAL_GROUPS or OmegaConf.select(composed, key, default=sentinel) is sentinel:
                missing.append(key)
    return missing


def unknown_options(snippets: list[str]) -> list[str]:
    missing = []
    for snippet in snippets:
        for _, group, values in CHOICE.findall(snippet):
            folder = SWEEPS if group == "sweep" else CONF / group
            for value in values.split(","):
                if value and (group, value) not in NOT_OURS and not (folder / f"{value}.yaml").is_file():
                    missing.append(f"{group}={value}")
    return missing


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_override_the_pages_write_names_a_real_key(page, composed):
    missing = unknown_keys(code_snippets(page.read_text()), composed)
    assert not missing, f"{rel(page)} writes overrides of keys the config does not have: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_option_the_pages_choose_exists(page):
    missing = unknown_options(code_snippets(page.read_text()))
    assert not missing, f"{rel(page)} chooses options with no config file: {sorted(set(missing))}"


def test_the_key_check_catches_a_misspelt_key(composed):
    assert unknown_keys(["python -m launcher proxy.treshold=0.4 report.mapz=0 hydra.launcher.acount=X"],
                        composed) == ["proxy.treshold", "report.mapz", "hydra.launcher.acount"]
    assert unknown_keys(["proxy.threshold=0.4 report.maps=0 hydra.launcher.account=X hydra.sweep.dir=D"],
                        composed) == []
    assert unknown_options(["model=resnet18,resnet19 +sweep=thesis_thresholds"]) == ["model=resnet19"]


# ---------------------------------------------------------------------------------------------------
# Config groups


def test_the_config_groups_the_docs_name_are_conf_s(composed):
    text = (DOCS / "trials.md").read_text()
    word = re.search(r"Hydra composes (\w+) config groups", text).group(1)
    assert NUMBER_WORDS[word] == len(TRIAL_GROUPS), f"docs/trials.md says {word} groups; conf/ has {TRIAL_GROUPS}"
    rows = table(section(text, "## Configuration"))
    named = [ticked(r[0])[0].rstrip("=") for r in rows]
    assert sorted(named) == TRIAL_GROUPS
    for row in rows:
        group = ticked(row[0])[0].rstrip("=")
        options = {t for t in ticked(row[1]) if re.fullmatch(r"[a-z0-9_]+", t)}
        files = {p.stem for p in (CONF / group).glob("*.yaml")}
        assert options <= files, f"{group}: options without a file: {sorted(options - files)}"
        assert files <= options, f"{group}: options the table leaves out: {sorted(files - options)}"
        keys = {t.split("=")[0] for t in ticked(unparenthesised(row[2]))}
        schema = set(composed[group].keys())
        assert keys <= schema, f"{group}: keys the schema does not have: {sorted(keys - schema)}"
        assert schema <= keys, f"{group}: keys the table leaves out: {sorted(schema - keys)}"


def test_the_layout_lists_conf_s_folders():
    layout = next(body for lang, body in fenced((DOCS / "development.md").read_text()) if "conf/" in body)
    line = next(ln for ln in layout.splitlines() if ln.startswith("conf/"))
    folders = {t.strip(",").rstrip("/") for t in line.split("groups:", 1)[1].split() if t.strip(",").endswith("/")}
    expected = set(TRIAL_GROUPS) | {f"hydra/{p.name}" for p in (CONF / "hydra").iterdir() if p.is_dir()}
    assert folders == expected


# ---------------------------------------------------------------------------------------------------
# Defaults of the environment variables


def env_default(expr: str, name: str) -> str:
    """The fallback of ``${oc.env:NAME,FALLBACK}`` as a reader writes it (``${oc.env:HOME,.}`` is ``~``)."""
    m = re.search(r"\$\{oc\.env:" + name + r",(.*)\}", expr)
    assert m, f"{name} is not read by {expr!r}"
    fallback = m.group(1).replace("${oc.env:HOME,.}", "~")
    return fallback.split("}")[0] if "}" in fallback else fallback


def expected_env_defaults() -> dict[str, str]:
    from proxyattention.config import DatasetConfig

    data_root = yaml.safe_load((CONF / "dataset" / "stanford_dogs.yaml").read_text())["root"]
    store = yaml.safe_load((CONF / "hydra" / "launcher" / "local.yaml").read_text())["store"]
    return {
        "PROXYATTENTION_CACHE": env_default(DatasetConfig.cache_dir, "PROXYATTENTION_CACHE"),
        "PROXYATTENTION_DATA": env_default(data_root, "PROXYATTENTION_DATA"),
        "PROXYATTENTION_STORE": env_default(store, "PROXYATTENTION_STORE"),
    }


def stated_defaults(text: str, name: str) -> list[tuple[str, str]]:
    """``(suffix, default)`` of each "`$NAME<suffix>` (default `X`)" or "`$NAME`, default `X`" in ``text``."""
    return re.findall(r"`\$" + name + r"([^`]*)`,? \(?default `([^`]+)`", text)


def test_the_env_defaults_the_pages_state_are_the_configs():
    expected = expected_env_defaults()
    assert expected["PROXYATTENTION_CACHE"] == "~/.cache/proxyattention"
    stated = {name: [] for name in expected}
    for page in PAGES:
        for name, default in expected.items():
            for suffix, said in stated_defaults(page.read_text(), name):
                stated[name].append(said)
                assert said == default + suffix, f"{rel(page)}: ${name}{suffix} defaults to {default + suffix}, not {said}"
    assert stated["PROXYATTENTION_CACHE"] and stated["PROXYATTENTION_DATA"]
    assert stated_defaults("`$PROXYATTENTION_CACHE` (default `~/.cache/proxyattention/splits`)",
                           "PROXYATTENTION_CACHE") == [("", "~/.cache/proxyattention/splits")]


# ---------------------------------------------------------------------------------------------------
# Statements that once disagreed with the code


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_cuda_module_beside_wheels_that_bundle_cuda(page):
    assert not re.search(r"module load cuda", page.read_text(), re.I)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_an_install_from_git_says_what_url_to_substitute(page):
    text = page.read_text()
    for m in re.finditer(r"git\+([^\"'\s`]+)", text):
        assert re.fullmatch(r"<[^>]+>|[A-Z_]+", m.group(1)), f"{rel(page)}: git+{m.group(1)} is not a placeholder"
        assert re.search(r"substitute", text[m.end():m.end() + 600], re.I), \
            f"{rel(page)}: git+{m.group(1)} without saying what to substitute"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_a_range_of_thesis_tables_lists_as_many_tables(page):
    for first, last, items in re.findall(r"Tables 8\.(\d)[–-]8\.(\d) \(([^)]*)\)", page.read_text()):
        n = len([i for i in items.split(";") if i.strip()])
        assert n == int(last) - int(first) + 1, f"{rel(page)}: Tables 8.{first}–8.{last} lists {n} items: {items}"


def sweep_header(name: str) -> str:
    """What a saved sweep's first comment line says it reproduces, dashes plain."""
    first = next(ln for ln in (SWEEPS / f"{name}.yaml").read_text().splitlines() if ln.startswith("# ") and "@package" not in ln)
    return first.translate(DASHES)


def test_the_report_sections_map_to_the_thesis_tables_the_sweeps_name():
    from proxyattention.analysis.report import HYPERPARAMETERS

    source = (REPO / "proxyattention" / "analysis" / "report.py").read_text()
    rows = table(section((DOCS / "report.md").read_text(), "## The tables"))
    sections = {f"By {p.split('.')[-1]}" for p in ("proxy.schedule", *HYPERPARAMETERS)}
    assert {r[0] for r in rows} - sections == {"Test accuracy by dataset and model"}
    assert "## Test accuracy by dataset and model" in source
    for heading, thesis, sweep in rows:
        assert thesis.translate(DASHES) in sweep_header(ticked(sweep)[0]), (heading, thesis, sweep)
    assert sorted(r[1] for r in rows if r[1].startswith("Table")) == ["Table 8.1", "Table 8.2", "Table 8.3", "Table 8.4"]


# ---------------------------------------------------------------------------------------------------
# Models


def model_rows() -> list[list[str]]:
    return table(section((DOCS / "datasets.md").read_text(), "## Model configs"))


def sweep_params(name: str) -> dict:
    return yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]


def test_the_model_table_states_each_configs_batch_size_and_thesis_sweeps(composer_fn):
    in_sweeps = {m for s in THESIS_SWEEPS for m in listed(str(sweep_params(s)["model"]))}
    rows = model_rows()
    assert rows
    for row in rows:
        model = ticked(row[0])[0]
        cfg = composer_fn([f"model={model}"])
        assert int(row[1]) == cfg.model.batch_size, model
        assert row[6] == ("yes" if model in in_sweeps else "no"), f"{model}: in a thesis sweep? {row[6]}"


@pytest.mark.parametrize("row", model_rows(), ids=lambda r: r[0].strip("`"))
def test_the_model_table_states_the_automatic_cam_layer(row, composer_fn):
    """What the trial's own choice (proxyattention.models.find_target_layer, on the meta device) picks."""
    from proxyattention.modelcheck import check

    name = composer_fn([f"model={ticked(row[0])[0]}"]).model.name
    for size, cell in ((224, row[3]), (32, row[4])):
        got = check({"name": name, "image_size": size})
        if cell.startswith("refused"):
            assert got["error"], f"{name} at {size} px: {got}"
            continue
        assert not got["error"], f"{name} at {size} px: {got['error']}; docs say {cell}"
        h, w = got["map"]
        assert ticked(cell)[0] == got["layer"], f"{name} at {size} px: the automatic layer is {got['layer']}, docs say {cell}"
        assert f"({h}×{w}" in cell, f"{name} at {size} px: a {h}x{w} map, docs say {cell}"


# ---------------------------------------------------------------------------------------------------
# The thesis sweeps: counts from the planner


def planned(argv: list[str]) -> dict[str, dict]:
    """The cells ``python -m launcher ARGV`` would plan, by id (no data needed: the planner's composing and
    naming, without the data checks), each with its resolved config."""
    from proxyattention.sweep.models import sweep_jobs
    from proxyattention.sweep.plan import Composer

    from proxyattention import identity

    jobs, compose = sweep_jobs(argv)
    composer = Composer(compose)
    cells = {}
    for job in jobs:
        config, cid, base, bid = identity.planned(composer.trial(job))
        cells[cid] = config
        if base is not None:
            cells[bid] = base
    return cells


def epochs(config: dict) -> int:
    from proxyattention.schedule import parse_schedule

    return parse_schedule(config["proxy"]["schedule"], p_trains=config["proxy"].get("p_trains", False)).epochs


def summary(cells: dict[str, dict]) -> dict:
    proxy = sum(1 for c in cells.values() if c["proxy"]["enabled"])
    return {
        "datasets": {c["dataset"]["name"] for c in cells.values()},
        "models": {c["model"]["name"] for c in cells.values()},
        "cells": f"{len(cells)} ({proxy} + {len(cells) - proxy})",
        "epochs per cell": sorted({epochs(c) for c in cells.values()}),
        "epochs in all": sum(epochs(c) for c in cells.values()),
    }


def thesis_table() -> dict[str, list[str]]:
    rows = table(section(README.read_text(), "### The thesis sweeps"))
    return {r[0].strip("`"): r for r in rows}


def test_the_thesis_table_has_a_row_per_thesis_sweep_naming_what_it_reproduces():
    rows = thesis_table()
    assert set(rows) == set(THESIS_SWEEPS) | {"all five"} and len(THESIS_SWEEPS) == 5
    for name in THESIS_SWEEPS:
        assert rows[name][1].translate(DASHES) in sweep_header(name), (name, rows[name][1])


@pytest.mark.slow
def test_the_thesis_table_counts_are_the_planners():
    rows = thesis_table()
    union: dict[str, dict] = {}
    for name in THESIS_SWEEPS:
        cells = planned([f"+sweep={name}"])
        union.update(cells)
        s, row = summary(cells), rows[name]
        assert listed(row[2]) == s["datasets"], name
        assert listed(row[3]) == s["models"], name
        assert row[4] == s["cells"], name
        assert [int(row[5])] == s["epochs per cell"], name
        assert int(row[6].replace(",", "")) == s["epochs in all"], name
    s, row = summary(union), rows["all five"]
    assert row[4] == f"{s['cells']} distinct"
    assert [int(row[5])] == s["epochs per cell"]
    assert int(row[6].replace(",", "")) == s["epochs in all"]
    assert f"all {WORDS[len(s['datasets'])]} above" == row[2] and f"all {WORDS[len(s['models'])]} above" == row[3]


# ---------------------------------------------------------------------------------------------------
# The README's commands parse


def readme_commands() -> list[str]:
    """The ``python -m`` commands of the README's code blocks and of its cluster checklist's inline code."""
    text = README.read_text()
    checklist = section(text, "## GPU clusters: from an empty login node to a report")
    snippets = [body for lang, body in fenced(text) if lang == "bash"] + INLINE.findall(prose(checklist))
    out = []
    for snippet in snippets:
        for line in snippet.replace("\\\n", " ").splitlines():
            line = line.strip().split("  #", 1)[0].strip()
            line = line.rsplit("&& ", 1)[-1]
            if line.startswith("python -m ") and not line.startswith("python -m pytest"):
                out.append(re.sub(r"<[^>]+>", "x", line))
    return out


def test_the_readme_commands_are_found():
    cmds = readme_commands()
    for needle in ("launcher -m model=", "proxyattention.data prepare", "proxyattention.data verify",
                   "proxyattention.data weights", "hydra.launcher.dry_run=true", "launcher.status",
                   "proxyattention.report", "proxyattention.train"):
        assert any(needle in c for c in cmds), needle


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, tmp_path):
    """A sweep given on the command line is planned by a dry run (it writes nothing); other Hydra commands
    compose their overrides (``--help``, which cannot expand a sweep); the data commands parse theirs;
    ``weights --check`` expands the sweep without downloading (exit 1: weights not cached, 2: a bad sweep)."""
    args = shlex.split(command)[2:]
    module, rest = args[0], args[1:]
    env = {**os.environ, "PROXYATTENTION_STORE": str(tmp_path / "store")}
    if module == "proxyattention.report":
        from proxyattention.analysis.report import parse_overrides

        parse_overrides(rest[1:])
        rest = ["--help"]
    elif module == "proxyattention.data" and rest[0] == "weights":
        rest = ["weights", "--check", *rest[1:]]
    elif module == "launcher" and any("," in a for a in rest):
        rest = [*rest, "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        rest = [*rest, "--help"]
    proc = subprocess.run([sys.executable, "-m", module, *rest], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    ok = (0, 1) if "--check" in rest else (0,)
    assert proc.returncode in ok, f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
