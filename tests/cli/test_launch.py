"""``covariant flatness`` under torchrun: one process's numbers, rank-0 output, clean errors.

The launches are subprocesses with a timeout (2 gloo ranks on 127.0.0.1, one thread each), so
a hang fails the test instead of blocking CI. ``_launch_by_hand`` plays torchrun's part (it
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT itself) so that the ranks can be
given different flags or files, which torchrun never does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from covariant.cli import main
from covariant.cli.launch import (
    TORCHRUN_VARIABLES,
    TorchrunEnv,
    choose_backend,
    require_torchrun,
    torchrun_env,
)
from covariant.errors import DistributedError
from covariant.zoo.architectures import build
from covariant.zoo.checkpoints import save_checkpoint

SRC = str(Path(__file__).resolve().parents[2] / "src")
TIMEOUT_S = 120.0
RTOL = 1e-12
#: A small float64 problem: 75 parameters, 64 examples (32 per rank), a chart in which the
#: naive numbers differ from the invariant ones.
FLAGS = ["--dataset", "synthetic", "--samples", "64", "--measures", "trace,max_eig,top_eigs",
         "--k", "3", "--num-probes", "10", "--chart", "weightnorm:10", "--no-progress"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, build("mlp", 20, 3, hidden=(3,)))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [*extra.pop("PREPEND", "").split(os.pathsep), SRC]).strip(os.pathsep), **extra)
    return env


def _torchrun(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "covariant", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=_env(**extra))


def _launch_by_hand(per_rank: list[list[str]], cwds: list[Path] | None = None
                    ) -> list[subprocess.CompletedProcess[str]]:
    """Start ``python -m covariant <args of rank r>`` with torchrun's environment, one process
    per rank; wait for all (each within the timeout)."""
    port, world = str(_free_port()), str(len(per_rank))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "covariant", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=None if cwds is None else cwds[r],
        env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)) for r, args in enumerate(per_rank)]
    done = []
    try:
        for r, proc in enumerate(procs):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(per_rank[r], proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _measures(result: dict) -> dict[tuple[str, str, str], float]:
    """Every reported number: (view, measure, value|stderr) → float (lists flattened)."""
    out = {}
    for view in ("invariant", "naive"):
        for name, m in result[view].items():
            for field in ("value", "stderr"):
                values = m.get(field)
                for i, v in enumerate(values if isinstance(values, list) else [values]):
                    if v is not None:
                        out[(view, name, f"{field}{i}")] = float(v)
    return out


_WRITE_HOOK = '''
import os
_replace = os.replace
def _logged(src, dst, *a, **k):
    with open(os.environ["COVARIANT_TEST_WRITES"], "a") as f:
        f.write(f"{os.environ.get('RANK')} {os.fspath(dst)}\\n")
    return _replace(src, dst, *a, **k)
os.replace = _logged
'''


def test_torchrun_flatness_equals_one_process(tmp_path, capsys):
    """2 gloo ranks give the single-process numbers (float64, 1e-12 relative); rank 0 alone
    prints the report and writes the files (every atomic rename is logged with its RANK)."""
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["flatness", str(ckpt), *FLAGS, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_WRITE_HOOK)
    writes = tmp_path / "writes.log"
    proc = _torchrun(["flatness", str(ckpt), *FLAGS, "--json", "--out", str(tmp_path / "two")],
                     PREPEND=str(hook), COVARIANT_TEST_WRITES=str(writes))
    assert proc.returncode == 0, proc.stderr
    two = json.loads((tmp_path / "two" / "flatness.json").read_text())
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    a, b = _measures(single), _measures(two)  # --out adds the spectral density (a plot)
    assert set(a) <= set(b) and len(a) == 2 * (2 + 1 + 3)  # trace ± stderr, max_eig, 3 eigs
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=RTOL, abs=0.0), key
    assert b[("invariant", "trace", "value0")] != pytest.approx(b[("naive", "trace", "value0")])
    logged = [line.split(" ", 1) for line in writes.read_text().splitlines()]
    ours = sorted(Path(p).name for r, p in logged if Path(p).parent == tmp_path / "two")
    assert ours == ["flatness.json", "spectral_density.png"]
    assert {r for r, p in logged if Path(p).parent == tmp_path / "two"} == {"0"}
    assert proc.stdout.count("invariant (G⁻¹Hess)") == 1 and proc.stdout.count("wrote ") == 1


def test_torchrun_json_to_stdout_is_one_document(tmp_path):
    """--json without --out: one JSON document on stdout (rank 0's), the table once on
    stderr, progress bars from rank 0 only."""
    ckpt = _checkpoint(tmp_path / "model.pt")
    proc = _torchrun(["flatness", str(ckpt), *FLAGS[:-1], "--measures", "trace", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # a second document would be "Extra data"
    assert result["distributed"]["world_size"] == 2 and result["samples"] == 64
    assert proc.stderr.count("invariant (G⁻¹Hess)") == 1
    # rank 0's bars: one per flatness call (invariant, naive); rank 1 shows none
    assert proc.stderr.count("hutchinson:   0%") == 2 and "Traceback" not in proc.stderr


def test_mismatched_seed_fails_on_every_rank(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    runs = _launch_by_hand([["flatness", str(ckpt), "--distributed", *FLAGS, "--seed", str(r)]
                            for r in range(2)])
    assert [p.returncode for p in runs] == [2, 2], [p.stderr for p in runs]
    assert ("covariant flatness: error (rank 0 of 2): the ranks disagree about the command "
            "line (--seed: 0 on ranks [0], 1 on ranks [1])") in runs[0].stderr
    assert runs[1].stderr == "" and runs[0].stdout == runs[1].stdout == ""


def test_mismatched_parameters_fail_on_every_rank(tmp_path):
    """The same flags, but 'model.pt' holds other weights on rank 1: distributed_space's hash
    check, reported as a clean error (no traceback) on every rank."""
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    for r, cwd in enumerate(cwds):
        cwd.mkdir()
        _checkpoint(cwd / "model.pt", seed=r)
    runs = _launch_by_hand([["flatness", "model.pt", "--distributed", *FLAGS]] * 2, cwds)
    assert [p.returncode for p in runs] == [2, 2], [p.stderr for p in runs]
    assert "the ranks disagree about the model, its parameters" in runs[0].stderr
    assert "Traceback" not in runs[0].stderr + runs[1].stderr


def test_failure_on_one_rank_fails_every_rank(tmp_path):
    """Rank 1 cannot read its checkpoint: it reports its own error, rank 0 names rank 1."""
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    for cwd in cwds:
        cwd.mkdir()
    _checkpoint(cwds[0] / "model.pt")
    runs = _launch_by_hand([["flatness", "model.pt", "--distributed", *FLAGS]] * 2, cwds)
    assert [p.returncode for p in runs] == [2, 2], [p.stderr for p in runs]
    assert "error (rank 0 of 2): rank 1 failed: FileNotFoundError" in runs[0].stderr
    assert "error (rank 1 of 2):" in runs[1].stderr and "model.pt" in runs[1].stderr


def _set_launch(monkeypatch, rank: int, world: int = 2) -> None:
    for name, value in zip(TORCHRUN_VARIABLES, (rank, world, rank, "127.0.0.1", _free_port()),
                           strict=True):
        monkeypatch.setenv(name, str(value))


def test_distributed_without_torchrun_says_how_to_launch(tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR"):
        require_torchrun("flatness")
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["flatness", str(ckpt), "--distributed", *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covariant flatness: error: --distributed needs torchrun's "
                          "environment")
    assert "`torchrun --standalone --nproc-per-node N -m covariant flatness CHECKPOINT ...`" \
        in err


def test_unsupported_metric_fails_early_and_destroys_the_group(tmp_path, monkeypatch, capsys):
    """A world of one process in this process: --metric kfac is refused before any data is
    read, with the supported metrics named, and the process group is gone afterwards."""
    _set_launch(monkeypatch, 0, world=1)
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["flatness", str(ckpt), *FLAGS, "--metric", "kfac"]) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert "supports --metric euclidean, ggn, fisher, empirical_fisher" in err
    assert "got --metric kfac" in err


@pytest.mark.parametrize("extra", [["--metric", "ggn", "--damping", "1e-3"],
                                   ["--method", "dense", "--metric", "ggn", "--damping", "1e-3"]],
                         ids=["ggn-stochastic", "ggn-dense"])
def test_torchrun_ggn_metric_equals_one_process(tmp_path, capsys, extra):
    """The README's headline analysis (damped GGN metric, weight-norm chart) under torchrun:
    the connection terms of the data-dependent metric and the dense matrices are reduced
    over the 2 ranks, and every number is one process's (float64, 1e-12 relative)."""
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["flatness", str(ckpt), *FLAGS, *extra, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    proc = _torchrun(["flatness", str(ckpt), *FLAGS, *extra, "--json"])
    assert proc.returncode == 0, proc.stderr
    two = json.loads(proc.stdout)
    assert two["distributed"]["world_size"] == 2 and two["metric"] == "ggn"
    a, b = _measures(single), _measures(two)
    assert set(a) == set(b) and len(a) >= 2 * 5
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=RTOL, abs=0.0), key
    assert b[("invariant", "trace", "value0")] != pytest.approx(b[("naive", "trace", "value0")])


def test_world_of_one_equals_one_process(tmp_path, monkeypatch, capsys):
    """torchrun with one process (here: in this process): distributed_space over a world of
    one gives the plain space's numbers (its traces use HVPs instead of Taylor-mode
    quadratic forms, so they differ by round-off)."""
    ckpt = _checkpoint(tmp_path / "model.pt")
    args = ["flatness", str(ckpt), *FLAGS, "--measures", "trace,max_eig", "--json"]
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out)
    _set_launch(monkeypatch, 0, world=1)
    assert main(args) == 0
    assert not dist.is_initialized()
    one = json.loads(capsys.readouterr().out)
    assert one["distributed"] == {"world_size": 1, "backend": "gloo"}
    a, b = _measures(single), _measures(one)
    assert set(a) == set(b) and len(a) == 2 * 3
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=RTOL, abs=0.0), key


