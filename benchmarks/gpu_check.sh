#!/usr/bin/env bash
# The whole GPU check in one command, for a machine without registry access (see
# benchmarks/README.md, "The GPU check"):
#   1. install the carried wheels (.whl/*.whl: the peers and the test tools) into a target folder,
#      next to the machine's own torch, triton and transformers (--no-deps: nothing else changes);
#   2. benchmarks/gpu_check.py (correctness at real shapes, timings against the peers), bounded
#      by CHECK_SECONDS;
#   3. with the time left (TESTS_SECONDS), `pytest tests/ops tests/test_losses.py -k triton` on
#      the GPU.
# Everything lands in OUT (default benchmarks/results/gpu_check): gpu_check.json, gpu_check.md,
# check.log, tests.log, env.txt, install.log. Total under 8 minutes with the defaults.
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

timeout --kill-after=10 "$CHECK_SECONDS" python3 benchmarks/gpu_check.py --out "$OUT" "$@" \
    > "$OUT/check.log" 2>&1
check=$?
echo "gpu_check.py exit $check after $(( $(date +%s) - started )) s" | tee -a "$OUT/check.log"

timeout --kill-after=10 "$TESTS_SECONDS" python3 -m pytest tests/ops tests/test_losses.py -k triton \
    -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests=$?
echo "pytest exit $tests after $(( $(date +%s) - started )) s" | tee -a "$OUT/tests.log"
tail -3 "$OUT/tests.log"
exit $(( check != 0 ? check : tests ))
