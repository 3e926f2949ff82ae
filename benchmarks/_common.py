"""Shared helpers of the benchmark scripts (not part of the library, never imported by tests).

- machine information for the JSON records (CPU model, cores, torch, device, load);
- interleaved timing with device synchronisation and medians;
- atomic JSON writes (temporary file + ``os.replace``);
- MNIST-1D and briefly trained preset models, cached on disk;
- PyHessian shims (see :data:`PYHESSIAN_NOTES` for what is worked around and why);
- peak-memory probes: current / peak RSS from ``/proc/self/status`` with the peak reset via
  ``/proc/self/clear_refs`` (CPU), ``torch.cuda.max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# PyHessian's hessian() calls loss.backward(create_graph=True) into .grad on purpose.
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


# --------------------------------------------------------------------------------------------
# Machine information
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def mem_available_gib() -> float | None:
    """MemAvailable: low values mean other jobs pressed on memory (and timings suffer)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def source_hashes() -> dict[str, str]:
    """sha256 (12 hex) of each covariant source file: identifies the code measured, no git."""
    try:
        import covariant

        root = Path(covariant.__file__).resolve().parent
    except Exception:
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted(root.rglob("*.py"))}


def source_fingerprint(hashes: dict[str, str] | None = None) -> str:
    """One sha256 (12 hex) over all of :func:`source_hashes`."""
    hashes = source_hashes() if hashes is None else hashes
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from; ``loadavg`` shows how busy the (shared) machine was."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _meminfo_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "covariant": _version("covariant"),
        "covariant_source_sha256": source_fingerprint(),
        "covariant_source_files": source_hashes(),
        "pyhessian": _version("pyhessian"),
        "device": str(device),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mem_available_gib_at_start": mem_available_gib(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    warmup: dict[str, Callable[[], Any]] | bool | None = None,
) -> dict[str, list[float]]:
    """Time several callables round-robin, so that machine load hits all of them alike.

    Each round calls every function once, in an order shuffled by a fixed seed (a function
    that always ran first or last would see different cache and load conditions). ``warmup``
    maps names to a (cheaper) call made once before timing starts; names missing from it are
    warmed up by calling the function itself; ``warmup=False`` skips warm-up.
    """
    names = list(fns)
    if warmup is not False:
        for name in names:
            (warmup or {}).get(name, fns[name])()
    rng = random.Random(1234)
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            out[name].append(time_call(fns[name], device))
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "covariant-bench"


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def load_data(cache: Path, num_samples: int = 4000):
    """MNIST-1D (generated locally, cached as .npz)."""
    from covariant.zoo.data import load_mnist1d

    return load_mnist1d(num_samples, seed=42, cache_dir=cache)


