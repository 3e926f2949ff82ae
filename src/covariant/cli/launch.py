"""Running ``covariant`` commands under ``torchrun``: environment, process group, rank-0 output.

``torchrun --nproc-per-node N -m covariant flatness ...`` starts N copies of the command, each
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set
(:func:`torchrun_env` reads them). ``covariant flatness`` then runs data-parallel
(:mod:`covariant.distributed`): :func:`process_group` initializes the ``torch.distributed``
group from that environment with the backend of the device (:func:`choose_backend`: gloo on
CPU, NCCL on CUDA; ``--backend`` overrides) and destroys it at the end, also on errors.
:func:`agree` compares every rank's settings (and any error it met before the first
collective) in one all-gather, so that a rank that failed or was started with other flags
makes *every* rank raise :class:`~covariant.errors.DistributedError` instead of hanging.
Only rank 0 prints reports and writes files: :func:`rank_zero_output` sends the other ranks'
stdout to ``os.devnull`` and silences their warnings (their errors still reach stderr).

The single-process commands (``demo``, ``reproduce``) run on rank 0 only
(:func:`runs_single_process`); the other ranks exit at once with status 0.

Example
-------
>>> env = torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
...                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
>>> env.rank, env.world_size, env.local_rank
(1, 2, 1)
>>> torchrun_env({}) is None, runs_single_process(env)
(True, False)
>>> choose_backend(torch.device("cpu")), choose_backend(torch.device("cuda", 0))
('gloo', 'nccl')
>>> launch_command("flatness")
'torchrun --standalone --nproc-per-node N -m covariant flatness CHECKPOINT ...'
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedError
from .flatness_flags import BACKENDS

__all__ = [
    "BACKENDS",
    "TORCHRUN_VARIABLES",
    "TorchrunEnv",
    "agree",
    "choose_backend",
    "launch_command",
    "process_group",
    "rank_zero_output",
    "require_torchrun",
    "resolve_device",
    "run_launched",
    "runs_single_process",
    "torchrun_env",
]

#: The environment variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TorchrunEnv:
    """Where this process sits in a torchrun launch (from its environment)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_command(command: str) -> str:
    """The one-node torchrun command line of ``covariant <command>``."""
    what = " CHECKPOINT ..." if command == "flatness" else " ..."
    return f"torchrun --standalone --nproc-per-node N -m covariant {command}{what}"


def _launch_hint(command: str) -> str:
    return (f"launch it with `{launch_command(command)}` (or "
            f"`OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m covariant "
            f"{command} ...` on a 2-core CPU); torchrun sets {', '.join(TORCHRUN_VARIABLES)} "
            "for every process (several nodes: docs/scale.md)")


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The launch read from ``environ`` (default ``os.environ``); None unless every one of
    :data:`TORCHRUN_VARIABLES` is set. Values that are not integers where torchrun writes
    integers raise :class:`~covariant.errors.DistributedError`."""
    env = os.environ if environ is None else environ
    if not all(env.get(name) for name in TORCHRUN_VARIABLES):
        return None
    try:
        launch = TorchrunEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                             env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    except ValueError:
        raise DistributedError(
            "the torchrun environment is malformed: RANK, WORLD_SIZE, LOCAL_RANK and "
            f"MASTER_PORT must be integers, got {[env[n] for n in TORCHRUN_VARIABLES]}"
        ) from None
    if not 0 <= launch.rank < launch.world_size:
        raise DistributedError(
            f"the torchrun environment is malformed: RANK={launch.rank} is not in "
            f"[0, WORLD_SIZE={launch.world_size})")
    return launch


def require_torchrun(command: str, environ: Mapping[str, str] | None = None) -> TorchrunEnv:
    """The torchrun launch, or :class:`~covariant.errors.DistributedError` saying how to start
    one (``covariant <command> --distributed`` run by hand)."""
    launch = torchrun_env(environ)
    if launch is None:
        env = os.environ if environ is None else environ
        missing = [n for n in TORCHRUN_VARIABLES if not env.get(n)]
        raise DistributedError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} not set): "
            + _launch_hint(command))
    return launch


def runs_single_process(launch: TorchrunEnv | None) -> bool:
    """Whether this process runs a single-process command: always outside torchrun, rank 0
    under it."""
    return launch is None or launch.rank == 0


def resolve_device(spec: str, launch: TorchrunEnv | None) -> torch.device:
    """``--device``: ``cuda`` without an index means ``cuda:LOCAL_RANK`` under torchrun (one
    GPU per process) and the current GPU otherwise."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine; use "
                             "--device cpu")
        if device.index is None:
            device = torch.device("cuda", launch.local_rank if launch else
                                  torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: {device} does not exist, this node has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per "
                "node (torchrun --nproc-per-node) with --device cuda")
    return device


