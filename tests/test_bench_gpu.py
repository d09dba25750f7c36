"""``python -m bench.gpu``: its runner, and the whole check at CPU size (``--cpu``)."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def gpu_bench(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root))  # bench/ is not an installed package
    return importlib.import_module("bench.gpu")


def _run(gpu_bench, checks):
    lines: list[str] = []
    code = gpu_bench.run_checks(checks, ctx=None, out=lines.append)
    return code, lines


def test_a_crashing_check_is_one_fail_line_and_the_others_still_run(gpu_bench):
    def fine(ctx):
        return True, "all good", [("speed", 2.0, "target >= 1")]

    def crashes(ctx):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    def cuda_only(ctx):
        raise gpu_bench.Skip("CUDA only")

    code, lines = _run(gpu_bench, [("first", fine), ("second", crashes), ("third", cuda_only), ("fourth", fine)])
    assert code == 1
    checks = [line for line in lines if line.startswith("CHECK ")]
    assert [line.split()[1:3] for line in checks] == [["first", "ok"], ["second", "FAIL"], ["third", "skip"],
                                                      ["fourth", "ok"]]
    assert "RuntimeError: CUDA error: out of memory [" in checks[1] and "asynchronously" not in checks[1]
    assert "FIGURE speed 2 (target >= 1)" in lines
    assert lines[-1] == "2 ok, 1 failed, 1 skipped"


def test_a_check_that_says_not_ok_fails_and_all_ok_exits_zero(gpu_bench):
    code, lines = _run(gpu_bench, [("a", lambda ctx: (False, "ratio 0.5", []))])
    assert code == 1 and lines[0].startswith("CHECK a FAIL ratio 0.5") and lines[-1] == "0 ok, 1 failed, 0 skipped"
    code, lines = _run(gpu_bench, [("a", lambda ctx: (True, "", [])), ("b", lambda ctx: (None, "n/a", []))])
    assert code == 0 and lines[-1] == "1 ok, 0 failed, 1 skipped"


def test_only_refuses_an_unknown_check(gpu_bench, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["--cpu", "--only", "cam,nonsense"])
    assert e.value.code == 2 and "nonsense" in capsys.readouterr().err


@pytest.mark.slow
def test_every_check_passes_at_cpu_size(run_module, repo_root, tmp_path):
    proc = run_module("bench.gpu", "--cpu", cwd=repo_root, env={"PROXYATTENTION_CACHE": str(tmp_path / "cache")},
                      timeout=600)
    out = proc.stdout.splitlines()
    checks = [line for line in out if line.startswith("CHECK ")]
    failed = [line for line in checks if line.split()[2] != "ok" and line.split()[2] != "skip"]
    ok = [line for line in checks if line.split()[2] == "ok"]
    assert not failed and proc.returncode == 0, "\n".join(out) + "\n" + proc.stderr[-3000:]
    assert len(ok) >= 6, "\n".join(out)
    assert any(line.startswith("FIGURE ") for line in out)
    assert out[-2] == f"{len(ok)} ok, 0 failed, {len(checks) - len(ok)} skipped"
    assert not (tmp_path / "cache").exists()  # the check keeps to its own temporary folder
