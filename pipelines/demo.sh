#!/usr/bin/env bash
# The main job end to end on the embedded default: local Spark, lake in ./lake.
# Grows with the platform: every stage that exists runs here.
#   bash pipelines/demo.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/demo}
PL=${PL:-.venv/bin/patternlake}

if [ ! -f "$DATA/truth/meta.json" ]; then
  "$PL" generate --out "$DATA" --users 2000 --items 500 --events 100000 --format csv --files 4
fi
"$PL" lake tables
