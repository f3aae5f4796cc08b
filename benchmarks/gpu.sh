#!/usr/bin/env bash
# The scoring benchmarks on a GPU host that has no TensorFlow (JAX backend),
# in one run: the bundled model with and without reports, a heavier slice CNN,
# and series of many lengths. Each output is also written to $OUT (default .).
#
#   benchmarks/gpu.sh [WHEEL_DIR]
#
# SERIES (default 96: ~2-3 s rounds on an H200, where the pipeline's filling
# weighs less than in shorter ones) sets the 32-slice series scored per round,
# ONLY (an extended regular expression) the runs to make, e.g.
# ONLY='default|no-reports'.
#
# WHEEL_DIR (default .whl) holds wheels of the node's dependencies for the
# host's Python, made beforehand where the network is reachable, e.g. for
# Python 3.12 (add --python-version 3.12 --implementation cp --abi cp312
# --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 to each):
#
#   pip download --only-binary=:all: --no-deps -d .whl keras namex optree \
#       pydicom pynetdicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg \
#       pylibjpeg-rle pyjpegls sqlalchemy typing-extensions 'apscheduler<4' \
#       tzlocal highdicom pydantic pydantic-core annotated-types typing-inspection
#   pip download --only-binary=:all: --no-deps -d .whl/extra pyyaml pillow \
#       packaging absl-py rich markdown-it-py mdurl pygments h5py click tqdm
#
# Those in WHEEL_DIR are installed into a temporary folder, never into the
# host's Python; those in WHEEL_DIR/extra only where the host lacks the
# module. numpy, ml_dtypes and the backend (JAX or PyTorch) are the host's.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=${1:-.whl}
site=$(mktemp -d)
sampler=
trap 'rm -rf "$site"; [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true' EXIT
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
    for pair in yaml:pyyaml PIL:pillow packaging:packaging absl:absl_py rich:rich markdown_it:markdown_it_py \
        mdurl:mdurl pygments:pygments h5py:h5py click:click tqdm:tqdm; do
        python3 -c "import ${pair%%:*}" 2> /dev/null ||
            python3 -m pip install -qq --no-index --no-deps --target "$site" "$wheels/extra/${pair#*:}"-*.whl
    done
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false
# Anything missing ends the run here, in seconds, not in every benchmark.
python3 -c "import keras, ichnode.worker, training.phantoms; print('keras', keras.__version__, keras.backend.backend())"
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
# Helpers default to one per CPU but one; whether those CPUs are hyperthreads
# decides what each is worth.
{ echo "nproc $(nproc)"; lscpu | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))'; } | tee -a "$out/gpu.txt" || true
# How busy the GPU is through every run, twice a second: an idle GPU means
# the host side is the bound.
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$out/gpu-utilization.csv" &
    sampler=$!
fi

# Device time is short: the most telling run goes first, each is cut off
# after RUN_SECONDS (default 170), and a failed run is reported and the
# next one goes on.
failed=0
run() {
    local name=$1
    shift
    [[ $name =~ ${ONLY:-.} ]] || return 0
    echo "== $name: $* (from $(date +%T))"
    timeout -k 10 "${RUN_SECONDS:-170}" python3 "$@" 2>&1 | tee "$out/$name.txt" || { echo "== $name FAILED"; failed=1; }
}
run scoring-default benchmarks/scoring_throughput.py --series ${SERIES:-96} --batch-size 64 --repeat 2
# Thin-slice series: the reports' cost per series spread over 300 slices.
run scoring-long benchmarks/scoring_throughput.py --series 16 --slices 300 --batch-size 64 --repeat 2
run scoring-efficientnet benchmarks/scoring_throughput.py --series ${SERIES:-96} --batch-size 64 --repeat 2 --backbone EfficientNetB0
run scoring-no-reports benchmarks/scoring_throughput.py --series ${SERIES:-96} --batch-size 64 --repeat 2 --no-reports
# Without reports the worker's main process was the bound, sharing the CPUs
# with the helpers: the same run with a quarter of the CPUs left to it.
run scoring-no-reports-fewer-helpers benchmarks/scoring_throughput.py --series ${SERIES:-96} --batch-size 64 --repeat 2 \
    --no-reports --processes $(($(nproc) * 3 / 4))
# Every length as is compiles once per length (~0.35 s each on a CPU).
run sequence-lengths benchmarks/sequence_lengths.py --max 100
exit $failed
