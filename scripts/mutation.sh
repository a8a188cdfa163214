#!/usr/bin/env bash
# Mutation testing of the numeric and policy core (issue 20) with mutmut 3 (`pip install mutmut==3.8.1`).
# Each module runs in its own scratch copy of REV (git archive), never in the work tree; mutmut copies the copy
# again into mutants/ and runs only the tests that cover each mutated function.
#
#   scripts/mutation.sh                     # all modules: quant sampling policies cache speed attention
#   scripts/mutation.sh sampling cache      # some of them
#   REV=HEAD~3 WORK=/tmp/mut-before scripts/mutation.sh quant
#   SKIP_TESTS="tests/test_quant_edges.py" scripts/mutation.sh quant   # the kill rate without a test file
#
# Prints one line per module: killed / total mutants and the kill rate, and writes WORK/MODULE/results.txt (every
# mutant's status; `cd WORK/MODULE && mutmut show NAME` prints a mutant's diff). benchmarks/mutation.md has figures.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
REV="${REV:-HEAD}"
WORK="${WORK:-/tmp/homerun-mutation}"
MUTMUT="${MUTMUT:-mutmut}"
MAX_CHILDREN="${MAX_CHILDREN:-$(nproc)}"
export OMP_NUM_THREADS=1

# module -> file to mutate | test files (space separated) | mutant-name globs ("" = every mutant of the file)
# | a pytest -k expression leaving out slow tests that exercise no mutated function
# | python run once in mutmut's fork server (a pytest plugin, mutation_warm.py), so that each mutant's child does
#   not redo the imports and caches that cost seconds
declare -A FILE TESTS NAMES SELECT WARM
FILE[quant]=homerun/formats/quant.py;     TESTS[quant]="tests/test_quant.py tests/test_quant_edges.py"
FILE[sampling]=homerun/engine/sampling.py; TESTS[sampling]="tests/test_sampling.py tests/test_sampling_edges.py"
FILE[policies]=offload/policies.py;        TESTS[policies]="tests/test_policies.py tests/test_policy_edges.py"
# policies: the LRU and LFU classes (the adaptive default's trace sweeps take minutes per mutant on 2 cores)
NAMES[policies]="offload.policies.xǁLRUPolicyǁ* offload.policies.xǁLFUPolicyǁ*"
SELECT[policies]="not default_ and not small_caches and not tiny_cache and not adaptive_switches"
FILE[cache]=offload/cache.py;              TESTS[cache]="tests/test_cache.py tests/test_policy_edges.py"
NAMES[cache]="offload.cache.xǁExpertCacheǁ*"
FILE[speed]=homerun/plan/speed.py;         TESTS[speed]="tests/test_planner.py tests/test_speed_edges.py"
NAMES[speed]="homerun.plan.speed.x_decode_speed__mutmut_* homerun.plan.speed.x_prefill_speed__mutmut_*"
# speed: the CLI round trips, the ramp sweep over three models and the purity check assert nothing the estimates
# decide beyond what the per-profile tests assert, and cost seconds per mutant
# warm: conftest imports torch in every test session, and each shipped card's inventory takes ~2 s to build once
WARM[speed]="import torch
from homerun.plan.inventory import _card_inventory
from homerun.plan.specs import card_index
for repo in card_index():
    _card_inventory(repo)"
SELECT[speed]="not pro_on_rtx5090 and not plan_json_command and not plan_human_output"
SELECT[speed]+=" and not ramp_is_monotone and not planner_is_pure and not fp8_kv_extends"
# attention: the torch kernel set (the path CUDA runs without Triton): attend_one and the formulas around it
FILE[attention]=homerun/kernels/torch_set.py; TESTS[attention]="tests/test_kernel_sets.py tests/test_torch_set_edges.py"

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(quant sampling policies cache speed attention)
for m in "${modules[@]}"; do
  [ -n "${FILE[$m]:-}" ] || { echo "unknown module $m (known: ${!FILE[*]})" >&2; exit 2; }
done

mkdir -p "$WORK"
for m in "${modules[@]}"; do
  dir="$WORK/$m"
  rm -rf "$dir" && mkdir -p "$dir"
  git -C "$REPO" archive "$REV" | tar -x -C "$dir"
  cp "$REPO"/homerun/kernels/_hr_kernels*.so "$dir/homerun/kernels/" 2>/dev/null || true  # built native kernels
  tests=""
  for t in ${TESTS[$m]}; do
    [ -f "$dir/$t" ] && [[ " ${SKIP_TESTS:-} " != *" $t "* ]] && tests+="    $t"$'\n'
  done
  [ -n "${SELECT[$m]:-}" ] && tests+="    -k"$'\n'"    ${SELECT[$m]}"$'\n'
  args="" copy=""
  if [ -n "${WARM[$m]:-}" ]; then
    printf '"""Imported once by mutmut'"'"'s fork server (-p mutation_warm): scripts/mutation.sh WARM[%s]."""\n%s\n' \
      "$m" "${WARM[$m]}" > "$dir/mutation_warm.py"
    args="pytest_add_cli_args ="$'\n'"    -p"$'\n'"    mutation_warm"$'\n' copy="    mutation_warm.py"$'\n'
  fi
  cat > "$dir/setup.cfg" <<CFG
[mutmut]
source_paths =
    homerun/
    offload/
only_mutate =
    ${FILE[$m]}
also_copy =
    profiles/
${copy}pytest_add_cli_args_test_selection =
${tests}${args}process_isolation = forkserver
use_git_change_detection = false
CFG
  # shellcheck disable=SC2086
  (cd "$dir" && "$MUTMUT" run --max-children "$MAX_CHILDREN" ${NAMES[$m]:-} > run.log 2>&1) || true
  (cd "$dir" && "$MUTMUT" results --all true > results.txt 2>&1) || true
  prefix="$(echo "${FILE[$m]%.py}" | tr / .)"
  globs="${NAMES[$m]:-$prefix.*}"
  python - "$m" "$dir/results.txt" $globs <<'PY'
import fnmatch, sys
module, path, globs = sys.argv[1], sys.argv[2], sys.argv[3:]
counts = {}
for line in open(path, encoding="utf-8"):
    name, _, status = line.strip().rpartition(": ")
    if name and any(fnmatch.fnmatch(name, g) for g in globs) and status != "not checked":
        counts[status] = counts.get(status, 0) + 1
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0)
rate = f"{100 * killed / total:.1f}%" if total else "n/a"
detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
print(f"{module:10s} killed {killed:4d} / {total:4d}  {rate:>6s}   ({detail})")
PY
done
