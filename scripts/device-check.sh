#!/usr/bin/env bash
# GPU check of the GPU engine (issue 13 item 9) on one CUDA GPU: the lent H200/H100 (torch 2.11+cu130, Triton 3.6,
# nvcc 13, no package registry). Offline: runs from the tree (PYTHONPATH=repo root), or INSTALL=1 for
# `pip install --no-deps --no-build-isolation -e .`; the native CPU library (the hybrid path's CPU misses) is built
# in place first.
#   HOMERUN_COMMIT=<hash> scripts/device-check.sh   # on the device: < 8 minutes, one call (see the README)
#   CHECK_TINY=1 scripts/device-check.sh            # here: the same steps on a CPU stand-in, and the test IDs collected
# Every step is time-boxed, and no step starts past BUDGET_S (default 430 s) from the start: the cost model, pure
# arithmetic, runs last in at most 30 s, so the whole run ends in < 8 minutes. JSON after every step:
#   $OUT/device-<date>.json (the device tool brings $OUT back; commit it as benchmarks/results/device-<date>.json)
# also copied to benchmarks/results/ when not CHECK_TINY. The commit: $HOMERUN_COMMIT, else `git rev-parse HEAD`
# (the device's copy of the tree has no .git). Lines: PASS / FAIL / MISSED / SKIP per step, a summary last.
# Steps, in order of what the closing note needs most (box, seconds):
#   1 build (60) + env (30)   2 kernels: FP8/FP4 GB/s vs HBM copy (60)   3 offload: pinned H2D peak, streaming
#   fraction, fused hit path, staged prefill (60)   4 graphs: whole-step vs piecewise vs eager, all-VRAM (45)
#   5 graphs_hybrid (40)   6 mixed_spec: waits per token, speculation on/off (30)   7 capped: synthetic V4-Flash
#   N=2 layers, VRAM cut to the 32 GB card's cache share, decode + prefill 2K/8K + peak VRAM vs plan (180)
#   8 vram (25)   9 counts (25)   10 equivalence (30)   11 GPU tests by explicit ID, three processes (45+60+60)
#   12 cost model: per-token kernel/copy/CPU/launch time, projected rtx5090-192gb tok/s (30, always)
# ONLY="step ..." reruns some steps (names as in the JSON: capped, tests_kernels, ...) into device-<date>-rerun.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TINY=0; TINY_FLAG=""
if [[ "${CHECK_TINY:-0}" == 1 ]]; then TINY=1; TINY_FLAG="--tiny"; fi
BUDGET_S=${BUDGET_S:-430}
BOX_SCALE=1
if [[ $TINY == 1 ]]; then BUDGET_S=${TINY_BUDGET_S:-1500}; BOX_SCALE=4; fi  # the interpreter is slow; nothing is timed
RESULTS_DIR="${OUT:-${TMPDIR:-/tmp}/homerun-device-check}"
mkdir -p "$RESULTS_DIR"
DATE=$(date -u +%Y-%m-%d)
JSON="$RESULTS_DIR/device-$DATE.json"
[[ $TINY == 1 ]] && JSON="$RESULTS_DIR/device-tiny.json"  # a CPU run is no device result to commit
[[ -n "${ONLY:-}" ]] && JSON="${JSON%.json}-rerun.json"  # a partial rerun never overwrites the full run
COMMIT=${HOMERUN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# On the device the whole log comes back with $OUT too (output_tail holds only its end).
[[ -n "${OUT:-}" ]] && exec > >(tee "$RESULTS_DIR/device-check.log") 2>&1
[[ $COMMIT == unknown ]] && echo "INFO: no commit known: pass HOMERUN_COMMIT=\$(git rev-parse HEAD) from the caller"
rm -f "$JSON"
python - "$JSON" "$COMMIT" "$TINY" <<'PY'
import json, sys, time
json.dump({"commit": sys.argv[2], "tiny": sys.argv[3] == "1", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
           time.gmtime()), "steps": {}}, open(sys.argv[1], "w"), indent=2)
PY
FAILURES=()
section() { printf '\n=== %s (t=%ss) ===\n' "$*" "$SECONDS"; }
publish() { [[ $TINY == 1 ]] || { mkdir -p benchmarks/results && cp "$JSON" benchmarks/results/ 2>/dev/null; } || true; }

