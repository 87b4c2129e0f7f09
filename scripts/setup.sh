#!/usr/bin/env bash
# One-command, idempotent set-up of a fresh machine: Java 17+, .venv, pinned dependencies,
# Horovod (patched build, cached wheel), the Delta Lake Spark jars (Maven, cached), then an
# import check of everything.
#   bash scripts/setup.sh          (what `make setup` runs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
say() { printf '[setup] %s\n' "$*" >&2; }

# --- Java 17+ for Spark ---------------------------------------------------------------------
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing openjdk-17-jre-headless"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    say "Spark needs Java 17 or newer: install it (e.g. apt-get install openjdk-17-jre-headless) and rerun"
    exit 1
  fi
fi
say "java $(java_major)"

# --- headless Chromium (optional): the report test opens the HTML report in it --------------
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing chromium (headless check of the HTML report; optional)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || say "chromium not installed: the report's browser check will be skipped"
fi

# --- the lock must hold index packages only (a path into one machine's cache breaks others)
python3 scripts/check_requirements.py

# --- Python 3.11+ venv --------------------------------------------------------------------
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python 3.11+ needed"; exit 1; }
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp="$VENV/.patternlake-setup"
want=$(cat requirements/lock.txt pyproject.toml scripts/build_horovod.sh scripts/fetch_delta_jars.sh scripts/check_requirements.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" scripts/check_imports.py >/dev/null 2>&1 \
   && bash scripts/fetch_delta_jars.sh "$PY" >/dev/null; then
  say "already set up ($VENV)"
  exit 0
fi

# --- torch first (from PyPI: a CUDA build for Linux x86_64, which runs on the CPU too) -----
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# --- everything else, pinned to the versions tested together -------------------------------
say "installing pinned dependencies (requirements/lock.txt)"
"${PIP[@]}" install -r requirements/lock.txt
"${PIP[@]}" install --no-deps -e .

# --- Horovod: patched C++17 build, wheel cached under ~/.cache/patternlake -------------------
if ! "$PY" -c 'import horovod.torch' 2>/dev/null; then
  wheel=$(bash scripts/build_horovod.sh "$PY")
  say "installing $wheel"
  "${PIP[@]}" install --no-deps "$wheel"
fi

# --- the Delta Lake Spark jars (io.delta:delta-spark_2.13), Maven into the project cache --------
jars=$(bash scripts/fetch_delta_jars.sh "$PY")
say "delta jars in $jars"

"$PY" scripts/check_imports.py
echo "$want" > "$stamp"
say "done: activate with 'source $VENV/bin/activate'"
