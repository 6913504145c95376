#!/usr/bin/env bash
# Wall time and model loads of the persona-space pipeline, side by side for two checkouts of the
# code (an earlier commit and this working tree), on the embedded model: the default
# configuration (9 roles) and 40 roles of assistant-axis' reference data.
#   git clone -q . /tmp/po-before && git -C /tmp/po-before checkout -q 902e250
#   bash bench/run_pipelines.sh /tmp/po-before [results.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?a checkout of the earlier commit}
OUT=${2:-/tmp/persona-ops-bench/pipelines.jsonl}
REF=${REF:-$(cd ../shared/reference-data/assistant-axis && pwd)}
ROLES="[default,$(ls "$REF/roles/instructions" | sed 's/\.json$//' | grep -vx default | head -39 | paste -sd, -)]"
mkdir -p "$(dirname "$OUT")"
for code in "$BEFORE" "$PWD"; do
  label=$([ "$code" = "$PWD" ] && echo after || echo before)
  .venv/bin/python -m bench.pipelines --code "$code" --label "$label-default" --out "$OUT" -- \
    persona-ops run persona-space
  .venv/bin/python -m bench.pipelines --code "$code" --label "$label-40-roles" --out "$OUT" -- \
    persona-ops run persona-space -S "persona_space.roles.dir=$REF/roles/instructions" \
    -S "persona_space.roles.questions=$REF/extraction_questions.jsonl" -S "persona_space.roles.names=$ROLES"
done
