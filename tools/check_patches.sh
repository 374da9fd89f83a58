#!/usr/bin/env bash
# Check that patches/megatron-lm/odm.patch applies to a Megatron-LM checkout (left untouched).
#
#   tools/check_patches.sh MEGATRON_LM_DIR            git apply --check
#   tools/check_patches.sh MEGATRON_LM_DIR --smoke    also, on a patched copy in a temporary
#                                                     directory: py_compile the patched files and
#                                                     run patches/megatron-lm/cpu_smoke.py (CPU)
#
# The patch is made against Megatron-LM tag core_v0.16.1 (commit PINNED below); another commit
# is reported, and the check still runs (the patch may apply to nearby commits).
set -euo pipefail

PINNED_TAG=core_v0.16.1
PINNED_COMMIT=55ac7082517c3878ae653c07c09c534b8aed49f6
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PATCH="$ROOT/patches/megatron-lm/odm.patch"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

usage() { echo "usage: $0 MEGATRON_LM_DIR [--smoke]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
MLM="$(cd "$1" && pwd)" || usage
SMOKE=0
if [[ $# -eq 2 ]]; then [[ "$2" == "--smoke" ]] || usage; SMOKE=1; fi
[[ -f "$MLM/pretrain_gpt.py" && -f "$MLM/megatron/training/training.py" ]] \
  || { echo "error: $MLM does not look like a Megatron-LM checkout (no pretrain_gpt.py)" >&2; exit 2; }

head="$(git -C "$MLM" rev-parse -q --verify HEAD 2>/dev/null || true)"
if [[ -n "$head" && "$head" != "$PINNED_COMMIT" ]]; then
  echo "note: $MLM is at $head, the patch was made against $PINNED_TAG ($PINNED_COMMIT)"
fi

# git apply --check works in any directory (git repository or not) and changes nothing.
if ! (cd "$MLM" && git apply --check "$PATCH"); then
  echo "error: odm.patch does not apply to $MLM (already applied, or not $PINNED_TAG?)" >&2
  exit 1
fi
echo "ok: odm.patch applies to $MLM"

[[ $SMOKE -eq 1 ]] || exit 0

WORK="$(mktemp -d "${TMPDIR:-/tmp}/odm-check-patches.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [[ -n "$head" ]]; then
  git -C "$MLM" archive HEAD | tar -x -C "$WORK"          # the committed tree only
else
  cp -R "$MLM/." "$WORK/"
fi
(cd "$WORK" && git apply "$PATCH")
# Run Python from $ROOT: Megatron-LM's .python-version would make pyenv pick another interpreter.
(cd "$ROOT" && "$PYTHON" -m py_compile "$WORK/pretrain_gpt.py" "$WORK/megatron/training/training.py")
echo "ok: patched pretrain_gpt.py and megatron/training/training.py compile"
status=0
(cd "$ROOT" && "$PYTHON" "$ROOT/patches/megatron-lm/cpu_smoke.py" "$WORK") >"$WORK/smoke.log" 2>&1 || status=$?
grep -E "^INFO (odm_megatron|cpu_smoke)" "$WORK/smoke.log" || true
if [[ $status -ne 0 ]]; then
  tail -n 40 "$WORK/smoke.log" >&2
  echo "error: CPU smoke test of the patched Megatron-LM failed (exit $status)" >&2
  exit 1
fi
echo "ok: CPU smoke test of the patched Megatron-LM passed"
