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
    assert set(EXPERIMENTS) == {"optimization", "density"}
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
