#!/usr/bin/env bash
# Print the path of a Python 3.12 venv with megatron-core 0.19.2, torch from the package index
# and odm-megatron's dependencies (".[test]"), building it the first time. Used by .ci/run
# (stack ii) and tools/check_megatron_lm.sh.
#
#   tools/py312_venv.sh            -> the venv's directory on stdout (progress on stderr)
#
# The venv lives outside the clone, in ${ODM_CI_CACHE:-~/.cache/odm-megatron}/venv-py312-<key>,
# keyed by what it installs (interpreter, pins, setup.py, pip's configuration). It holds the
# dependencies only; callers install the clone itself with
#   VENV/bin/python -m pip install --no-deps --no-build-isolation -e .
# (seconds) while holding the lock VENV.lock (flock), so that concurrent runs do not interleave.
#
# Exit 3 (and one line on stderr) when no Python 3.12 interpreter is found: set ODM_CI_PYTHON312.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MEGATRON_CORE_312="megatron-core==0.19.2"

# pip prints one 'Location ... is ignored' warning per package for this machine's local index
# mirrors; they say nothing about the install.
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2; return "${PIPESTATUS[0]}"; }

find_python312() {
  local c cands=()
  [[ -n "${ODM_CI_PYTHON312:-}" ]] && cands+=("$ODM_CI_PYTHON312")
  c="$(command -v python3.12 2>/dev/null)" && cands+=("$c")
  command -v pyenv >/dev/null 2>&1 && cands+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
  cands+=("$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12)
  for c in "${cands[@]}"; do
    # A pyenv shim is on PATH even where 3.12 is not selected (it then fails): run it to be sure.
    [[ -x "$c" ]] && (cd / && "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)') \
      >/dev/null 2>&1 && { echo "$c"; return 0; }
  done
  return 1
}

if ! py312="$(find_python312)"; then
  echo "no Python 3.12 interpreter found (looked at \$ODM_CI_PYTHON312, python3.12 on PATH, \$(pyenv root)/versions/3.12*, ~/.pyenv/versions/3.12*, /usr/local/bin, /usr/bin); megatron-core >= 0.17 needs Python 3.12" >&2
  exit 3
fi
cache="${ODM_CI_CACHE:-$HOME/.cache/odm-megatron}"
mkdir -p "$cache" || exit 1
key="$( { "$py312" -c 'import sys; print(sys.version)'; echo "$MEGATRON_CORE_312 setuptools wheel";
          cat "$ROOT/setup.py"; (cd / && pip config list 2>/dev/null);
          cat "${PIP_CONSTRAINT:-/dev/null}" /etc/xdg/pip/constraints.txt 2>/dev/null; } \
        | sha256sum | cut -c1-16)"
venv="$cache/venv-py312-$key"
stamp="$venv/.odm-ci-complete"

exec 9>"$venv.lock"
flock 9
if [[ ! -f "$stamp" ]]; then
  # Absent, or a build that was killed: start from nothing. The venv is built at its final path
  # (pip's console scripts -- torchrun, pytest, odm-megatron -- carry it in their #! line, so a
  # venv built elsewhere and renamed would not run them); the stamp, written last, marks it done.
  rm -rf "$venv"
  echo "building $venv with $py312 ($MEGATRON_CORE_312; first time on this machine: ~1 GB download, a few minutes)" >&2
  t0=$(date +%s)
  if ! { "$py312" -m venv "$venv" \
         && pipq "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel \
         && pipq "$venv/bin/python" -m pip install -q "$MEGATRON_CORE_312" \
         && (cd "$ROOT" && pipq "$venv/bin/python" -m pip install -q -e ".[test]") \
         && pipq "$venv/bin/python" -m pip uninstall -y -q odm-megatron; }; then
    echo "error: building $venv failed" >&2
    rm -rf "$venv"
    exit 1
  fi
  "$venv/bin/python" -m pip freeze --exclude-editable >"$venv/odm-ci-freeze.txt" 2>/dev/null
  touch "$stamp"
  echo "built $venv in $(( $(date +%s) - t0 ))s" >&2
fi
echo "$venv"
