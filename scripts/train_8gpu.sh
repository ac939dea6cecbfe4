#!/usr/bin/env bash
# Train on 8 GPUs of one machine with FSDP2 (the paper's setup, App. D.6), from a preset of configs/.
#   scripts/train_8gpu.sh configs/pickscore.yaml --model /models/FLUX.1-dev --prompts prompts.txt \
#       --reward_path pickscore=/models/PickScore_v1 --output_dir outputs/tmpo_pickscore
# Every word after the preset goes to train.py and overrides the preset (train.py --help lists them).
# DDP instead of FSDP (each GPU holds the whole bf16 FLUX): ACCELERATE_CONFIG=accelerate_configs/ddp_8gpu.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: scripts/train_8gpu.sh configs/PRESET.yaml [train.py flags]}
shift
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-accelerate_configs/fsdp_8gpu.yaml}" train.py --config "$config" "$@"