def test_backend_by_device_and_override(monkeypatch, capsys, tmp_path):
    assert choose_backend(torch.device("cpu")) == "gloo"
    assert choose_backend(torch.device("cuda", 1)) == "nccl"
    assert choose_backend(torch.device("cuda", 0), "gloo") == "gloo"
    with pytest.raises(DistributedError, match="add --device cuda"):
        choose_backend(torch.device("cpu"), "nccl")
    _set_launch(monkeypatch, 0, world=1)
    assert main(["flatness", str(tmp_path / "model.pt"), "--backend", "nccl"]) == 2
    assert "--backend nccl reduces CUDA tensors only" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_device_flag_errors(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["flatness", str(ckpt), *FLAGS, "--device", "gpu0"]) == 2
    assert "--device 'gpu0': not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["flatness", str(ckpt), *FLAGS, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_torchrun_env_parsing():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "29500"}
    assert torchrun_env(env) == TorchrunEnv(3, 4, 1, "h", 29500)
    assert torchrun_env({**env, "MASTER_PORT": ""}) is None
    with pytest.raises(DistributedError, match="RANK=4 is not in"):
        torchrun_env({**env, "RANK": "4"})
    with pytest.raises(DistributedError, match="must be integers"):
        torchrun_env({**env, "WORLD_SIZE": "four"})


def test_demo_runs_on_rank_zero_only(monkeypatch, capsys):
    calls = []

    def fake_run(out, **kwargs):
        calls.append(out)
        return {"toy": 1.0}

    monkeypatch.setattr("covariant.cli.demo.run", fake_run)
    _set_launch(monkeypatch, 1)
    assert main(["demo", "--quick", "--json"]) == 0
    assert calls == [] and capsys.readouterr() == ("", "")
    _set_launch(monkeypatch, 0)
    assert main(["demo", "--quick", "--json"]) == 0
    assert calls == [None] and json.loads(capsys.readouterr().out) == {"toy": 1.0}
    assert not dist.is_initialized()
