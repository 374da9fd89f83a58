#!/usr/bin/env bash
# Check online mixing in one Megatron-LM checkout's own training loop, on CPU.
#
#   tools/check_megatron_lm.sh CHECKOUT [LAYOUT...]      LAYOUT: dp2 tp2 pp2 (default: all three)
#
# Runs tests/test_megatron_lm_real_loop.py's checkout test: CHECKOUT's unmodified pretrain_gpt.py
# through `odm-megatron megatron-lm` under torchrun (2 gloo processes, a tiny GPT on shards made by
# `odm-megatron preprocess`, --ckpt-format torch_dist), a run of 2N iterations against a run
# stopped at N (--exit-interval) and resumed: per-iteration loss and grad norm, mixture.jsonl and
# the bandit state must be identical. Also: patches/megatron-lm/install.patch (the one install()
# line) applied to a copy of the checkout's pretrain_gpt.py, run directly, must train exactly as
# the launcher does (DP=2). The checkout itself is left untouched.
#
# Python: the checkout's megatron/core/package_info.py decides. 0.16.x runs on the `python` on
# PATH (Python 3.11, with this clone installed, as in the README); 0.17 and later need Python
# 3.12: tools/py312_venv.sh's venv (built on first use), with this clone installed editable.
# Override with ODM_CHECK_PYTHON=/path/to/python (it must have odm-megatron installed).
# ODM_CHECK_NO_PATCH=1 leaves out the install.patch check (e.g. when re-running one layout).
#
# Exit 0 only when every selected layout's resumed run is identical; the last line is a one-line
# verdict naming the checkout's version.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

usage() { echo "usage: $0 CHECKOUT [dp2|tp2|pp2 ...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
CHECKOUT="$(cd "$1" 2>/dev/null && pwd)" || { echo "error: $1 is not a directory" >&2; usage; }
shift
LAYOUTS=("$@")
[[ ${#LAYOUTS[@]} -gt 0 ]] || LAYOUTS=(dp2 tp2 pp2)
for l in "${LAYOUTS[@]}"; do
  [[ "$l" =~ ^(dp2|tp2|pp2)$ ]] || { echo "error: unknown layout '$l' (dp2, tp2 or pp2)" >&2; usage; }
done

verdict() { echo "check_megatron_lm: $*"; }

info="$CHECKOUT/megatron/core/package_info.py"
if [[ ! -f "$CHECKOUT/pretrain_gpt.py" || ! -f "$info" ]]; then
  verdict "FAIL $CHECKOUT is not a Megatron-LM checkout (no pretrain_gpt.py or megatron/core/package_info.py)"
  exit 2
fi
major="$(sed -n 's/^MAJOR *= *\([0-9]*\).*/\1/p' "$info")"
minor="$(sed -n 's/^MINOR *= *\([0-9]*\).*/\1/p' "$info")"
patch="$(sed -n 's/^PATCH *= *\([0-9]*\).*/\1/p' "$info")"
version="$major.$minor.$patch"
[[ -n "$major" && -n "$minor" ]] || { verdict "FAIL cannot read the version from $info"; exit 2; }
ref="$(git -C "$CHECKOUT" describe --tags --exact-match 2>/dev/null \
       || git -C "$CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")"
name="Megatron-LM $ref (megatron.core $version)"

# Pick the interpreter (run from $ROOT: a checkout's .python-version would steer pyenv otherwise).
cd "$ROOT" || exit 2
lock_fd_taken=0
if [[ -n "${ODM_CHECK_PYTHON:-}" ]]; then
  py="$ODM_CHECK_PYTHON"
elif [[ "$major" -eq 0 && "$minor" -lt 17 ]]; then
  py="$(command -v python)"
else
  venv="$(tools/py312_venv.sh)" || { verdict "FAIL $name: needs Python 3.12 (megatron.core >= 0.17) and none was found or its venv could not be built"; exit 1; }
  exec 9>"$venv.lock"; flock 9; lock_fd_taken=1
  # This clone, editable, over the cached dependencies (seconds; changes no dependency).
  pip_log="${TMPDIR:-/tmp}/odm-pip-editable.$$.log"
  if ! "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$pip_log" 2>&1; then
    cat "$pip_log" >&2; verdict "FAIL $name: pip install -e . into $venv failed"; exit 1;
  fi
  rm -f "$pip_log"
  py="$venv/bin/python"
fi
pyver="$("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null)" \
  || { verdict "FAIL $name: $py does not run"; exit 1; }
"$py" -c 'import odm_megatron' 2>/dev/null \
  || { verdict "FAIL $name: odm_megatron is not importable with $py (pip install -e $ROOT)"; exit 1; }
echo "checking $name at $CHECKOUT with Python $pyver ($py); layouts: ${LAYOUTS[*]}"

work="$(mktemp -d "${TMPDIR:-/tmp}/odm-check-megatron-lm.XXXXXX")"
select="checkout and ($(IFS='|'; echo "${LAYOUTS[*]}" | sed 's/|/ or /g') or patched)"
expected=$(( ${#LAYOUTS[@]} + 1 )) patch_what=", install.patch vs launcher"
if [[ "${ODM_CHECK_NO_PATCH:-0}" == 1 ]]; then
  select="${select% or patched)})"; expected=${#LAYOUTS[@]}; patch_what=""
fi
t0=$(date +%s)
MEGATRON_LM_DIR="$CHECKOUT" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$py" -m pytest -q -p no:cacheprovider tests/test_megatron_lm_real_loop.py -k "$select" \
  --basetemp "$work/pytest" --junitxml "$work/junit.xml"
rc=$?
secs=$(( $(date +%s) - t0 ))
[[ $lock_fd_taken -eq 1 ]] && flock -u 9

# Count from pytest's own report: every selected test must have passed (no skip, no error).
read -r passed failed <<<"$("$py" - "$work/junit.xml" "${LAYOUTS[@]}" <<'PY' 2>/dev/null || echo "0 ?"
import sys, xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
ok, bad = [], []
for c in cases:
    name = c.get("name", "")
    layout = name.split("[")[-1].rstrip("]") if "[" in name else "install.patch"
    (bad if any(c.find(t) is not None for t in ("failure", "error", "skipped")) else ok).append(layout)
print(len(ok), ",".join(bad) or "-")
PY
)"
what="resumed run vs uninterrupted for ${LAYOUTS[*]} with --ckpt-format torch_dist$patch_what; CPU, 2 gloo processes, Python $pyver, ${secs}s"
if [[ $rc -eq 0 && "$passed" -eq $expected ]]; then
  verdict "PASS $name: identical ($what)"
  exit 0
fi
verdict "FAIL $name: pytest exit $rc, $passed/$expected checks passed, failed or skipped: $failed ($what; logs under $work/pytest)"
exit 1
