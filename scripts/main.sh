#!/usr/bin/env bash
# Convert the embedded default model (SmolLM2-135M-Instruct) into a block-diffusion LM with the default recipe, then
# show what it learned: held-out masked-token accuracy before/after, and the AR parent and the dLM answering the same
# prompts side by side (TPF, agreement). Extra arguments go to `ar2dlm convert` (e.g. --max-minutes 10); an
# --output among them names the run folder (default runs/smollm2-135m-dlm).
#
# A folder that already holds a finished conversion is reused, never converted over: with extra arguments it says
# so, since they then change nothing. An unfinished one (killed mid-run) is resumed.
source "$(dirname "$0")/env.sh"
out=runs/smollm2-135m-dlm
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output) out=${args[i + 1]:-$out} ;;
    --output=*) out=${args[i]#--output=} ;;
  esac
done

if [ -f "$out/summary.json" ]; then
  if [ $# -gt 0 ]; then
    echo "main.sh: $out already holds a finished conversion: reusing it, NOT converting again with: $*" >&2
    echo "main.sh: to convert with these arguments, remove it (rm -r $out) or add --output runs/<new-folder>" >&2
  fi
  echo "Reusing the finished conversion in $out (remove the folder to convert again):"
  python -m ar2dlm.training.summary "$out"
else
  resume=()
  if [ -f "$out/checkpoint/state.pt" ]; then
    resume=(--resume)
    echo "main.sh: resuming the unfinished conversion in $out" >&2
  fi
  ar2dlm convert --model smollm2-135m --output "$out" --max-minutes 25 "${resume[@]}" "$@"
fi
ar2dlm compare --model "$out/model" --thresholds 0.9,0.7,0.5 --json-out "$out/compare.json"
