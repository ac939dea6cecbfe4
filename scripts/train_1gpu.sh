#!/usr/bin/env bash
# Train on one GPU from a preset of configs/ (same recipe as 8 GPUs, 1/8 of the prompts per step).
#   scripts/train_1gpu.sh configs/pickscore.yaml --model /models/FLUX.1-dev --prompts prompts.txt \
#       --reward_path pickscore=/models/PickScore_v1 --output_dir outputs/tmpo_pickscore_1gpu
# Every word after the preset goes to train.py and overrides the preset (train.py --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: scripts/train_1gpu.sh configs/PRESET.yaml [train.py flags]}
shift
exec accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py --config "$config" "$@"
