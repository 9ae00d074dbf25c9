#!/usr/bin/env bash
# Starts a ComfyUI server for tools/frontend_check.mjs with this pack, leaving the ComfyUI checkout untouched:
# everything ComfyUI writes (custom_nodes, models, user, input, output, temp) lives under WORK, the database is
# in memory, and the pack is linked in as custom_nodes/comfyui-personalization-guidance. The model folders hold
# empty placeholder files named as the example workflows name their models, so that the workflows' file names
# are among the frontend's options (nothing can be sampled with them).
#
#   tools/frontend_server.sh COMFYUI_DIR PYTHON PORT WORK     # prints the server's pid; log in WORK/server.log
#   kill <pid>                                                # when done
set -euo pipefail
comfyui=$(realpath "$1") python=$2 port=$3 work=$(realpath -m "$4")
pack=$(realpath "$(dirname "$0")/..")

mkdir -p "$work/custom_nodes" "$work/models/checkpoints" "$work/models/loras" "$work/user"
ln -sfn "$pack" "$work/custom_nodes/comfyui-personalization-guidance"
for name in v1-5-pruned-emaonly.safetensors my_dreambooth_model.safetensors; do
  touch "$work/models/checkpoints/$name"
done
touch "$work/models/loras/my_subject_lora.safetensors"

cd "$comfyui"
"$python" main.py --cpu --listen 127.0.0.1 --port "$port" --base-directory "$work" \
  --database-url sqlite:///:memory: > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$port/object_info/PG_Sweep" > /dev/null; then echo "$pid"; exit 0; fi
  if ! kill -0 "$pid" 2> /dev/null; then tail -n 30 "$work/server.log" >&2; exit 1; fi
  sleep 1
done
echo "the server did not answer within 180 s; see $work/server.log" >&2
kill "$pid"
exit 1
