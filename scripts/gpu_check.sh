#!/usr/bin/env bash
# Everything that needs a GPU, in one command of at most 9 minutes on one H200, from the project root:
#
#     scripts/gpu_check.sh OUTDIR              # on the GPU machine (sources .gpu/env.sh when it is there)
#     scripts/gpu_check.sh OUTDIR --dry-run    # the same plumbing on the CPU at tiny sizes (< 3 min)
#
# Steps, in order of importance, each under its own time limit (`timeout`), the run continuing past a failure:
#   pytest            python -m pytest -m gpu                 (tests/test_gpu.py and every other module using the
#                                                              gpu marker; JUnit XML in logs/pytest_gpu.xml)
#   bench_tp          scripts/bench_tp.py   -> tp_cuda         (the (L, C) cells of BENCHMARKS.md up to L = 4, E = 1e5,
#                                                              e3nn and cuEquivariance columns)
#   bench_conv        scripts/bench_conv.py -> conv_cuda       (fused convolution vs its DRAM floor and e3nn)
#   bench_md          scripts/bench_md.py   -> md_cuda         (864 and 4000 atoms, float32, every backend)
#   bench_md_float64  scripts/bench_md.py   -> md_float64_cuda (4000 atoms, float64, cp and grid)
#   bench_md_large    scripts/bench_md.py   -> md_large_cuda   (32000, 108000, 256000 atoms, float32, cp and grid)
#   profile_step      scripts/profile_step.py -> profile_cuda  (4000 atoms, cp and cg)
#   bench_neighbors   scripts/bench_neighbors.py -> neighbors_cuda (vesin's CUDA list vs ASE and torch-sim's)
#   bench_engines     scripts/bench_engines.py -> engines_cuda (an MD step: torch-sim vs tdn.dynamics.TorchDynamics)
# The MD steps carry the mace-torch columns (e3nn, cuEquivariance) when .gpu/env.sh exported MACE_REF.
#
# Results go to docs/benchmarks/<name>.{json,md,png} (a dry run writes to a scratch folder instead, names
# ending in _dryrun, and never touches docs/benchmarks). OUTDIR receives two files, rewritten after every step so
# that a run cut short still returns what it measured:
#   OUTDIR/summary.txt        one line per step: status (ok, failed, timeout, skipped), exit code, wall and budget
#   OUTDIR/gpu_check.tar.gz   summary.txt, logs/<step>.log, logs/pytest_gpu.xml, and the result files of this run
#                             (docs/benchmarks/... on a GPU, results/... in a dry run)
# Unpack it next to the project, e.g. `mkdir -p /tmp/gc && tar -xzf OUTDIR/gpu_check.tar.gz -C /tmp/gc`, then copy
# /tmp/gc/docs/benchmarks/* into docs/benchmarks/.
#
# The GPU machine reaches no package registry: build .gpu/ first with ../shared/tools/gpu_kit.sh, and write the
# commit for the summary when the copy sent there has no .git: `git rev-parse HEAD > .gpu/commit`.
# Environment: GPU_CHECK_BUDGET (seconds for the whole run; default 540, dry run 170), GPU_CHECK_DRY_SCALE (dry run:
# multiplies every step's limit; default 1), PYTHON (default python3).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }

OUT="" DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) usage ;;
    -*) echo "unknown option $arg" >&2; usage ;;
    *) [[ -z $OUT ]] || usage; OUT=$arg ;;
  esac
done
[[ -n $OUT ]] || usage

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # before leaving the caller's directory
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$SECONDS
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
STEPS=$WORK/steps.txt
mkdir -p "$LOGS"
touch "$WORK/.start" "$STEPS"
# Caches of this run: writable whatever HOME is, and shared by the steps (Triton compiles each kernel once).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton} MPLCONFIGDIR=$WORK/matplotlib PYTHONUNBUFFERED=1

SCALE=1
if ((DRY)); then
  TOTAL=${GPU_CHECK_BUDGET:-170}
  SCALE=${GPU_CHECK_DRY_SCALE:-1}  # step limits x SCALE: a dry run on a loaded machine (tests) needs more time
  RESULTS=$WORK/results
  SUFFIX=dryrun
else
  TOTAL=${GPU_CHECK_BUDGET:-540}
  RESULTS=docs/benchmarks
  SUFFIX=cuda
  unset TRITON_INTERPRET TDN_TEST_DEVICE  # kernels compiled for the GPU, GPU tests on the GPU
fi
mkdir -p "$RESULTS"
RESERVE=25  # seconds kept for a stopped step to finish (--kill-after) and for the last packing
MIN_STEP=5  # a step with less time than this left is skipped

# --------------------------------------------------------------------------------------------------- helpers
# Python with SIGTERM raised as KeyboardInterrupt: when `timeout` stops a step, pytest still writes its JUnit report
# and the benchmarks their tables of what was measured. TARGET is a script path or a module name.
LAUNCH='import runpy, signal, sys
signal.signal(signal.SIGTERM, signal.default_int_handler)
target = sys.argv[1]
sys.argv = sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)'
PYL=("$PY" -c "$LAUNCH")