# box SECS: the step's time box, cut to what is left of BUDGET_S (0: skip the step)
box() {
  local want=$(($1 * BOX_SCALE)) left=$((BUDGET_S - SECONDS))
  if (( left < 5 )); then echo 0; elif (( want < left )); then echo "$want"; else echo "$left"; fi
}

# record NAME RECORD_JSON: merge a record into the results (steps the Python module does not write itself)
record() {
  python - "$JSON" "$1" "$2" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
doc["steps"][sys.argv[2]] = json.loads(sys.argv[3])
json.dump(doc, open(sys.argv[1], "w"), indent=2)
PY
  publish
}

# ONLY="capped kernels tests_offload ...": run just those steps (a rerun of what failed in the time left)
wanted() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }

# run_step NAME SECONDS: one homerun.bench.device_check step, its record shown, its goals as PASS/MISSED lines
run_step() {
  local name=$1 secs rc
  wanted "$name" || return 0
  secs=$(box "$2")
  if [[ $secs == 0 ]]; then echo "SKIP: step $name (budget spent)"; record "$name" '{"ok": false, "error": "skipped: budget spent"}'; FAILURES+=("$name"); return; fi
  timeout -k 5 "$secs" python -m homerun.bench.device_check "$name" --out "$JSON" $TINY_FLAG
  rc=$?
  python - "$JSON" "$name" "$rc" "$secs" <<'PY'
import json, sys
doc, name, rc = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
rec = doc["steps"].get(name)
if rec is None:
    doc["steps"][name] = rec = {"ok": False, "error": f"timed out after {sys.argv[4]} s" if rc in (124, 137)
                                else f"exit {rc}"}
    json.dump(doc, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: v for k, v in rec.items() if k != "goals"}, default=str)[:2500])
for goal, ok in (rec.get("goals") or {}).items():
    print(("PASS: " if ok else "INFO: " if ok is None else "MISSED: ") + goal)
print(("PASS: " if rec.get("ok") else "FAIL: ") + f"step {name}" + ("" if rec.get("ok") else f" ({rec.get('error')})"))
PY
  [[ $rc -ne 0 ]] && FAILURES+=("$name")
  publish
}

