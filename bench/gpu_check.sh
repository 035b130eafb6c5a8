#!/usr/bin/env bash
# Every GPU check of the project in one run: the gpu tests, then the kernel, end-to-end merge and sampler benches.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (H200): about 8 minutes at most
#   bash bench/gpu_check.sh --dry           # on any CPU: the same entry points at tiny sizes, CUDA steps skipped
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Options: --dry (implies --no-install), --no-install (skip `pip install --no-deps -e .`).
# Environment: OUT (default ./gpu-check-out), PYTHON (default python, else python3), GPU_CHECK_SCRATCH (where the
# merge bench builds its 4 GB pair; default ${TMPDIR:-/tmp}/apo-gpu-check), GPU_CHECK_WHEELS (a folder of wheels
# installed with --no-index when pytest or blake3 is missing; default ./gpu-wheels).
#
# Each step runs under its own `timeout` (the limits add up to 480 s), is timed, and may fail without stopping the
# rest. Writes OUT/gpu_check.log (everything), OUT/STEP.log per step, the benches' JSON files and OUT/summary.json
# (per step: name, command, status, exit status, seconds, key figures; the issue's targets: target, measured,
# met). Exit status: 0 when every step passed or was skipped with a reason, 1 when one failed or timed out.
# Every step runs the project from this checkout (PYTHONPATH), so a failed install does not stop the others.
set -u

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
INSTALL=1
for arg in "$@"; do
    case "$arg" in
        --dry) DRY=1 INSTALL=0 ;;
        --no-install) INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$arg'; use --dry, --no-install or --help" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/gpu-wheels}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU run, also on a machine with a GPU
    SCRATCH=${GPU_CHECK_SCRATCH:-$OUT/scratch}
else
    SCRATCH=${GPU_CHECK_SCRATCH:-${TMPDIR:-/tmp}/apo-gpu-check}
fi
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.tsv
: >"$LOG"
: >"$STEPS"
rm -f "$OUT"/{env,kernel,merge_e2e,trainer_phases,summary}.json "$OUT/pytest.xml"  # no figures from an earlier run

say() { echo "$*" | tee -a "$LOG"; }

# record NAME STATUS RC SECONDS REASON COMMAND  (tab-separated; gpu_check.py turns it into JSON)
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STEPS"; }

# step NAME TIMEOUT_S COMMAND...: run it under timeout, output to OUT/NAME.log, the log and stdout.
step() {
    local name=$1 limit=$2 start rc status seconds
    shift 2
    say ""
    say "== $name (timeout ${limit} s): $*"
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    tail -n 5 "$OUT/$name.log"
    say "== $name: $status (exit $rc) in $seconds s"
    record "$name" "$status" "$rc" "$seconds" "" "$*"
}

# skip NAME REASON COMMAND...: record a step that did not run, and why.
skip() {
    local name=$1 reason=$2
    shift 2
    say ""
    say "== $name: skipped: $reason"
    record "$name" skipped "" 0 "$reason" "$*"
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# limit REAL DRY: a timeout. The real limits add up to 480 s (an H200); the dry ones allow for a busy CI machine.
limit() { if [ "$DRY" = 1 ]; then echo "$2"; else echo "$1"; fi; }

say "gpu_check: $(date -u +%FT%TZ), repo $REPO, out $OUT, python $PY, dry=$DRY"

# 0. install the project and describe the machine
if [ "$INSTALL" = 1 ]; then
    # --no-build-isolation: no network for setuptools; the torch wheel already brought it.
    step install 30 "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
    for pkg in pytest blake3; do  # blake3: the output hash, a dependency the GPU machine's image may lack
        if ! has "$pkg" && [ -d "$WHEELS" ]; then
            step "install-$pkg" 10 "$PY" -m pip install --no-index --find-links "$WHEELS" --no-input "$pkg"
        fi
    done
else
    skip install "--dry or --no-install: runs from the checkout (PYTHONPATH), the environment is left as it is" \
        "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
step env "$(limit 30 120)" "$PY" bench/gpu_check.py env "$OUT/env.json"

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 1 ]; then
    NO_CUDA="--dry: the CPU run"
else
    NO_CUDA="no CUDA device (torch.cuda.is_available() is False); bench/gpu_check.sh --dry runs the CPU parts"
fi

# 1. the gpu tests (only the files holding them: collection stays fast, and hypothesis is not needed)
GPU_TESTS=$(grep -rl --include='test_*.py' 'mark.gpu' tests | sort | tr '\n' ' ')
PYTEST=("$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" $GPU_TESTS)
if [ "$CUDA" != 1 ]; then
    skip pytest-gpu "$NO_CUDA: every gpu test would skip" "${PYTEST[@]}"
elif ! has pytest; then
    say "pytest is not installed and there is no network: put its wheels in $WHEELS (see docs/gpu.md)"
    record pytest-gpu failed "" 0 "pytest is not installed (no network): put its wheels in gpu-wheels/" "${PYTEST[*]}"
else
    step pytest-gpu 100 "${PYTEST[@]}"
fi

# 2. the kernel: fused vs torch.lerp vs a device copy on 2**30 bf16 elements, the 8B-shaped set, in place
if [ "$DRY" = 1 ]; then
    step kernel 180 "$PY" bench/kernel.py --no-cuda --cpu-numel 65536 --reps 1 --json "$OUT/kernel.json"
elif [ "$CUDA" = 1 ]; then
    step kernel 60 "$PY" bench/kernel.py --no-cpu --json "$OUT/kernel.json"
else
    skip kernel "$NO_CUDA" "$PY" bench/kernel.py --no-cpu --json "$OUT/kernel.json"
fi

# 3. end-to-end merge, about 4 GB per side, read cold: floor, tuned floor, apo-merge on the CPU and on CUDA
MERGE=("$PY" bench/merge_e2e.py --methods floor,floor-tuned,apo-cpu,apo-cuda --scratch "$SCRATCH"
    --json "$OUT/merge_e2e.json")
if [ "$DRY" = 1 ]; then
    step merge-e2e 240 "${MERGE[@]}" --shape tiny --size 0.002 --runs 1
elif [ "$CUDA" = 1 ]; then
    step merge-e2e 130 "${MERGE[@]}" --size 4 --runs 2
else
    skip merge-e2e "$NO_CUDA" "${MERGE[@]}" --size 4 --runs 2
fi

# 4. the sampler: plain generate vs the compiled static cache, TinyLlama-1.1B-shaped (random init, no download)
TRAINER=("$PY" bench/trainer_phases.py --json "$OUT/trainer_phases.json")
if [ "$DRY" = 1 ]; then
    step trainer-phases 240 "${TRAINER[@]}" --shape tiny --rounds 1 --prompts-per-round 4 --k 2 \
        --max-new-tokens 4 --generation-batch-size 8 --batch-size 2
elif [ "$CUDA" = 1 ]; then
    step trainer-phases 120 "${TRAINER[@]}" --shape tinyllama --sampling-only
else
    skip trainer-phases "$NO_CUDA" "${TRAINER[@]}" --shape tinyllama --sampling-only
fi

say ""
"$PY" bench/gpu_check.py summary "$OUT" "$DRY" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
