#!/usr/bin/env bash
# Convert the embedded default model (SmolLM2-135M-Instruct) into a block-diffusion LM with the default recipe,
# then print what it learned. Extra arguments go to `ar2dlm convert` (e.g. --max-minutes 10).
source "$(dirname "$0")/env.sh"
ar2dlm convert --model smollm2-135m --output runs/smollm2-135m-dlm "$@"