def choose_backend(device: torch.device, override: str | None = None) -> str:
    """gloo for a CPU device, NCCL for CUDA; ``override`` (``--backend``) wins, but NCCL
    reduces only CUDA tensors, so NCCL with a CPU device raises."""
    backend = override or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise DistributedError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("--backend nccl reduces CUDA tensors only: add --device cuda, "
                               "or use --backend gloo on CPU")
    return backend


@contextlib.contextmanager
def process_group(launch: TorchrunEnv, backend: str, device: torch.device, *,
                  timeout_s: float = 1800.0) -> Iterator[None]:
    """Initialize the default process group from torchrun's environment for the block and
    destroy it afterwards, also when the block raises. A failure to start it (a master that
    cannot be reached, a backend this build lacks) raises
    :class:`~covariant.errors.DistributedError`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError) as err:
        raise DistributedError(
            f"could not start the {backend} process group of rank {launch.rank} of "
            f"{launch.world_size} at {launch.master_addr}:{launch.master_port}: {err}"
        ) from err
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_output(launch: TorchrunEnv | None) -> Iterator[bool]:
    """Yield whether this process reports; on other ranks, stdout goes to ``os.devnull`` and
    warnings are ignored for the block (stderr stays, for their own errors)."""
    if runs_single_process(launch):
        yield True
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield False
        sys.stdout.flush()


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def agree(settings: Mapping[str, Any], error: BaseException | None = None, *,
          what: str = "the command line") -> None:
    """Compare ``settings`` across the ranks of the default group (one all-gather, which every
    rank must reach, with or without ``error``).

    Raises ``error`` on the rank that met it, and :class:`~covariant.errors.DistributedError`
    on the others when any rank failed, or on every rank when the ranks' ``settings`` differ
    (naming the differing keys and each rank's value).
    """
    mine = ({k: _digest(v) for k, v in settings.items()}, dict(settings),
            None if error is None else f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    failed = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
    if failed:
        raise DistributedError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    keys = sorted({k for g in gathered for k in g[0]})
    differ = [k for k in keys if len({g[0].get(k) for g in gathered}) > 1]
    if differ:
        shown = "; ".join(f"{k}: " + ", ".join(
            f"{value} on ranks {ranks}" for value, ranks in _by_value(gathered, k).items())
            for k in differ[:3])
        raise DistributedError(
            f"the ranks disagree about {what} ({shown}); start every rank with the same "
            "flags, e.g. with torchrun, which runs one command line on every rank")


def _by_value(gathered: list[Any], key: str) -> dict[str, list[int]]:
    """The ranks of each value of ``key`` (values shown as their repr)."""
    out: dict[str, list[int]] = {}
    for rank, (_, values, _) in enumerate(gathered):
        out.setdefault(repr(values.get(key)), []).append(rank)
    return out


#: A command's runner: (parsed arguments, progress bars, the torchrun launch or None) → status.
Runner = Callable[[Any, bool, "TorchrunEnv | None"], int]


def run_launched(command: str, args: Any, run: Runner, *, progress: bool,
                 distributed: bool = False, group: bool = True) -> int:
    """Run ``covariant <command>`` as launched: in one process outside torchrun (where
    ``distributed`` raises the launch hint), else with rank-0 output and progress bars on
    rank 0 only, in the process group of torchrun's environment (unless ``group`` is False:
    a single-process command, which ``run`` skips on the other ranks). Launch problems end
    with ``covariant <command>: error: …`` and status 2; ``run`` reports its own errors."""
    try:
        launch = require_torchrun(command) if distributed else torchrun_env()
        if launch is None:
            return run(args, progress, None)
        if not group:
            with rank_zero_output(launch) as reports:
                return run(args, progress and reports, launch)
        device = resolve_device(getattr(args, "device", "cpu"), launch)
        backend = choose_backend(device, getattr(args, "backend", None))
        with process_group(launch, backend, device), rank_zero_output(launch) as reports:
            return run(args, progress and reports, launch)
    except (DistributedError, ValueError) as err:
        print(f"covariant {command}: error: {err}", file=sys.stderr)
        return 2
