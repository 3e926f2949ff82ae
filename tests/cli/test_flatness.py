"""`covariant flatness`: invariant across charts, helpful errors, dense numbers by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from covariant.cli import main
from covariant.zoo.architectures import build
from covariant.zoo.checkpoints import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build("mlp", 40, 10, hidden=(3,))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    return path


def _run(args, tmp_path, name):
    out = tmp_path / name
    assert main(["flatness", *args, "--out", str(out), "--json", "--no-progress"]) == 0
    return json.loads((out / "flatness.json").read_text())


def test_flatness_cli_invariant_across_charts(checkpoint, tmp_path, capsys):
    common = [str(checkpoint), "--samples", "64", "--measures", "trace,max_eig",
              "--num-probes", "60"]
    w = _run(common, tmp_path, "w")
    wn = _run([*common, "--chart", "weightnorm:10", "--in-chart"], tmp_path, "wn")
    table = capsys.readouterr().out
    assert "invariant (G⁻¹Hess)" in table and "naive" in table
    assert (tmp_path / "wn" / "spectral_density.png").stat().st_size > 1000
    a, b = w["invariant"]["trace"], wn["invariant"]["trace"]
    assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"])
    assert wn["invariant"]["max_eig"]["value"] == pytest.approx(
        w["invariant"]["max_eig"]["value"], rel=1e-6)
    # the naive trace in the rescaled chart is off by about the factor 1/10² on the weights
    assert wn["naive"]["trace"]["value"] < 0.3 * a["value"]
    assert wn["chart_dim"] == w["dim"] + 3 + 10
    # without --in-chart the pulled-back space is computed in w: the very same numbers
    fast = _run([*common, "--chart", "weightnorm:10"], tmp_path, "fast")
    assert "computed_in" in fast["invariant"]["trace"]["info"]
    assert "computed_in" not in wn["invariant"]["trace"]["info"]
    assert fast["invariant"]["trace"]["value"] == pytest.approx(a["value"], rel=1e-12)


def test_flatness_cli_architecture_mismatch(checkpoint, capsys):
    status = main(["flatness", str(checkpoint), "--arch", "mlp", "--arch-kwargs", "hidden=16",
                   "--samples", "8", "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "hidden" in err


def test_flatness_cli_dense_ggn(checkpoint, tmp_path):
    """Dense CLI numbers with a damped GGN metric against a hand-built float64 computation."""
    from torch.func import functional_call, hessian, jacrev

    from covariant.zoo.checkpoints import load_checkpoint
    from covariant.zoo.data import load_dataset

    lam = 1e-2
    r = _run([str(checkpoint), "--samples", "16", "--method", "dense", "--metric", "ggn",
              "--damping", str(lam), "--measures", "trace,max_eig"], tmp_path, "ggn")
    model, _ = load_checkpoint(checkpoint)
    model = model.double()
    ds = load_dataset("mnist1d")
    X, y = ds.X_train[:16].double(), ds.y_train[:16]
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def f(p):
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = p[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, parts, (X,))

    loss = lambda p: torch.nn.functional.cross_entropy(f(p), y)
    def ggn(p):  # Jᵀ ∇²ℓ(f) J, with the output Hessian taken at f(p)
        Jp = jacrev(f)(p).reshape(-1, p.numel())
        H_out = hessian(lambda z: torch.nn.functional.cross_entropy(z.reshape(16, 10), y))(
            f(p).reshape(-1))
        return Jp.T @ H_out @ Jp

    G = ggn(theta) + lam * torch.eye(theta.numel())
    dG = torch.func.jacfwd(ggn)
    g = torch.func.grad(loss)(theta)
    rr = torch.linalg.solve(G, g)
    T = dG(theta)  # T[j, l, i] = ∂_i G_jl (the damping is constant)
    corr = 0.5 * (torch.einsum("jli,l->ij", T, rr) + torch.einsum("ilj,l->ij", T, rr)
                  - torch.einsum("ijl,l->ij", T, rr))
    Hess = hessian(loss)(theta) - corr
    evals = torch.linalg.eigvals(torch.linalg.solve(G, Hess)).real
    assert r["invariant"]["trace"]["value"] == pytest.approx(float(evals.sum()), rel=1e-6)
    assert r["invariant"]["max_eig"]["value"] == pytest.approx(float(evals.max()), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Hardened inputs (issue 10): bad flags, unreadable checkpoints, --out, closed stdout
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    """A 75-parameter MLP for the synthetic dataset (20 features, 3 classes)."""
    torch.manual_seed(0)
    model = build("mlp", 20, 3, hidden=(3,))
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model)
    return path


_FAST = ["--dataset", "synthetic", "--method", "dense", "--measures", "trace", "--no-progress"]


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--chart", "weightnorm:-1", "S > 0"),
    ("--chart", "weightnorm:0", "S > 0"),
    ("--chart", "weightnorm:nan", "finite"),
    ("--chart", "scale:0", "A != 0"),
    ("--chart", "polar", "unknown chart"),
    ("--samples", "-5", "positive integer"),
    ("--samples", "0", "positive integer"),
    ("--damping", "-1", ">= 0"),
    ("--damping", "nan", "finite"),
    ("--damping", "inf", "finite"),
    ("--k", "-1", "positive integer"),
    ("--k", "0", "positive integer"),
    ("--num-probes", "1", ">= 2"),
    ("--num-probes", "0", ">= 2"),
    ("--slq-steps", "0", "positive integer"),
    ("--dataset", "synthetic-regression", "synthetic"),
    ("--arch-kwargs", "hidden", "key=value"),
    ("--metric", "hessian", "unknown metric"),
])
def test_bad_flag_values_exit_2_naming_the_flag(tiny, capsys, flag, value, says):
    """These used to change the question silently (a negative --samples sliced X[:-5], a
    negative --damping was ignored, weightnorm:-1 flipped w) or crash with a traceback."""
    args = ["flatness", str(tiny), *_FAST, f"{flag}={value}"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"covariant flatness: error: argument {flag}:" in err
    assert says in err and value in err


def test_valid_flag_values_still_parse():
    from covariant.cli import build_parser

    args = build_parser().parse_args([
        "flatness", "m.pt", "--chart", "weightnorm:10", "--damping", "0", "--samples", "1",
        "--k", "1", "--num-probes", "2", "--dataset", "MNIST-1D", "--arch-kwargs", "hidden=4,4"])
    assert (args.chart, args.damping, args.samples, args.k, args.num_probes, args.dataset) == (
        "weightnorm:10", 0.0, 1, 1, 2, "mnist1d")
    for chart in ("none", "weightnorm", "scale:0.1", "scale:-2"):
        assert build_parser().parse_args(["flatness", "m.pt", "--chart", chart]).chart == chart


def _unreadable(tmp_path, tiny, kind):
    path = tmp_path / f"{kind}.pt"
    data = tiny.read_bytes()
    if kind == "directory":
        path.mkdir()
    elif kind == "pickled module":
        torch.save(build("mlp", 20, 3, hidden=(3,)), path)
    elif kind == "flipped bytes":
        model_bytes = torch.load(tiny, weights_only=True)["state_dict"]["0.weight"]
        start = data.find(model_bytes.numpy().tobytes())
        flipped = bytearray(data)
        for i in range(start, start + 200):
            flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                          "text": b"not a checkpoint\n"}[kind])
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("empty", "is empty"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("text", "not a readable PyTorch checkpoint"),
    ("directory", "is a directory"),
    ("pickled module", "Save model.state_dict() instead, or use covariant.zoo.checkpoints"),
    ("flipped bytes", "corrupted"),
])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, tiny, capsys, kind, says):
    path = _unreadable(tmp_path, tiny, kind)
    assert main(["flatness", str(path), *_FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covariant flatness: error: ") and says in err
    assert "Traceback" not in err


def test_out_that_is_a_file_is_refused_before_computing(tiny, tmp_path, capsys, monkeypatch):
    import covariant.cli.flatness as cli_flatness

    def fail(*args, **kwargs):
        raise AssertionError("analyse must not run")

    monkeypatch.setattr(cli_flatness, "analyse", fail)
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    assert main(["flatness", str(tiny), *_FAST, "--out", str(existing), "--json"]) == 2
    err = capsys.readouterr().err
    assert "covariant flatness: error: --out" in err and "not a directory" in err
    assert existing.read_text() == "keep me"


def test_quick_uses_fewer_samples_and_synthetic_data_works(tiny, capsys):
    assert main(["flatness", str(tiny), *_FAST, "--quick", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["samples"] == 64 and result["dataset"] == "synthetic"
    assert math.isfinite(result["invariant"]["trace"]["value"])
    assert "64 synthetic examples" in captured.err


def test_undamped_ggn_is_one_definition_in_both_methods(tiny, capsys):
    """An undamped GGN of 8 examples is singular (rank 16 of 75). Hess vanishes on its kernel,
    so both methods solve E on range(G) and agree; the stochastic one used to raise."""
    args = ["flatness", str(tiny), "--dataset", "synthetic", "--samples", "8", "--metric",
            "ggn", "--measures", "trace", "--no-progress", "--json"]
    assert main([*args, "--method", "dense"]) == 0
    dense = json.loads(capsys.readouterr().out)["invariant"]["trace"]
    assert main([*args, "--method", "stochastic", "--num-probes", "200"]) == 0
    st = json.loads(capsys.readouterr().out)["invariant"]["trace"]
    assert dense["info"]["rank"] == st["info"]["rank"] == 16
    assert dense["info"]["num_gauge_directions"] == st["info"]["num_gauge_directions"] == 59
    assert abs(st["value"] - dense["value"]) <= 3 * st["stderr"]
    assert st["stderr"] < 0.1 * dense["value"]


def test_logdet_of_a_softmax_model_drops_its_null_directions(tiny, capsys):
    """The 3-unit softmax layer has 4 exact null directions. Too few Lanczos steps: the
    logdet says it is unresolved and names --slq-steps; enough: it matches dense."""
    args = ["flatness", str(tiny), "--dataset", "synthetic", "--samples", "32", "--measures",
            "logdet", "--no-progress", "--json"]
    assert main([*args, "--method", "dense"]) == 0
    dense = json.loads(capsys.readouterr().out)["invariant"]["logdet"]
    assert dense["info"]["num_null"] == 4 and dense["info"]["pseudo"]
    assert main([*args, "--num-probes", "40", "--slq-steps", "4"]) == 0
    out = capsys.readouterr()
    assert not json.loads(out.out)["invariant"]["logdet"]["converged"]
    assert "raise --slq-steps" in out.err
    assert main([*args, "--num-probes", "40", "--slq-steps", "75"]) == 0
    out = capsys.readouterr()
    st = json.loads(out.out)["invariant"]["logdet"]
    assert st["converged"] and "--slq-steps" not in out.err
    assert abs(st["value"] - dense["value"]) <= 3 * st["stderr"]
    assert st["info"]["num_null"] == pytest.approx(4, abs=1.5)


def test_singular_metric_error_names_the_damping_flag():
    from covariant.cli.flatness import cli_message
    from covariant.errors import SingularMetricError

    err = SingularMetricError("flatness: the metric is singular and Hess does not vanish on "
                              "its kernel (...). Damp the metric (--damping, or "
                              "metrics.Damped(G, lam, reference=...)) (docs/math.md §4).")
    text = cli_message(err)
    assert "--damping" in text and "metrics.Damped" not in text


def test_table_formats_a_nan_stderr():
    from covariant.cli.flatness import _fmt

    assert _fmt({"value": 2.0, "stderr": float("nan")}) == "2 ± n/a"
    assert _fmt({"value": 2.0, "stderr": "nan"}) == "2 ± n/a"
    assert _fmt({"value": 2.0, "stderr": 0.5}) == "2 ± 0.5"


class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_json_into_a_closed_pipe_exits_quietly(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["flatness", str(tiny), *_FAST, "--json"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_json_piped_to_a_closed_reader_has_no_traceback(tiny):
    """`covariant flatness ... --json | head -c 1` in a real process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "covariant.cli", "flatness", str(tiny), *_FAST, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert "trace" in err  # the table went to stderr as usual


