#!/usr/bin/env bash
# BoundFlow on a CUDA GPU, in under 5 minutes, with no install step: python3 and torch (with
# CUDA) must be there; onnx, onnxruntime, pytest and pytest-xdist are used where present, and
# every step that lacks one says so (SKIPPED) instead of passing.
#
#   [BOUNDFLOW_SHARED=DIR] [OUT=DIR] bash scripts/gpu_check.sh
#
# DIR holds the reference data (golden/, golden_ops/, benchmarks/: a copy of the project's
# shared folder, e.g. carried to the GPU machine as an ignored folder of the repository);
# default: ../shared, else ./.shared. Results (bench JSONs, logs) go to $OUT (default: a new
# temporary folder). Steps:
#   1. tests/test_device.py (CUDA bounds equal the CPU's on the golden fixtures, sound_fp bounds
#      contain the samples, verify gives the expected verdicts on the GPU) and the golden tests
#      (tests/test_golden.py, tests/test_golden_ops.py), which run on the GPU as device "auto"
#      picks it;
#   2. a smoke run of `boundflow bounds --device cuda` and `boundflow verify --device cuda`;
#   3. python -m boundflow.bench.methods --device cuda --json beside the same on the CPU, and a
#      side-by-side table of their times and widths.
# Exit status: 0 when every step that ran passed, 1 otherwise (a SKIPPED step is not a pass:
# the summary lists it).
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
START=$SECONDS
SUMMARY=()
FAILED=0

note() { SUMMARY+=("$1"); echo "== $1"; }
step() {   # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
        note "PASS     $name ($((SECONDS - START)) s so far)"
    else
        note "FAIL     $name (see $OUT/$name.log)"
        FAILED=1
    fi
}

echo "== environment"
python3 - <<'EOF' | tee "$OUT/environment.txt"
import importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
print(f"cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
for name in ("onnx", "onnxruntime", "pytest", "xdist", "hypothesis", "numpy"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'MISSING'}")
EOF
has() { python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"; }

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "FAIL     torch sees no CUDA device: nothing here ran on a GPU"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi

SHARED="${BOUNDFLOW_SHARED:-}"
if [ -z "$SHARED" ]; then
    for d in "$REPO/../shared" "$REPO/.shared"; do
        [ -d "$d/golden" ] && SHARED="$(cd "$d" && pwd)" && break
    done
fi
HAVE_ONNX=1
has onnx || HAVE_ONNX=0
if [ "$HAVE_ONNX" = 0 ]; then
    note "SKIPPED  every step reading ONNX files: python package onnx is MISSING (BoundFlow imports it)"
fi
if [ -z "$SHARED" ] || [ ! -d "$SHARED/golden" ]; then
    note "SKIPPED  golden tests, smoke runs and benchmarks: no reference data (set BOUNDFLOW_SHARED)"
    SHARED=""
else
    export BOUNDFLOW_SHARED="$SHARED"      # the tests fail, not skip, on a missing fixture
fi

# 1. tests on the GPU
if [ "$HAVE_ONNX" = 1 ] && [ -n "$SHARED" ]; then
    if has pytest; then
        TESTS=(tests/test_device.py tests/test_golden.py tests/test_golden_ops.py)
        has onnxruntime || { note "SKIPPED  onnxruntime tests (verify, forward checks): onnxruntime MISSING";
                             TESTS+=(-k "not verify and not onnxruntime"); }
        PARALLEL=()
        has xdist && PARALLEL=(-n 8)
        # (two torch threads per worker: the CPU reference bounds of 8 workers share the cores)
        step tests 150 env OMP_NUM_THREADS=2 python3 -m pytest -q -rfs -p no:benchmark "${PARALLEL[@]}" "${TESTS[@]}"
    else
        note "SKIPPED  the pytest tests: pytest is MISSING"
    fi
fi

# 2. smoke runs of the command line on the GPU
if [ "$HAVE_ONNX" = 1 ] && [ -n "$SHARED" ]; then
    B="$SHARED/benchmarks/vnncomp2021"
    step bounds_cuda 30 python3 -m boundflow bounds "$B/mnistfc/mnist-net_256x2.onnx" \
        --vnnlib "$B/mnistfc/prop_0_0.03.vnnlib" --method alpha-crown --device cuda --json
    if has onnxruntime; then
        step verify_cuda 40 bash -c "python3 -m boundflow verify '$B/mnistfc/mnist-net_256x2.onnx' \
            '$B/mnistfc/prop_1_0.05.vnnlib' --timeout 30 --device cuda | tee /dev/stderr | grep -q '^violated' \
            && python3 -m boundflow verify '$B/acasxu/ACASXU_run2a_1_1_batch_2000.onnx' \
            '$B/acasxu/prop_3.vnnlib' --timeout 30 --device cuda | tee /dev/stderr | grep -q '^holds'"
    else
        note "SKIPPED  verify smoke run: onnxruntime is MISSING (it checks counterexamples)"
    fi
fi

# 3. bench.methods on the GPU beside the CPU
if [ "$HAVE_ONNX" = 1 ] && [ -n "$SHARED" ] && has onnxruntime; then
    MODELS=(mnist-net_256x2 mnist-net_256x6 cifar_base_kw resnet_block ACASXU_run2a_1_1_batch_2000)
    for dev in cuda cpu; do
        step "bench_$dev" 35 python3 -m boundflow.bench.methods --device "$dev" --quick --models "${MODELS[@]}" \
            --json "$OUT/bench_$dev.json"
    done
    if [ -f "$OUT/bench_cuda.json" ] && [ -f "$OUT/bench_cpu.json" ]; then
        python3 - "$OUT/bench_cpu.json" "$OUT/bench_cuda.json" <<'EOF' | tee "$OUT/bench_side_by_side.txt"
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
print(f"GPU: {gpu['config'].get('gpu')}; CPU: {cpu['machine']['cpu']}, {cpu['config']['threads']} thread(s)")
row = lambda r: (r["case"], r["method"])
g = {row(r): r for r in gpu["results"]}
print(f"{'case':50} {'method':12} {'cpu ms':>9} {'cuda ms':>9} {'speedup':>8} {'width cpu':>11} {'width cuda':>11}")
for r in cpu["results"]:
    o = g.get(row(r))
    if o is None:
        continue
    c, d = r["time_ms"]["median"], o["time_ms"]["median"]
    print(f"{r['case'][:50]:50} {r['method']:12} {c:9.2f} {d:9.2f} {c / d:8.2f} {r['mean_width']:11.6g} {o['mean_width']:11.6g}")
EOF
    fi
elif [ "$HAVE_ONNX" = 1 ] && [ -n "$SHARED" ]; then
    note "SKIPPED  bench.methods: onnxruntime is MISSING (its forward-pass baseline)"
fi

echo
echo "== summary ($((SECONDS - START)) s; logs and JSON in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
