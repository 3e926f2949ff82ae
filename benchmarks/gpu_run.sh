#!/usr/bin/env bash
# The GPU rows in one short run (issues 12 and 13), on a machine with CUDA and no network.
#
# Peers and cached data travel with the checkout in .gpu/ (ignored by git):
#   .gpu/site   pure-Python peers copied from a machine where benchmarks/install_peers.sh ran
#               (curvlinops, backpack, einconv, unfoldNd, pyhessian, laplace, asdl, mnist1d)
#   .gpu/cache  ~/.cache/covariant-bench: MNIST-1D and the briefly trained benchmark models
# Usage: OUT=results_dir bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD/src:$PWD/.gpu/site XDG_CACHE_HOME=$PWD/.gpu/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, covariant; print('torch', torch.__version__, 'covariant', covariant.__version__)"
timeout 100 python3 benchmarks/gpu_checks.py --out "$OUT/gpu_checks_cuda.json"
timeout 150 python3 benchmarks/bench_kfac.py --device cuda --repeats 3 --laplace-threads 16 \
    --out "$OUT/kfac_cuda.json"
timeout 200 python3 benchmarks/bench_flatness.py --device cuda --only a,b,c,d,e \
    --models mlp-80k,cnn-1m,resnet20-bn,vit-small --out "$OUT/flatness_cuda.json"
