#!/usr/bin/env bash
# GPU check of the GPU engine (issue 13) on one CUDA GPU (the lent H200: torch 2.11+cu130, Triton 3.6, nvcc 13, no
# package registry). Offline: runs from the tree (PYTHONPATH), or set INSTALL=1 for
# `pip install --no-deps --no-build-isolation -e .`; the native CPU library is built in place when a compiler exists.
#   scripts/device-check.sh            # < 8 minutes (every step time-boxed; the boxes add to ~700 s, runs ~6 min)
#   CHECK_TINY=1 scripts/device-check.sh   # the CPU-only parts here (interpreter, toy shapes; no GPU tests)
# Steps (13a): 1 env, 2 GPU tests (explicit test IDs: a missing pure-Python package cannot stop collection; then
#   tests/test_triton_decode_ops.py compiled on CUDA, its own time box), 3 Triton kernel GB/s vs HBM at V4-Flash shapes, 4 CUDA vs CPU equivalence, 5 launches/syncs per decode token,
#   6 peak VRAM vs plan, 7 the offload side (13b): arena pinning, pinned H2D peak and streaming fraction, the fused
#   decode hit path, streamed prefill through the stage, at V4-Flash expert shapes.
# JSON after every step: $OUT/device-check.json (or /tmp/homerun-device-check/) and, at the end of each step,
# benchmarks/results/device-<date>.json with the commit hash. Lines: PASS / FAIL / MISSED per step, a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TINY_FLAG=""
[[ "${CHECK_TINY:-0}" == 1 ]] && TINY_FLAG="--tiny"
RESULTS_DIR="${OUT:-${TMPDIR:-/tmp}/homerun-device-check}"
mkdir -p "$RESULTS_DIR" benchmarks/results
JSON="$RESULTS_DIR/device-check.json"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DATED="benchmarks/results/device-$(date +%Y-%m-%d).json"
[[ -n "$TINY_FLAG" ]] && DATED="$RESULTS_DIR/device-tiny.json"  # a CPU run is no device result to commit
rm -f "$JSON"
python - "$JSON" "$COMMIT" <<'PY'
import json, sys, time
json.dump({"commit": sys.argv[2], "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}, open(sys.argv[1], "w"))
PY
FAILURES=()
section() { printf '\n=== %s ===\n' "$*"; }
publish() { cp "$JSON" "$DATED" 2>/dev/null || true; }

# run_step NAME SECONDS: one homerun.bench.device_check step, its record shown, its goals as PASS/MISSED lines
run_step() {
  local name=$1 secs=$2
  timeout "$secs" python -m homerun.bench.device_check "$name" --out "$JSON" $TINY_FLAG
  local rc=$?
  python - "$JSON" "$name" "$rc" <<'PY'
import json, sys
doc, name, rc = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
rec = doc["steps"].get(name)
if rec is None:
    doc["steps"][name] = rec = {"ok": False, "error": "timed out" if rc == 124 else f"exit {rc}"}
    json.dump(doc, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: v for k, v in rec.items() if k != "goals"}, default=str)[:3000])
for goal, ok in (rec.get("goals") or {}).items():
    print(("PASS: " if ok else "INFO: " if ok is None else "MISSED: ") + goal)
print(("PASS: " if rec.get("ok") else "FAIL: ") + f"step {name}" + ("" if rec.get("ok") else f" ({rec.get('error')})"))
PY
  [[ $rc -ne 0 ]] && FAILURES+=("$name")
  publish
}

# record_tests NAME RC LOG: a pytest run's outcome merged into the JSON as a step (JSON after every step)
record_tests() {
  python - "$JSON" "$1" "$2" "$3" <<'PY'
import json, sys
doc, name, rc, log = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    tail = open(log).read().splitlines()[-3:]
except OSError:
    tail = []
doc["steps"][name] = {"ok": rc == 0, "error": None if rc == 0 else ("timed out" if rc == 124 else f"exit {rc}"),
                      "tail": tail}
json.dump(doc, open(sys.argv[1], "w"), indent=2)
PY
  publish
}

section "1/7 environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not available"
if [[ "${INSTALL:-0}" == 1 ]]; then
  timeout 120 python -m pip install -q --no-deps --no-build-isolation -e . || echo "INFO: editable install failed"
fi
if [[ -z "$TINY_FLAG" && -f setup.py ]] && command -v cc >/dev/null; then
  timeout 90 python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "INFO: native CPU library not built (CPU sets fall back to torch)"
fi
run_step env 30
if [[ -z "$TINY_FLAG" ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL: torch cannot see a CUDA device; nothing else can run"; exit 1
fi

section "2/7 GPU tests (explicit IDs)"
# -o addopts="": pytest-xdist (the default run's -n auto) may not be installed on the device, and one process is
# what a GPU test wants.
if [[ -z "$TINY_FLAG" ]]; then
  HR_TRITON_DEVICE=cuda timeout 100 python -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
    tests/test_triton_kernels.py tests/test_placement.py::test_cuda_and_standin_hops \
    tests/test_gpu_offload.py tests/test_gpu_decode.py tests/test_prefill_stream.py tests/test_arena.py \
    2>&1 | tee "$RESULTS_DIR/pytest-gpu.txt" | tail -15
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then echo "PASS: GPU tests"; else echo "FAIL: GPU tests (exit $rc)"; FAILURES+=("gpu tests"); fi
  record_tests gpu_tests "$rc" "$RESULTS_DIR/pytest-gpu.txt"
  # The decode-step fusions compiled for the GPU (the same file interprets on CPU); its own box: each case compiles.
  HR_TRITON_DEVICE=cuda timeout 90 python -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
    tests/test_triton_decode_ops.py 2>&1 | tee "$RESULTS_DIR/pytest-decode-ops.txt" | tail -5
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then echo "PASS: decode-op tests on CUDA"; else
    echo "FAIL: decode-op tests on CUDA (exit $rc)"; FAILURES+=("decode-op tests"); fi
  record_tests decode_op_tests "$rc" "$RESULTS_DIR/pytest-decode-ops.txt"
else
  echo "INFO: skipped (CHECK_TINY)"
fi

section "3/7 Triton kernels: GB/s vs HBM at V4-Flash shapes"
run_step kernels 80
section "4/7 CUDA vs CPU equivalence (tiny model, GPU path vs fp32 CPU reference)"
run_step equivalence 50
section "5/7 launches and host syncs per decode token"
run_step counts 40
section "6/7 peak VRAM vs plan"
run_step vram 40
section "6b/7 decode under CUDA graphs (all-VRAM tiny model: bit-equal to eager, step time both ways)"
run_step graphs 45
section "6c/7 hybrid decode under CUDA graphs (experts behind an 8-slot cache, eager between segments: bit-equal, step time)"
run_step graphs_hybrid 60
section "7/7 offload (issue 13b): arena pinning, pinned H2D and streaming, fused decode hit path, streamed prefill"
run_step offload 120

section "summary"
publish
echo "results: $JSON, $DATED (commit $COMMIT)"
if [[ ${#FAILURES[@]} -eq 0 ]]; then echo "ALL STEPS RAN"; exit 0; fi
echo "NOT PASSED: ${FAILURES[*]}"
exit 1
