"""The ``covariant`` parser, the entry point, and the summary table of ``reproduce``."""

from __future__ import annotations

import pytest

from covariant import __version__
from covariant.cli import build_parser, main
from covariant.cli.reproduce import EXPERIMENTS, print_summary


def test_parser_subcommands_and_defaults():
    parser = build_parser()
    args = parser.parse_args(["reproduce", "optimization", "--quick", "--seed", "3"])
    assert (args.command, args.experiment, args.quick, args.seed) == (
        "reproduce", "optimization", True, 3)
    assert set(EXPERIMENTS) == {"optimization", "density", "generalization"}
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "nothing"])


def test_version(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_print_summary_table(tmp_path, capsys):
    result = {"summary": {"a": {"b": 0.123456, "ok": True}, "xs": list(range(10))},
              "figures": ["f.png"]}
    print_summary("demo", result, tmp_path)
    out = capsys.readouterr().out
    assert "a.b" in out and "0.1235" in out and "True" in out
    assert "[0, 1, 2, 3, 4, 5, 6, 7, …]" in out
    assert out.strip().endswith(f"results in {tmp_path}/: f.png")


# --------------------------------------------------------------------------------------------
# issue 10: reproduce --json is parseable, --out that is a file, help texts
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_experiment(monkeypatch):
    """``covariant reproduce optimization`` backed by an instant fake experiment."""
    import sys
    import types

    module = types.ModuleType("covariant_fake_experiment")
    calls = []

    def run(out, *, quick, seed, progress):
        calls.append((out, quick, seed))
        return {"summary": {"loss": 0.5, "ok": True}, "figures": ["a.png"]}

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(EXPERIMENTS, "optimization", module.__name__)
    return calls


def test_reproduce_json_alone_on_stdout(fake_experiment, tmp_path, capsys):
    import json

    assert main(["reproduce", "optimization", "--out", str(tmp_path), "--json",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"] == {"loss": 0.5, "ok": True}
    assert "covariant reproduce optimization: summary" in captured.err
    assert "loss" in captured.err and "results in" in captured.err


def test_reproduce_without_json_prints_the_table_on_stdout(fake_experiment, tmp_path, capsys):
    assert main(["reproduce", "optimization", "--out", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "covariant reproduce optimization: summary" in captured.out and not captured.err


@pytest.mark.parametrize("command", [["demo"], ["reproduce", "optimization"]])
def test_out_that_is_a_file_is_refused_before_running(fake_experiment, tmp_path, capsys,
                                                      monkeypatch, command):
    import importlib

    cli_demo = importlib.import_module("covariant.cli.demo")  # main imports it when it runs
    monkeypatch.setattr(cli_demo, "run_demo", lambda *a, **k: pytest.fail("demo ran"))
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert main([*command, "--out", str(existing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"covariant {command[0]}: error: --out" in err and "not a directory" in err
    assert fake_experiment == []


@pytest.mark.parametrize(("command", "phrase"), [
    ("demo", "the naive Hessian trace changes with the chart"),
    ("reproduce", "Run one experiment of the paper"),
])
def test_subcommands_have_a_description(capsys, monkeypatch, command, phrase):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert phrase in " ".join(capsys.readouterr().out.split())


def _readme_checkpoint_block():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "save_checkpoint" in b]
    assert len(blocks) == 1, "README shows how to write the checkpoint of covariant flatness"
    return readme, blocks[0]


def test_readme_checkpoint_lines_make_a_file_that_flatness_reads(tmp_path, monkeypatch, capsys):
    """The README's lines run as written (training shortened to one epoch), and the file they
    write is what `covariant flatness` reads; a bare state dict loads with --arch too."""
    import json

    import torch

    from covariant.zoo import training

    readme, code = _readme_checkpoint_block()
    assert "covariant flatness model.pt --dataset mnist1d" in readme
    real = training.train_classifier
    monkeypatch.setattr(training, "train_classifier",
                        lambda *a, **k: real(*a, **{**k, "epochs": 1}))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md[checkpoint]", "exec"), namespace)
    fast = ["--dataset", "mnist1d", "--quick", "--measures", "trace", "--num-probes", "2",
            "--no-progress", "--json"]
    assert main(["flatness", "model.pt", *fast]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "mlp" and result["dim"] == 2698 and result["samples"] == 64
    torch.save(namespace["model"].state_dict(), "sd.pt")
    assert main(["flatness", "sd.pt", "--arch", "mlp", "--arch-kwargs", "hidden=32,32",
                 *fast]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 2698


def test_gitignore_ignores_demo_output():
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert "demo-out/" in lines


# --------------------------------------------------------------------------------------------
# issue 10: --help and --version import no torch (2-4 s before, ~0.1 s after)
# --------------------------------------------------------------------------------------------


def _run_python(*args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import covariant

    src = str(Path(covariant.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.mark.parametrize("argv", [
    ["--help"], ["flatness", "--help"], ["demo", "--help"], ["reproduce", "--help"],
    ["--version"],
])
@pytest.mark.parametrize("entry", ["covariant", "covariant.cli"])
def test_help_and_version_import_no_torch_numpy_or_scipy(entry, argv):
    """``python -X importtime -m covariant …`` lists every module the interpreter imported."""
    done = _run_python("-X", "importtime", "-m", entry, *argv)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "covariant.cli.main" in imported      # the log is read correctly
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "numpy", "scipy", "matplotlib")}
    assert heavy == set()
    assert ("usage: covariant" in done.stdout) != (argv == ["--version"])


def test_help_parsed_in_process_leaves_torch_unimported():
    done = _run_python("-c", "\n".join([
        "import sys",
        "import importlib",
        "m = importlib.import_module('covariant.cli.main')",
        "try:",
        "    m.main(['flatness', '--help'])",
        "except SystemExit as e:",
        "    assert e.code == 0",
        "assert 'torch' not in sys.modules, 'torch imported'",
        "print('ok')",
    ]))
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert text.endswith("ok")
    assert "--num-probes" in text and "euclidean, ggn, fisher, empirical_fisher" in text


# --------------------------------------------------------------------------------------------
# issue 10: --json on stdout is strict JSON (null plus a flag for -inf / NaN)
# --------------------------------------------------------------------------------------------


def _refuse(name):
    raise AssertionError(f"not strict JSON: {name}")


def _flatness_result():
    inf, nan = float("inf"), float("nan")
    measure = {"value": -inf, "stderr": nan, "converged": True}
    return {"checkpoint": "m.pt", "arch": "mlp", "arch_kwargs": {}, "dataset": "synthetic",
            "samples": 4, "dim": 3, "chart_dim": 3, "chart": "none", "metric": "ggn",
            "damping": 0.0, "method": "dense", "invariant": {"logdet": dict(measure)},
            "naive": {"logdet": dict(measure)}, "seconds": {"invariant": inf, "naive": 0.5}}


@pytest.mark.parametrize("command", ["demo", "flatness", "reproduce"])
def test_json_on_stdout_is_strict_with_nonfinite_flagged(command, monkeypatch, capsys, tmp_path):
    import importlib
    import json
    import sys
    import types

    from covariant._io import loads_json

    inf = float("inf")
    if command == "demo":
        cli_demo = importlib.import_module("covariant.cli.demo")
        monkeypatch.setattr(cli_demo, "run", lambda *a, **k: {"toy": {"trace": [1.0, -inf]}})
        argv, key = ["demo", "--json"], "/toy/trace/1"
    elif command == "flatness":
        cli_flatness = importlib.import_module("covariant.cli.flatness")
        monkeypatch.setattr(cli_flatness, "analyse", lambda *a, **k: _flatness_result())
        argv, key = ["flatness", str(tmp_path / "m.pt"), "--method", "dense", "--json"], \
            "/invariant/logdet/value"
    else:
        module = types.ModuleType("covariant_fake_inf_experiment")
        module.run = lambda out, **k: {"summary": {"evidence": [-inf, -2.0]}, "figures": []}
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(EXPERIMENTS, "density", module.__name__)
        argv, key = ["reproduce", "density", "--out", str(tmp_path), "--json"], \
            "/summary/evidence/0"
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    raw = json.loads(out, parse_constant=_refuse)      # a strict parser accepts it
    assert raw["nonfinite"][key] in ("-inf", "inf")
    back = loads_json(out)
    node = back
    for token in key.split("/")[1:]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    assert node == -inf
