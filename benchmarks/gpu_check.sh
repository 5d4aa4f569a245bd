#!/usr/bin/env bash
# The whole GPU check in one command, for a machine without registry access (see
# benchmarks/README.md, "The GPU check"):
#   1. install the carried wheels (.whl/*.whl: the peers and the test tools) into a target folder,
#      next to the machine's own torch, triton and transformers (--no-deps: nothing else changes);
#   2. benchmarks/gpu_check.py, i.e. python -m solopo_kernels.doctor (dispatch, correctness against
#      float64 at real shapes, timings against the peers), bounded by CHECK_SECONDS;
#   3. with the time left (TESTS_SECONDS), `pytest tests/ops tests/test_losses.py -k triton` on
#      the GPU.
# Everything lands in OUT (default benchmarks/results/gpu_check): one folder per shape NxHxV with
# gpu_check.json and gpu_check.md, NxHxV.log, check.log, tests.log, env.txt, install.log. Under 8
# minutes in all with the defaults.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
SITE=${SITE:-/tmp/solopo-site}
CHECK_SECONDS=${CHECK_SECONDS:-330}
TESTS_SECONDS=${TESTS_SECONDS:-110}
mkdir -p "$OUT"
started=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl > "$OUT/install.log" 2>&1; then
        # No pip: the carried wheels are all pure Python, so unpacking them is an install.
        python3 -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob('.whl/*.whl')]" "$SITE" >> "$OUT/install.log" 2>&1
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -m pip list --path "$SITE" 2>/dev/null
} > "$OUT/env.txt" 2>&1

# One process per shape: a peer that corrupts the CUDA context (or a hang) costs one shape, not
# the run. The Triton cache on disk carries compiled kernels and tuned configs from one to the
# next; the first shape gets the compilation time on top of its share.
SHAPES=${SHAPES:-"8192x4096x128256 8192x3584x152064 16384x4096x128256"}
count=$(echo $SHAPES | wc -w)
deadline=$(( started + CHECK_SECONDS ))
check=0
first=1
for shape in $SHAPES; do
    left=$(( deadline - $(date +%s) ))
    limit=$(( first && count > 1 ? left * 2 / (count + 1) : left / count ))
    count=$(( count - 1 ))
    first=0
    if [ "$limit" -lt 30 ]; then
        echo "$shape: skipped, out of time" | tee -a "$OUT/check.log"; check=1; continue
    fi
    timeout --kill-after=10 "$limit" python3 benchmarks/gpu_check.py --shapes "$shape" \
        --out "$OUT/$shape" "$@" > "$OUT/$shape.log" 2>&1
    code=$?
    [ "$code" -ne 0 ] && check=1
    echo "$shape: gpu_check.py exit $code after $(( $(date +%s) - started )) s (limit $limit s)" \
        | tee -a "$OUT/check.log"
done

timeout --kill-after=10 "$TESTS_SECONDS" python3 -m pytest tests/ops tests/test_losses.py -k triton \
    -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests=$?
echo "pytest exit $tests after $(( $(date +%s) - started )) s" | tee -a "$OUT/tests.log"
tail -3 "$OUT/tests.log"
exit $(( check != 0 ? check : tests ))
