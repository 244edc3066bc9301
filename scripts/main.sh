#!/usr/bin/env bash
# The product on the embedded default, in a few minutes and without training anything first:
#
#   bash scripts/main.sh            # the shipped dLM (smollm2-135m-dlm, a feature drafter for SmolLM2-135M-Instruct)
#                                   # beside its AR parent on the same prompts: HF generate, HF prompt-lookup decoding,
#                                   # our engine's ar, and the lossless verify policy with a chain of 7 drafts, a tree
#                                   # of 7, and its default decoding (lookup first, a tree of drafts, their number
#                                   # chosen for this machine) (tokens/s, tokens per forward, agreement
#                                   # with the parent). Extra arguments go to `ar2dlm bench`.
#   bash scripts/main.sh convert    # convert the parent into a dLM yourself with the default recipe (about 20
#                                   # minutes on 2 idle cores), then compare it with the parent. Extra arguments go
#                                   # to `ar2dlm convert`; an --output among them names the run folder (default
#                                   # runs/smollm2-135m-convert).
#
# convert: a folder that already holds a finished conversion is reused, never converted over: with extra arguments it
# says so, since they then change nothing. An unfinished one (killed mid-run) is resumed.
source "$(dirname "$0")/env.sh"

if [ "${1:-}" != convert ]; then
  mkdir -p runs/main
  ar2dlm bench --model smollm2-135m-dlm --policies verify,verify+tree,verify:auto+lookup+tree \
    --batch-sizes 1 --max-new-tokens 64 --json-out runs/main/bench.json --plot-out runs/main/bench.png "$@"
  exit
fi
shift
out=runs/smollm2-135m-convert
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