# run_tests NAME SECONDS ENV... -- PYTEST_ARGS...: one pytest process (its own log under $RESULTS_DIR), recorded
run_tests() {
  local name=$1 secs rc envs=() log="$RESULTS_DIR/pytest-$1.txt"
  wanted "tests_$name" || return 0
  secs=$(box "$2"); shift 2
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  if [[ $secs == 0 ]]; then echo "SKIP: tests $name (budget spent)"; record "tests_$name" '{"ok": false, "error": "skipped: budget spent"}'; FAILURES+=("tests $name"); return; fi
  # -o addopts="": no xdist (-n auto) and no default -m filter; one process is what a GPU test wants. TRITON_INTERPRET
  # unset: the kernels compile for the GPU (the stand-in test files that set it are CI's, not run here).
  env -u TRITON_INTERPRET ${envs[@]+"${envs[@]}"} timeout -k 5 "$secs" python -m pytest -q -p no:cacheprovider -o addopts="" \
    -rfE "$@" >"$log" 2>&1
  rc=$?
  tail -4 "$log"
  python - "$JSON" "$name" "$rc" "$log" <<'PY'
import json, re, sys
doc, name, rc, log = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = open(log, errors="replace").read().splitlines()
failed = [l for l in lines if l.startswith(("FAILED", "ERROR"))][:20]
summary = next((l for l in reversed(lines) if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", l)), None)
doc["steps"]["tests_" + name] = {"ok": rc == 0, "error": None if rc == 0 else ("timed out" if rc in (124, 137)
                                 else f"exit {rc}"), "summary": summary, "failed": failed}
json.dump(doc, open(sys.argv[1], "w"), indent=2)
PY
  if [[ $rc -eq 0 ]]; then echo "PASS: tests $name"; else echo "FAIL: tests $name (exit $rc)"; FAILURES+=("tests $name"); fi
  publish
}

# The GPU tests, by explicit ID (a missing pure-Python package can't stop collection of the others). Each file here
# is CUDA-aware: test_triton_kernels / test_triton_decode_ops compile the kernels on CUDA with HR_TRITON_DEVICE=cuda;
# the others skip without CUDA.
KERNEL_TESTS=(tests/test_triton_kernels.py)
DECODE_OP_TESTS=(tests/test_triton_decode_ops.py)
OFFLOAD_TESTS=(tests/test_gpu_offload.py tests/test_arena.py tests/test_host_store.py
  tests/test_placement.py::test_cuda_and_standin_hops tests/test_context.py::test_kv_on_gpu_or_host_gives_the_same_logits)

section "1/12 build and environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "INFO: no nvidia-smi"
if [[ "${INSTALL:-0}" == 1 ]]; then
  timeout 120 python -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "INFO: editable install failed (running from the tree)"
fi
if [[ $TINY == 0 ]]; then
  timeout -k 5 60 python setup.py -q build_ext --inplace >"$RESULTS_DIR/build.txt" 2>&1 \
    && echo "PASS: native CPU library built in place" || echo "INFO: native CPU library not built (CPU misses fall back to torch; see build.txt)"
fi
run_step env 30
if [[ $TINY == 0 ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL: torch cannot see a CUDA device; nothing else can run"; exit 1
fi
if [[ $TINY == 1 ]]; then  # a wrong test ID would waste the device session: collect every one here
  if env -u TRITON_INTERPRET python -m pytest --collect-only -q -p no:cacheprovider -o addopts="" \
      "${KERNEL_TESTS[@]}" "${DECODE_OP_TESTS[@]}" "${OFFLOAD_TESTS[@]}" >"$RESULTS_DIR/collect.txt" 2>&1; then
    echo "PASS: every GPU test ID collects ($(tail -1 "$RESULTS_DIR/collect.txt"))"
  else
    echo "FAIL: GPU test IDs do not collect (see $RESULTS_DIR/collect.txt)"; FAILURES+=("test ids")
  fi
fi

section "2/12 Triton kernels: GB/s vs HBM at V4-Flash shapes"
run_step kernels 60
section "3/12 offload: pinned H2D peak and streaming fraction, fused hit path, staged prefill (V4-Flash experts)"
run_step offload 60
section "4/12 all-VRAM decode: whole-step graph vs piecewise vs eager (tok/s, launches, replays per token)"
run_step graphs 45
section "5/12 hybrid decode under graphs (8-slot cache, CPU misses, routed calls eager between segments)"
run_step graphs_hybrid 40
section "6/12 mixed-plan speculation (1 resident + 2 cached layers, all hits): waits per token"
run_step mixed_spec 30
section "7/12 capped hybrid: synthetic V4-Flash layers, VRAM cut to a 32 GB card's share; decode, prefill 2K/8K, peak VRAM vs plan"
run_step capped 180
section "8/12 peak VRAM vs plan (tiny model, all-VRAM)"
run_step vram 25
section "9/12 launches and host syncs per decode token (eager forward)"
run_step counts 25
section "10/12 CUDA vs CPU equivalence (tiny model, GPU path vs fp32 CPU reference)"
run_step equivalence 30
section "11/12 GPU tests (explicit IDs)"
if [[ $TINY == 0 ]]; then
  run_tests decode_ops 45 HR_TRITON_DEVICE=cuda -- "${DECODE_OP_TESTS[@]}"
  run_tests offload 60 -- "${OFFLOAD_TESTS[@]}"
  run_tests kernels 60 HR_TRITON_DEVICE=cuda -- "${KERNEL_TESTS[@]}"
else
  echo "INFO: skipped (CHECK_TINY: CI runs these files on stand-ins)"
fi

section "12/12 cost model: per-token parts and the projected rtx5090-192gb tok/s"
timeout -k 5 30 python -m homerun.bench.cost_model --doc "$JSON" || FAILURES+=("cost model")
python - "$JSON" <<'PY'
import json, sys
cm = json.load(open(sys.argv[1])).get("cost_model") or {}
if cm.get("projected_tok_s"):
    t = cm["per_token_s"]
    print("per token (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()))
    print(f"projected {cm['profile']}: {cm['projected_tok_s']:.1f} tok/s (plan {cm['plan_tok_s']:.1f}, "
          f"KTransformers {cm['ktransformers_tok_s']:.0f}+); upper bound {cm['upper_bound_tok_s']:.1f}")
    for a in cm["assumptions"]:
        print("  assumes: " + a)
else:
    print(f"FAIL: cost model ({cm.get('error')})")
PY
publish

section "summary"
echo "results: $JSON (commit $COMMIT, ${SECONDS}s)"
if [[ ${#FAILURES[@]} -eq 0 ]]; then echo "ALL STEPS RAN"; exit 0; fi
echo "NOT PASSED: ${FAILURES[*]}"
exit 1