def image_data(num_samples: int = 2000, shape: tuple[int, ...] = (3, 32, 32),
               num_classes: int = 10, seed: int = 42) -> Any:
    """CIFAR-shaped generated data (no download): the Gaussian blobs of
    ``covariant.zoo.data.make_synthetic_classification`` reshaped to ``(N, *shape)``."""
    from types import SimpleNamespace

    from covariant.zoo.data import make_synthetic_classification

    n_feat = 1
    for s in shape:
        n_feat *= s
    ds = make_synthetic_classification(num_samples, n_feat, num_classes, seed=seed,
                                       separation=0.05, noise=1.0)
    return SimpleNamespace(X_train=ds.X_train.reshape(-1, *shape), y_train=ds.y_train,
                           X_test=ds.X_test.reshape(-1, *shape), y_test=ds.y_test,
                           name=f"images{'x'.join(map(str, shape))}-{num_samples}-seed{seed}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How the flatness benchmark builds, feeds and trains a model named on ``--models``.

    ``data``: "mnist1d" (inputs (N, 40)) or "images32" (generated (N, 3, 32, 32), see
    :func:`image_data`). ``build``: a preset of ``covariant.zoo.architectures.PRESETS`` or an
    architecture of ``ARCHITECTURES`` (built with ``in_features`` and ``build_kwargs``).
    ``batch``/``probes``: None keeps the script's default (--batch; 50 probes).
    """

    data: str = "mnist1d"
    epochs: int = 20
    probes: int | None = None
    batch: int | None = None
    in_features: Any = 40
    build_kwargs: tuple[tuple[str, Any], ...] = ()


# One line per model that needs other data, batch or training than the defaults below. A
# name not listed here is built as a zoo preset, else as a zoo architecture, on MNIST-1D with
# the default spec. The BN ResNet and the ViT of issue 11 train briefly on generated
# CIFAR-shaped images (in_features 3·32·32) and are benchmarked in eval mode (see
# bench_flatness.build_ctx).
MODEL_SPECS: dict[str, ModelSpec] = {
    "mlp-80k": ModelSpec(epochs=20, probes=50),
    "mlp-small": ModelSpec(epochs=100),
    "cnn-1m": ModelSpec(epochs=3, probes=10),
    "resnet20-bn": ModelSpec(data="images32", epochs=2, probes=10, batch=128,
                             in_features=3 * 32 * 32),
    "vit-small": ModelSpec(data="images32", epochs=2, probes=10, batch=128,
                           in_features=3 * 32 * 32),
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a ``--models`` name; ValueError if the zoo knows no such name."""
    from covariant.zoo.architectures import ARCHITECTURES, PRESETS

    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    if name in PRESETS or name.lower() in ARCHITECTURES:
        return ModelSpec(epochs=3 if "cnn" in name else 20)
    known = sorted({*MODEL_SPECS, *PRESETS, *ARCHITECTURES})
    raise ValueError(f"unknown model {name!r}: not a benchmark spec, zoo preset or "
                     f"architecture; choose from {known}")


def build_model(name: str) -> nn.Module:
    from covariant.zoo.architectures import PRESETS, build, preset

    spec = model_spec(name)
    if name in PRESETS:
        return preset(name, spec.in_features, 10, **dict(spec.build_kwargs))
    return build(name, spec.in_features, 10, **dict(spec.build_kwargs))


def load_model_data(name: str, cache: Path) -> Any:
    """The dataset a model is benchmarked on (by its spec's ``data``)."""
    data = model_spec(name).data
    if data == "mnist1d":
        return load_data(cache)
    if data == "images32":
        return image_data()
    raise ValueError(f"unknown data {data!r} for model {name!r}")


def trained_model(
    name: str, ds: Any, *, epochs: int, seed: int, cache: Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """A preset or zoo architecture trained briefly with Adam (lr 1e-3, batch 128), cached by
    its recipe.

    Returns the model on ``device`` in float32 and a small dict describing it (including the
    path of the cached state dict, which memory-measurement subprocesses load).
    """
    from covariant.zoo.architectures import num_parameters
    from covariant.zoo.training import accuracy, train_classifier

    data_name = getattr(ds, "name", "mnist1d")
    recipe = {"preset": name, "epochs": epochs, "seed": seed, "lr": 1e-3, "batch": 128,
              "n_train": int(ds.X_train.shape[0]),
              "data": "mnist1d-4000-seed42" if data_name == "mnist1d" else data_name}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{name}-{key}.pt"
    torch.manual_seed(seed)
    model = build_model(name)
    trained_now = False
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        except Exception:  # unreadable cache: retrain
            path.unlink(missing_ok=True)
    if not path.exists():
        model.to(device)
        t0 = time.perf_counter()
        train_classifier(model, ds.X_train, ds.y_train, epochs=epochs, lr=1e-3, seed=seed)
        trained_now = time.perf_counter() - t0
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=cache)
        os.close(fd)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    model.to(device).float()
    desc = {**recipe, "params": num_parameters(model), "state_dict": str(path),
            "test_accuracy": round(accuracy(model, ds.X_test.to(device), ds.y_test.to(device)), 4),
            "train_seconds": trained_now if trained_now is not False else "cached"}
    return model, desc


# --------------------------------------------------------------------------------------------
# PyHessian
# --------------------------------------------------------------------------------------------

PYHESSIAN_NOTES = [
    "PyHessian 0.1 imports and runs on torch 2.13 for hessian.trace and hessian.eigenvalues "
    "(torch.autograd.Variable still exists).",
    "hessian.density() is broken on torch >= 2.0: it calls torch.eig, which was removed "
    "(torch.linalg.eigh would do). Not used here.",
    "hessian.trace(maxIter=N, tol=0) does not always use N probes: its stopping test "
    "abs(mean - trace) / (trace + 1e-6) < tol divides by the signed running mean, so it stops "
    "as soon as the running mean is negative (seen here after 2 of 10 probes on trained "
    "MNIST-1D nets). Worked around by tol=-inf, which never stops early; the benchmark "
    "asserts that exactly N probes were used.",
    "hessian() calls loss.backward(create_graph=True), which accumulates into .grad: stale "
    "gradients would be added to the Hessian's graph, and the graph-carrying .grad forms a "
    "reference cycle. The benchmark sets every .grad to None before and after each call.",
    "hessian.eigenvalues(top_n=k) returns the eigenvalues in the order found by deflated power "
    "iteration, which is not always descending; they are sorted before comparing.",
    "hessian.eigenvalues' tol is a relative change between consecutive power-iteration "
    "estimates, not an accuracy; the benchmark sweeps it and keeps the loosest tol whose "
    "result is within the target accuracy of the reference.",
]


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@contextlib.contextmanager
def count_pyhessian_hvps() -> Iterator[dict[str, int]]:
    """Count PyHessian's Hessian-vector products (patches the name its hessian module uses)."""
    import pyhessian  # noqa: F401

    # pyhessian/__init__ re-exports the class `hessian`, which shadows the submodule's name
    ph = sys.modules["pyhessian.hessian"]
    counter = {"hvps": 0}
    original = ph.hessian_vector_product

    def counting(gradsH, params, v):  # PyHessian's names
        counter["hvps"] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counting
    try:
        yield counter
    finally:
        ph.hessian_vector_product = original


def pyhessian_trace(model: nn.Module, crit: nn.Module, X: torch.Tensor, y: torch.Tensor,
                    num_probes: int) -> list[float]:
    """PyHessian's Hutchinson trace with exactly ``num_probes`` probes (see PYHESSIAN_NOTES)."""
    from pyhessian import hessian

    zero_grads(model)
    try:
        h = hessian(model, crit, data=(X, y), cuda=X.is_cuda)
        values = h.trace(maxIter=num_probes, tol=float("-inf"))
    finally:
        zero_grads(model)
    if len(values) != num_probes:
        raise RuntimeError(f"PyHessian used {len(values)} probes, not {num_probes}")
    return [float(v) for v in values]


def pyhessian_eigs(model: nn.Module, crit: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int,
                   tol: float, max_iter: int, seed: int) -> tuple[list[float], int]:
    """Top-k eigenvalues by PyHessian's deflated power iteration, sorted descending, and the
    number of Hessian-vector products it used."""
    from pyhessian import hessian

    torch.manual_seed(seed)
    zero_grads(model)
    try:
        with count_pyhessian_hvps() as c:
            h = hessian(model, crit, data=(X, y), cuda=X.is_cuda)
            values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        zero_grads(model)
    return sorted((float(v) for v in values), reverse=True), c["hvps"]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline RSS is not inflated."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; Linux >= 4.0. False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_cpu(op: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS increase (bytes) while ``op`` runs in this (fresh) process."""
    import gc

    gc.collect()
    malloc_trim()
    reset = reset_peak_rss()
    base = _status_kib()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    op()
    after = _status_kib()
    if reset:
        peak_kib, how = after["VmHWM"], "VmHWM after clear_refs"
    else:  # lifetime peak: a lower bound on the op's own peak only if it exceeds setup's
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss (peak not resettable)"
        peak_kib = max(peak_kib, base_maxrss)
    return {"baseline_rss_kib": base["VmRSS"], "peak_rss_kib": peak_kib,
            "delta_bytes": max(0, peak_kib - base["VmRSS"]) * 1024, "how": how}


def peak_tensor_memory_cpu(op: Callable[[], Any]) -> int:
    """Peak of the bytes held by torch tensors while ``op`` runs (CPU allocator events of
    ``torch.profiler``, summed in time order): what ``max_memory_allocated`` is on CUDA,
    without the allocator slack that RSS includes."""
    import gc
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        op()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    current = peak = 0
    for e in mem:
        current += int(e["args"]["Bytes"])
        peak = max(peak, current)
    return peak


def peak_memory_cuda(op: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    import gc

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    op()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"baseline_allocated": base, "peak_allocated": peak, "delta_bytes": peak - base,
            "how": "torch.cuda.max_memory_allocated - memory_allocated before"}
