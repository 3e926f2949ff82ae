"""The flags of ``covariant flatness``: their types, defaults and help texts.

This module imports nothing heavy (no torch), so that ``covariant flatness --help`` answers at
once; the analysis itself is in :mod:`covariant.cli.flatness`, imported when the command runs.

Example
-------
>>> import argparse
>>> args = argparse.Namespace(quick=True, samples=None, num_probes=None)
>>> resolve_quick(args).samples, args.num_probes
(64, 30)
>>> p = argparse.ArgumentParser()
>>> add_arguments(p)
>>> p.parse_args(["m.pt", "--metric", "GGN", "--damping", "1e-3"]).metric
'ggn'
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._constants import METRIC_NAMES
from . import arguments as a

#: ``--backend`` choices (the same as covariant.cli.launch.BACKENDS, which imports torch).
BACKENDS = ("gloo", "nccl")

__all__ = ["DEFAULT_MEASURES", "PROBES", "SAMPLES", "add_arguments", "resolve_quick"]

#: The measures computed unless ``--measures`` is given.
DEFAULT_MEASURES = "trace,logdet,max_eig,top_eigs"
#: (full, --quick) defaults of --samples and --num-probes.
SAMPLES, PROBES = (512, 64), (100, 30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The positional argument and the flags of ``covariant flatness``, on ``p``."""
    p.add_argument("checkpoint", type=Path, help="saved model (save_checkpoint or a state_dict)")
    p.add_argument("--arch", default=None,
                   help="architecture (mlp, cnn1d, resnet1d, resnet2d, vit); read from the "
                        "checkpoint if saved with covariant.zoo.checkpoints.save_checkpoint")
    p.add_argument("--arch-kwargs", default="", type=a.arch_kwargs,
                   help="architecture options, e.g. 'hidden=64,64;activation=tanh'")
    p.add_argument("--dataset", default="mnist1d", type=a.dataset_name,
                   help=f"{', '.join(a.CLI_DATASETS)} (default mnist1d; synthetic: Gaussian "
                        "blobs with 20 features and 3 classes; synthetic-images: generated "
                        "3×32×32 images, 10 classes, for resnet2d and vit)")
    p.add_argument("--samples", type=a.positive_int, default=None,
                   help=f"training examples the loss is averaged over, >= 1 (default "
                        f"{SAMPLES[0]}, {SAMPLES[1]} with --quick)")
    p.add_argument("--chart", default="none", type=a.chart_spec,
                   help="none | weightnorm | weightnorm:S (‖v‖ rescaled by S > 0) | scale:A "
                        "(A != 0)")
    p.add_argument("--metric", default="euclidean", type=a.metric_name,
                   help=f"metric in the original chart: {', '.join(METRIC_NAMES)}")
    p.add_argument("--damping", type=a.nonnegative_float, default=0.0,
                   help="λ >= 0 of Damped(G, λ, reference=Euclidean in w), pulled back with G "
                        "(default 0: no damping)")
    p.add_argument("--measures", default=DEFAULT_MEASURES,
                   help=f"comma-separated (default {DEFAULT_MEASURES}; also min_eig, "
                        "spectral_density; 'spectrum' with --method dense)")
    p.add_argument("--method", default="stochastic", choices=("stochastic", "dense"),
                   help="stochastic: matrix-free estimates with error bars (default); dense: "
                        "exact generalized eigenproblem, for small models")
    p.add_argument("--num-probes", type=a.at_least_two, default=None,
                   help=f"random probe vectors of the stochastic estimators, >= 2 (default "
                        f"{PROBES[0]}, {PROBES[1]} with --quick; ignored by --method dense)")
    p.add_argument("--slq-steps", type=a.positive_int, default=None,
                   help="Lanczos steps per probe of the stochastic logdet and spectral density, "
                        ">= 1 (default 40); raise it when logdet reports that Lanczos did not "
                        "resolve the small eigenvalues")
    p.add_argument("--in-chart", action="store_true",
                   help="compute the invariant measures with the chart's own Hessian and "
                        "metric products (slower; by default a pulled-back space is computed "
                        "in the original chart, where the tensor rules make it equal)")
    p.add_argument("--k", type=a.positive_int, default=5,
                   help="eigenvalues for top_eigs, >= 1 (default 5)")
    p.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda; under torchrun, cuda means cuda:LOCAL_RANK")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of a torchrun launch (`torchrun "
                        "--standalone --nproc-per-node N -m covariant flatness ...`; on under "
                        "torchrun even without this flag): each rank takes its share of the "
                        "examples, rank 0 prints and writes; every --method, and --metric "
                        "euclidean, ggn, fisher or empirical_fisher")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="torch.distributed backend under torchrun (default: gloo on CPU, nccl "
                        "with --device cuda)")


def resolve_quick(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--samples`` and ``--num-probes`` left unset: the full or the ``--quick``
    defaults (:data:`SAMPLES`, :data:`PROBES`)."""
    quick = int(bool(getattr(args, "quick", False)))
    if args.samples is None:
        args.samples = SAMPLES[quick]
    if args.num_probes is None:
        args.num_probes = PROBES[quick]
    return args
