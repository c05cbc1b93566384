#!/usr/bin/env bash
# The GPU check as one prepared command (README, "Training on a GPU").
#
#   bash bench/gpu.sh prepare        # here, on the CPU machine: fill .gpu/ (git-ignored, <= 60 MiB)
#   bash bench/gpu.sh run [OUT]      # on the GPU machine, with .gpu carried: a budget of 8 minutes
#   bash bench/gpu.sh smoke [OUT]    # here: every step of `run` at toy sizes on the CPU, < 3 minutes
#
# The GPU machine has Python 3.12, JAX, PyTorch and CUDA but no TensorFlow and no network, and
# only the working tree travels there (../shared stays behind). So `prepare` brings the keras,
# namex and optree wheels, the ISIC 2018 pairs resized to 256 px, the 12 full-resolution ISIC
# 2017 pairs and the PyTorch peer into .gpu/ (from ../shared, which `prepare` needs: set SHARED
# otherwise). `run` writes OUT/gpu.json (every figure, rewritten after each stage), OUT/gpu.log,
# OUT/runs.tar.gz and the converged OUT/best.keras.part0..2: 6 files, under the 8 that come back.
# OUT defaults to $GPU_BENCH_OUT, else gpu-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
SHARED=${SHARED:-../shared}
PY=${PYTHON:-python3}
cmd=${1:-}
OUT=${2:-${GPU_BENCH_OUT:-gpu-out}}

case "$cmd" in
prepare)
    [ -d "$SHARED/data/isic2018" ] || { echo "error: $SHARED/data/isic2018: not found; prepare copies the real data from ../shared (set SHARED=... to point elsewhere)" >&2; exit 2; }
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/whl" "$GPU_DIR/data" "$GPU_DIR/peer"
    # The versions this repo is tested with: keras from requirements.txt, its two pure helpers
    # as installed here.
    keras=$(sed -n 's/^keras==\([^ ]*\).*/\1/p' requirements.txt)
    namex=$($PY -c 'import importlib.metadata as m; print(m.version("namex"))')
    optree=$($PY -c 'import importlib.metadata as m; print(m.version("optree"))')
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU_DIR/whl" "keras==$keras" "namex==$namex" "optree==$optree"
    $PY bench/gpu_bench.py prepare-data "$SHARED/data/isic2018" "$GPU_DIR/data/isic2018" --size 256
    cp -r "$SHARED/data/isic2017-fullres" "$GPU_DIR/data/isic2017-fullres"
    cp "$SHARED/bench/torch_unet_peer.py" "$GPU_DIR/peer/"
    # Bytes, not disk blocks: what travels is the files' contents (2075 small masks fill 8 MiB of blocks).
    size=$(du -s --apparent-size --block-size=1M "$GPU_DIR" | cut -f1)
    du -sh --apparent-size "$GPU_DIR"/whl "$GPU_DIR"/data/* "$GPU_DIR"/peer
    if [ "$size" -gt 60 ]; then echo "error: $GPU_DIR: $size MiB, over the 60 MiB that may travel" >&2; exit 1; fi
    echo "ready: $GPU_DIR ($size MiB). On the GPU machine, carry [\"$GPU_DIR\"] and run:"
    echo '    bash bench/gpu.sh run "$OUT"'
    ;;
run|smoke)
    mkdir -p "$OUT"
    export GPU_BENCH_T0=$(date +%s)  # the 8-minute budget counts from here, the peer included
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
    # JAX grabs 75% of the GPU's memory per process by default; the benchmark's own process still
    # holds that while train.py runs in a child, whose allocator then retries (and logs) ever smaller grabs.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    # The same train step is compiled in several processes (train.py's run, the step stage, the
    # converged run): JAX's persistent cache lets a later one reuse an earlier compile.
    export JAX_COMPILATION_CACHE_DIR="$WORK/jax-cache"
    if [ "$cmd" = run ]; then
        [ -d "$GPU_DIR/data/isic2018" ] || { echo "error: $GPU_DIR/data/isic2018: missing; run 'bash bench/gpu.sh prepare' first and carry $GPU_DIR" >&2; exit 2; }
        if ! $PY -c 'import keras' 2>/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$GPU_DIR"/whl/*.whl
            export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        fi
        data="$GPU_DIR/data/isic2018" fullres="$GPU_DIR/data/isic2017-fullres" tiny=()
        peer_script="$GPU_DIR/peer/torch_unet_peer.py"
    else
        # The smoke checks that every step runs, not how fast: XLA's CPU back end would spend most
        # of a toy run optimizing code that runs for milliseconds.
        export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
        $PY bench/gpu_bench.py smoke-data "$WORK/data" > /dev/null
        data="$WORK/data/isic2018" fullres="$WORK/data/isic2017-fullres" tiny=(--tiny)
        peer_script="$SHARED/bench/torch_unet_peer.py"
    fi
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ gpu.sh $cmd"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
        # The peer first, in its own process: torch and JAX each reserve the GPU's memory.
        $PY bench/gpu_bench.py peer --out "$WORK/peer.json" --script "$peer_script" "${tiny[@]}"
        $PY bench/gpu_bench.py run --data "$data" --fullres "$fullres" --out "$OUT" --work "$WORK" \
            --peer "$WORK/peer.json" "${tiny[@]}"
    } 2>&1 | tee "$OUT/gpu.log"
    ;;
*)
    echo "usage: bash bench/gpu.sh prepare | run [OUT] | smoke [OUT]" >&2
    exit 2
    ;;
esac