def test_flatness_help_documents_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line breaks inside the phrases below
    with pytest.raises(SystemExit) as exit_:
        main(["flatness", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exact generalized eigenproblem" in text  # --method
    assert "random probe vectors" in text  # --num-probes
    assert "mnist1d, digits, synthetic, synthetic-images" in text  # --dataset
    from covariant.zoo.architectures import ARCHITECTURES

    arch_help = text.split("--arch ARCH architecture")[1].split("--arch-kwargs")[0]
    assert all(name in arch_help for name in ARCHITECTURES)  # --arch lists the registry
    assert "--samples 64 and --num-probes 30 unless given" in text  # --quick


def test_more_samples_than_the_dataset_is_an_error_not_a_silent_cap(tiny, capsys):
    """--samples 10**6 used to run quietly on the whole (smaller) training set."""
    assert main(["flatness", str(tiny), *_FAST, "--samples", "1000000"]) == 2
    err = capsys.readouterr().err
    assert "covariant flatness: error:" in err and "exceeds" in err and "--samples" in err


@pytest.mark.parametrize("value", ["-1", str(2**64)])
def test_seed_out_of_range_exits_2(capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", f"--seed={value}"])
    assert exit_.value.code == 2
    assert "argument --seed:" in capsys.readouterr().err
