#!/usr/bin/env bash
# Start a Celery worker for persona-pipeline on this box (deploy/README.md, "Celery").
#
#   start-worker.sh gpu [celery worker options]   the `gpu` queue: the `lora_model` step (op tag
#                                                 dagster-celery/queue=gpu), one at a time, in the
#                                                 worker process itself (CUDA and fork do not mix)
#   start-worker.sh cpu [celery worker options]   the `dagster` queue: every other step, 4 at a time
#
# The box needs what the main server has: this repo at the same path with the package installed
# and its .venv/bin first on PATH (dagster-celery), DAGSTER_HOME holding deploy/celery/dagster.yaml
# as dagster.yaml, the DAGSTER_PG_* variables, and the settings and secrets
# (/etc/persona-pipeline/env: PERSONA_DATABASE_URL, PERSONA_HOME on the shared folder, at the same
# path, COMFYUI_URLS, GEMINI_API_KEY, ...). Workers load the code location from the path the run
# names, so the repo path must match the main server's.
set -euo pipefail

kind="${1:-}"
case "$kind" in
  gpu)
    queue=gpu
    export PERSONA_DEVICE="${PERSONA_DEVICE:-cuda}"
    worker_args=(--pool=solo)
    ;;
  cpu)
    queue=dagster
    worker_args=(--concurrency=4)
    ;;
  *)
    echo "usage: $0 gpu|cpu [celery worker options]" >&2
    exit 2
    ;;
esac
shift

: "${DAGSTER_HOME:?DAGSTER_HOME must name the folder holding deploy/celery/dagster.yaml as dagster.yaml}"
: "${PERSONA_HOME:?PERSONA_HOME must be set (the shared folder, the same path as on the main server)}"
: "${PERSONA_DATABASE_URL:?PERSONA_DATABASE_URL must be set (the application database)}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec dagster-celery worker start \
  --app dagster_celery.app \
  --config-yaml "$here/run_config.yaml" \
  --queue "$queue" \
  --name "persona-$kind" \
  -- "${worker_args[@]}" "$@"