record() {  # record NAME STATUS RC WALL BUDGET
  printf '%-17s %-8s %4s %7s %9s   logs/%s.log\n' "$1" "$2" "$3" "$4" "$5" "$1" >>"$STEPS"
}

commit() {
  if git rev-parse HEAD 2>/dev/null; then
    git diff --quiet HEAD -- 2>/dev/null || echo "(the working tree differs from it)"
  else
    cat .gpu/commit 2>/dev/null || echo unknown
  fi
}

write_summary() {
  {
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') mode=$( ((DRY)) && echo dry-run || echo gpu)"
    echo "commit: $(commit | tr '\n' ' ')"
    echo "host: $(hostname 2>/dev/null || echo '?'); $MACHINE"
    echo "budget: ${TOTAL} s; elapsed: $((SECONDS - START)) s"
    echo "mace reference: ${MACE_REF:-not set}"
    echo
    printf '%-17s %-8s %4s %7s %9s   %s\n' step status rc wall_s budget_s log
    cat "$STEPS"
  } >"$WORK/summary.txt"
}

pack() {  # summary and tarball, after every step
  write_summary
  local files=()
  while IFS= read -r -d '' f; do files+=("${f#"$ROOT"/}"); done \
    < <(find "$ROOT/$RESULTS" -maxdepth 1 -type f -newer "$WORK/.start" ! -name '*.tmp' -print0 2>/dev/null)
  if ((DRY)); then
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" summary.txt logs results
  elif ((${#files[@]})); then
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" summary.txt logs -C "$ROOT" "${files[@]}"
  else
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" summary.txt logs
  fi
  mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
}

step() {  # step NAME BUDGET_S COMMAND...: the command under `timeout`, output in logs/NAME.log
  local name=$1 budget=$(($2 * SCALE))
  shift 2
  local left=$((TOTAL - (SECONDS - START) - RESERVE))
  if ((budget > left)); then budget=$left; fi
  if ((budget < MIN_STEP)); then
    echo "skipped: ${left} s left of the ${TOTAL} s budget" >"$LOGS/$name.log"
    record "$name" skipped - 0 "$budget"
    pack
    return 0
  fi
  echo "[$((SECONDS - START)) s] $name (limit ${budget} s)"
  local t0=$SECONDS rc=0 status=ok
  timeout --signal=TERM --kill-after=15 "$budget" "$@" </dev/null >"$LOGS/$name.log" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$budget"
  echo "    $status (exit $rc, $((SECONDS - t0)) s)"
  pack
}

# --------------------------------------------------------------------------------------------------- environment
MACHINE="gpu: none"
if ((DRY)); then
  echo "dry run: .gpu/env.sh not sourced" >"$LOGS/env.log"
  record env skipped - 0 -
elif [[ -f .gpu/env.sh ]]; then
  t0=$SECONDS
  # shellcheck source=/dev/null
  if source .gpu/env.sh >"$LOGS/env.log" 2>&1; then rc=0; else rc=$?; fi
  record env "$( ((rc == 0)) && echo ok || echo failed)" "$rc" "$((SECONDS - t0))" -
else
  echo ".gpu/env.sh absent: running with the Python environment as it is" >"$LOGS/env.log"
  record env absent - 0 -
fi
if command -v nvidia-smi >/dev/null; then
  MACHINE="gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | head -n 1 || echo '?')"
fi
MACHINE="$MACHINE; $(timeout 60 "$PY" -c 'import sys, torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__}; cuda available: {torch.cuda.is_available()}")' \
  2>/dev/null || echo 'torch: not importable')"

MACE=(--references mace-e3nn mace-cueq)
if [[ -n ${MACE_REF:-} ]]; then
  MACE+=(--mace-pythonpath "$MACE_REF")
fi
# cuEquivariance for bench_tp's column, without the rest of the mace-torch folder (it pins an older e3nn)
TP_PATH=${PYTHONPATH:-}
if [[ -n ${MACE_REF:-} ]] && compgen -G "$MACE_REF/cuequivariance*" >/dev/null; then
  mkdir -p "$WORK/cueq"
  ln -s "$MACE_REF"/cuequivariance* "$WORK/cueq/"
  TP_PATH=${TP_PATH:+$TP_PATH:}$WORK/cueq
fi
pack

# --------------------------------------------------------------------------------------------------- steps
# -rfEsP: reasons of failures and skips, and the passed tests' output (the sync count); xunit1 keeps the properties
# the tests record (record_property) in the JUnit report.
# Only the modules that use the gpu marker are collected: a module elsewhere that fails to import must not hide
# the GPU tests' result.
PYTEST=(-m gpu -q -rfEsP -o junit_family=xunit1 -p no:cacheprovider --continue-on-collection-errors
  --junitxml="$LOGS/pytest_gpu.xml")
mapfile -t GPU_TESTS < <(grep -rlE --include='*.py' '\bmark\.gpu\b' tests | sort)
if ((DRY)); then
  # The GPU tests' bodies on the CPU (TDN_TEST_DEVICE=cpu), the kernel through Triton's interpreter, small cells only.
  step pytest 110 env TDN_TEST_DEVICE=cpu TRITON_INTERPRET=1 "${PYL[@]}" pytest "${PYTEST[@]}" \
    -k "not wide and not hub" "${GPU_TESTS[@]}"
  step bench_tp 40 "${PYL[@]}" scripts/bench_tp.py --device cpu --out "$RESULTS" --name "tp_$SUFFIX" \
    --lmax 1 --channels 4 --edges 64 --backends cp grid --references e3nn --warmup 0 --reps 1 --max-seconds 1 \
    --no-memory --threads 1
  step bench_conv 40 env TRITON_INTERPRET=1 "${PYL[@]}" scripts/bench_conv.py --device cpu --out "$RESULTS" \
    --name "conv_$SUFFIX" --lmax 1 --channels 4 --edges 64 --neighbors 8 --reps 1 \
    --impls "cp fused" "cp ref" "e3nn uvu"
  step bench_md 40 "${PYL[@]}" scripts/bench_md.py --device cpu --out "$RESULTS" --name "md_$SUFFIX" --quick \
    --sizes 32 --dtypes float32 --backends cp:shared --warmup 0 --reps 1 --max-seconds 1 "${MACE[@]}"
  step bench_md_float64 30 "${PYL[@]}" scripts/bench_md.py --device cpu --out "$RESULTS" \
    --name "md_float64_$SUFFIX" --quick --sizes 32 --dtypes float64 --backends cp:shared --engine-backends \
    --warmup 0 --reps 1 --references
  step bench_md_large 30 "${PYL[@]}" scripts/bench_md.py --device cpu --out "$RESULTS" \
    --name "md_large_$SUFFIX" --quick --sizes 108 --dtypes float32 --backends cp:shared --engine-backends \
    --warmup 0 --reps 1 --references
  step profile_step 30 "${PYL[@]}" scripts/profile_step.py --device cpu --out "$RESULTS" \
    --name "profile_$SUFFIX" --natoms 32 --preset tiny --backends cp:shared --reps 1
  step bench_neighbors 20 "${PYL[@]}" scripts/bench_neighbors.py --device cpu --out "$RESULTS" \
    --name "neighbors_$SUFFIX" --quick
  step bench_engines 30 "${PYL[@]}" scripts/bench_engines.py --device cpu --out "$RESULTS" \
    --name "engines_$SUFFIX" --quick
else
  step pytest 90 "${PYL[@]}" pytest "${PYTEST[@]}" "${GPU_TESTS[@]}"
  step bench_tp 90 env PYTHONPATH="$TP_PATH" "${PYL[@]}" scripts/bench_tp.py --device cuda --out "$RESULTS" \
    --name "tp_$SUFFIX" --pairs 1:128,2:128,3:128,3:64,4:64 --warmup 2 --reps 10 --max-seconds 1.5
  step bench_conv 50 "${PYL[@]}" scripts/bench_conv.py --device cuda --out "$RESULTS" \
    --name "conv_$SUFFIX" --reps 5
  step bench_md 90 "${PYL[@]}" scripts/bench_md.py --device cuda --out "$RESULTS" --name "md_$SUFFIX" \
    --sizes 864 4000 --dtypes float32 --warmup 2 --reps 8 --max-seconds 3 "${MACE[@]}"
  step bench_md_float64 45 "${PYL[@]}" scripts/bench_md.py --device cuda --out "$RESULTS" \
    --name "md_float64_$SUFFIX" --sizes 4000 --dtypes float64 --backends cp:shared grid \
    --warmup 1 --reps 5 --max-seconds 2 "${MACE[@]}"
  step bench_md_large 100 "${PYL[@]}" scripts/bench_md.py --device cuda --out "$RESULTS" \
    --name "md_large_$SUFFIX" --sizes 32000 108000 256000 --dtypes float32 --backends cp:shared grid --engine-backends \
    --warmup 0 --reps 3 --max-seconds 1 "${MACE[@]}"
  step profile_step 30 "${PYL[@]}" scripts/profile_step.py --device cuda --out "$RESULTS" \
    --name "profile_$SUFFIX" --natoms 4000 --backends cp:shared cp cg --reps 3
  step bench_neighbors 30 "${PYL[@]}" scripts/bench_neighbors.py --device cuda --out "$RESULTS" \
    --name "neighbors_$SUFFIX"
  step bench_engines 40 "${PYL[@]}" scripts/bench_engines.py --device cuda --out "$RESULTS" \
    --name "engines_$SUFFIX"
fi

pack
echo "[$((SECONDS - START)) s] wrote $OUT/summary.txt and $OUT/gpu_check.tar.gz"
cat "$OUT/summary.txt"
