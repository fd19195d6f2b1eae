#!/usr/bin/env bash
# Put the LoRA library onto every ComfyUI server:
#
#   sync-loras.sh STAGING_DIR TARGET...     e.g.  sync-loras.sh /var/tmp/persona-loras \
#                                                   gpu1:/opt/ComfyUI/models/loras gpu2:/opt/ComfyUI/models/loras
#
# 1. `persona-pipeline lora export-comfyui STAGING_DIR` copies every active persona's primary and
#    chained LoRAs there as <COMFYUI_LORA_PREFIX>/<slug>/<file>, the names the generated graphs
#    use; it copies only what changed. Run it where PERSONA_DATABASE_URL and the library files
#    (PERSONA_HOME) are reachable.
# 2. rsync puts STAGING_DIR/<COMFYUI_LORA_PREFIX>/ into each TARGET (a models/loras folder, local
#    or host:path over ssh), by checksum, deleting nothing.
# The generation pool sends a job only to servers whose /object_info lists its LoRAs, so a server
# that has not received a new LoRA yet gets no job that needs it (check_servers.py shows which).
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 STAGING_DIR TARGET..." >&2
  exit 2
fi
staging="$1"
shift
prefix="${COMFYUI_LORA_PREFIX:-persona-pipeline}"
prefix="${prefix#/}"
prefix="${prefix%/}"

mkdir -p "$staging"
persona-pipeline lora export-comfyui "$staging"
mkdir -p "$staging/$prefix"
for target in "$@"; do
  rsync --recursive --times --checksum "$staging/$prefix/" "$target/$prefix/"
  echo "synced $staging/$prefix/ -> $target/$prefix/"
done
