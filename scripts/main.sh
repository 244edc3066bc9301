#!/usr/bin/env bash
# Convert the embedded default model (SmolLM2-135M-Instruct) into a block-diffusion LM with the default recipe, then
# show what it learned: held-out masked-token accuracy before/after, and the AR parent and the dLM answering the same
# prompts side by side (TPF, agreement). Extra arguments go to `ar2dlm convert` (e.g. --max-minutes 10).
source "$(dirname "$0")/env.sh"
out=runs/smollm2-135m-dlm
if [ -f "$out/summary.json" ]; then
  echo "$out already holds a finished conversion (remove it to convert again):"
  cat "$out/summary.json"
else
  resume=()
  [ -f "$out/checkpoint/state.pt" ] && resume=(--resume)
  ar2dlm convert --model smollm2-135m --output "$out" --max-minutes 25 "${resume[@]}" "$@"
fi
ar2dlm compare --model "$out/model" --thresholds 0.9,0.7,0.5 --json-out "$out/compare.json"
