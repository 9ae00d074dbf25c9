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

mkdir -p "$work/custom_nodes" "$work/user"
ln -sfn "$pack" "$work/custom_nodes/comfyui-personalization-guidance"
placeholders() {  # FOLDER NAME...
  local folder=$1; shift
  mkdir -p "$work/models/$folder"
  for name in "$@"; do touch "$work/models/$folder/$name"; done
}
placeholders checkpoints v1-5-pruned-emaonly.safetensors my_dreambooth_model.safetensors sd_xl_base_1.0.safetensors
placeholders loras my_subject_lora.safetensors my_sdxl_subject_lora.safetensors \
  my_qwen_image_subject_lora.safetensors my_wan2.1_subject_lora.safetensors
placeholders diffusion_models qwen_image_fp8_e4m3fn.safetensors wan2.1_t2v_1.3B_fp16.safetensors
placeholders text_encoders qwen_2.5_vl_7b_fp8_scaled.safetensors umt5_xxl_fp8_e4m3fn_scaled.safetensors
placeholders vae qwen_image_vae.safetensors wan_2.1_vae.safetensors

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
