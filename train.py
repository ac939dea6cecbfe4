r"""Train FLUX.1-dev with TMPO (or the Flow-GRPO / tree-GRPO baselines) under accelerate.

Paper: Li et al. 2026, "Trajectory Matching Policy Optimization", Sec. 4 and App. D (setup).
Equation numbers are those of EQUATIONS.md. The math lives in two files this
script only calls: tmpo.py (advantage Eq. 5 / 28, clipped loss Eq. 6, beta warmup) and
tree_sampler.py (the tree rollout of Sec. 4.2, branch curriculum Eqs. 41-46, the importance-sampled
update Eqs. 7, 30-32). flux.py turns FLUX into a velocity function, rewards.py scores images,
common.py holds the plumbing shared with eval.py (flags, prompt files, the ODE sampler, grids).

One iteration ("step"), per process, for `prompts_per_process` prompts (G):
  1. branch positions from the curriculum (Eqs. 41-46; the same tree shape on every rank);
  2. tree rollout (Sec. 4.2): K = k^L leaves per prompt (27 = 3 roots x 3 x 3), no grad;
  3. VAE decode, reward R (N = G K images), z-scored within each group;
  4. advantage: TMPO A = log q - log softmax(log P(tau)) (Eq. 5) with the paper's Boltzmann target
     log q = log softmax(beta R) or, with --target tilted, the reward-tilted target
     log q = log softmax(beta R / lambda + log P_ref) (times lambda; P_ref = the base model, LoRA off,
     scored in the rollout at one extra forward per SDE parent; EQUATIONS.md); or GRPO's z-scored
     reward (Eq. 28);
  5. `updates_per_rollout` clipped IS updates (Eqs. 6-7; by default with the dual clip c = 3 on the
     A < 0 branch, which keeps the loss and its gradient finite, --dual_clip 0 = Eq. 6 exactly),
     AdamW, grad-norm clip, lr schedule (diffusers' get_scheduler, cosine by default);
  6. every `ema_every` steps the EMA of the LoRA weights (used for validation and saving);
  7. every `validation_every` steps: ODE samples of held-out prompts from the EMA weights and
     fixed noise, scored (rewards, LGMD) and drawn as a grid: reward hacking shows in images first.

Run it. The four protocols of App. D are presets in configs/ (pickscore, geneval, ocr, joint);
flags given after --config override the file. Flags are spelled --flag_name or --flag-name, and
the diffusers spellings work too (--pretrained_model_name_or_path, --learning_rate, ...):
    # 8 GPUs, FSDP (the paper's setup); --prompts: .txt (one per line), .json or .jsonl
    scripts/train_8gpu.sh configs/pickscore.yaml --model black-forest-labs/FLUX.1-dev \
        --prompts prompts/pickscore_train.txt --reward_path pickscore=/models/PickScore_v1 \
        --output_dir outputs/tmpo_pickscore
    # one GPU
    scripts/train_1gpu.sh configs/pickscore.yaml --prompts p.txt ...
    # baselines through the same loop
    ... --method grpo --sampler independent --kl_coef KL     # Flow-GRPO
    ... --method grpo --sampler tree                         # tree-GRPO
    # continue a run that was stopped
    ... --output_dir outputs/tmpo_pickscore --resume latest
    # CPU smoke run on tiny random models (no downloads)
    python tests/tiny_flux.py /tmp/tiny_flux && python tests/tiny_rewards.py /tmp/tiny_rewards
    printf 'a photo of a cat\na red cube\na dog\n' > /tmp/p.txt
    python train.py --model /tmp/tiny_flux --reward_path pickscore=/tmp/tiny_rewards/pickscore \
        --prompts /tmp/p.txt --height 32 --width 32 --max_sequence_length 16 --max_steps 2 \
        --save_every 1 --validation_every 1 --validation_split 1 --output_dir /tmp/tmpo_smoke
    # two CPU processes (DDP over gloo); note: `--cpu --num_processes 2` starts only one
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no train.py ... (same flags)
    python -m pytest -q tests/test_train.py

Notation (code name -> paper symbol):
    G = prompts_per_process (prompts per GPU per step; the paper: 1), K = leaves per prompt
    (k^L, 27), k = branch_k, L = len(branch_early), N = num_steps (6), eta (CPS noise, Eq. 9),
    beta (reward temperature, Eq. 5), clip_eps (epsilon, Eq. 6), kappa (Beta concentration, Eq. 43).

Branch positions follow tree_sampler's convention: 0-based denoising steps, 0 = independent roots,
SDE positions 1..N-2. The released configs' early [1, 2, 3] / late [1, 3, 5] on 6 steps are
[0, 2, 3] / [0, 3, 4] here (the released code promotes a first position <= 1 to independent
roots and clamps to N - 2), the defaults.

Log-prob reduction (`--logprob_reduce`): "mean" is the paper's per-dimension log-prob (Eq. 49). It
does not cancel in the softmax of Eq. (5): log P differences shrink by D (65536 at 512^2), so p is
close to uniform and the TMPO advantage is close to log softmax(beta R) + log K. "sum" is the true
log-density (Eq. 48); the importance ratio uses the same reduction (with "mean", its RatioNorm
correction is divided by D too; tree_sampler.update).

Rewards: `--reward_zscore` (default on, as the released configs) z-scores a single reward within
each group before the advantage, so beta acts on standardized rewards. Several rewards
(`--reward pickscore hps --reward_weights 1 1`, weights normalised to sum to 1) are each z-scored
within the group and summed with the weights (App. D.2, rewards.aggregate_rewards); that sum is used
as it is, as in the release (a second z-score would sharpen beta by 1 / std of the sum).

Targets (`--target`): "boltzmann" is the paper's q = softmax(beta R). Its on-policy expected gradient
is beta E[R grad log P], reward maximisation (tmpo.softmax_tb_advantage); in the 2-D toy it collapses
like GRPO. "tilted" puts the base in the target, q* ~ P_ref exp(beta R / lambda), whose expected
gradient is grad [beta E R - lambda KL(P_theta || P_ref)] (the KL over the SDE transitions) and whose
optimum is the base tilted by the reward. --tilt_weight is lambda: under --logprob_reduce mean the
log-ratio is per dimension, so lambda = 1 weighs the trajectory KL by 1 / D (65536 at 512^2) and the
optimum is P_ref exp(beta D R) in nats; use --logprob_reduce sum for the tilt as written.

Distributed: each rank draws its own noise (a torch.Generator seeded from (seed, rank); the released
code used one seed on every rank, so every GPU drew the same noise); the branch positions come from
a numpy Generator seeded identically on all ranks (the tree shape, hence the number of forwards and
backwards, must agree across DDP/FSDP ranks). Prompts: each step takes the next prompts_per_process
x world_size entries of a per-epoch shuffle (a pure function of (seed, step), so resuming needs no
data state) and rank r takes its slice. Logging and saving on the main process only.

Checkpoints (`--output_dir`, every `--save_every` steps, written to checkpoint-{step}.tmp and then
renamed, so a crash never leaves a half-written checkpoint-{step}):
    checkpoint-{step}/lora/pytorch_lora_weights.safetensors   current LoRA, diffusers format
    checkpoint-{step}/ema/pytorch_lora_weights.safetensors    EMA LoRA (use this one to evaluate)
    checkpoint-{step}/trainer_state.pt   step, optimizer (unless sharded), lr scheduler, args, a
                                         fingerprint of the base weights (resuming on others is refused)
    checkpoint-{step}/rank{r}.pt         rank r's RNG states (+ its optimizer shard under FSDP)
    checkpoint-{step}/manifest.json      its step and the size of every file (a truncated one is named)
`FluxPipeline.load_lora_weights("checkpoint-500/ema")` loads a checkpoint as is. `--resume latest`
continues from the newest one, if it passes its manifest (else the error lists those that do); a
run stopped and resumed ends with the same weights as an uninterrupted run (tests/test_train.py).
A finished run resumed says so and changes nothing; with a larger --max_steps it is extended.
`--checkpoints_total_limit N` keeps the newest N. While a run owns --output_dir it holds
train.lock there (pid, host, start time): a second run is refused before loading anything; a lock
left by a killed run is reported as stale and taken over with --take_over_lock. SIGTERM (a
preemption) finishes the step in progress, saves a checkpoint and exits with status 143 saying how
to resume (tests/test_faults.py covers these faults). Also written: metrics.jsonl (one line of metrics per step),
validation/step-{step}.png (the validation grids), the tracker logs (--report_to; tensorboard in
{output_dir}/{tracker_project}) and run_summary.json: the plan, and the evidence a distributed run
did what it should: each rank's first root-noise checksum and prompt indices (they differ across
ranks) and each rank's final LoRA checksum (equal across ranks: gradients were all-reduced).

A NaN or infinite latent, log-prob, reward, loss or gradient norm stops the run with an error that
names the step and the prompt(s); nothing is clamped or replaced, and checkpoints already written
stay intact.

Metrics (accelerate trackers, `--report_to`, and metrics.jsonl; means over all ranks):
    reward/mean        mean reward R over all images of the step (the weighted sum of z-scores
                       for several rewards; the raw score for one), before --reward_zscore
    reward/std         within-prompt std of R, averaged over prompts (0 = no learning signal)
    reward/<name>      mean raw score of each reward model (e.g. reward/pickscore, ~22-24)
    policy/loss        the clipped surrogate loss of Eq. (6) (+ kl_coef * KL) at the parameters
                       before each update; policy/* are means over the step's updates
    policy/clipfrac    fraction of leaves with |rho - 1| > clip_eps (0 by construction on the first
                       update: the parameters are the rollout's, so rho = 1 and no forward is spent on it)
    policy/approx_kl   0.5 mean (log rho)^2: how far earlier updates of this rollout moved the policy
    policy/kl          KL to the reference (LoRA disabled), summed along paths, mean over leaves
    policy/ref_log_ratio  --target tilted: mean of log P - log P_ref over the leaves, an estimate of
                       KL(P_theta || P_ref) on the SDE transitions (in --logprob_reduce units)
    adv/abs_mean       mean |A| (TMPO: Eq. 5; GRPO: Eq. 28)
    tree/leaves        leaves per prompt K
    tree/nfe_rollout   transformer evaluations of one rollout, per process (node-steps)
    tree/nfe_update    transformer evaluations of the update(s): with grad + without grad
    tree/branch_<b>    position of branch level b (0-based, 0 = independent roots)
    train/beta         reward temperature beta (linear warmup, Sec. 4.1)
    train/lr           learning rate the step's last optimizer step used
    train/grad_norm    global grad norm before clipping (last update of the step)
    time/rollout_s     seconds of the tree rollout; time/decode_s VAE decode; time/reward_s reward
    time/update_s      seconds of the update(s); time/iter_s the whole step
    validation/reward_<name>  mean raw score of the held-out prompts' ODE samples (EMA weights,
                       the same noise at every validation), validation steps only
    validation/lgmd    LGMD of each held-out prompt's samples (metrics.lgmd), mean over prompts
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, Optional

import numpy as np
import torch
from transformers.hf_argparser import HfArg

import common
import flux
import metrics
import rewards
import tmpo
import tree_sampler


@dataclass
class Args(common.FluxArgs):
    """Train FLUX with TMPO (Softmax Trajectory Balance) or GRPO; defaults = the paper's PickScore protocol (App. D)."""

    # model (and common.FluxArgs: --config, --model, --prompts, --guidance, --height, --width, ...)
    dtype: Literal["auto", "bf16", "fp32"] = HfArg(default="auto", help="base weights: auto = bf16 on GPU, fp32 on CPU (no fp16: FLUX overflows)")
    lora_rank: int = HfArg(default=64, help="LoRA rank r (App. D: 64)")
    lora_alpha: float = HfArg(default=128.0, help="LoRA alpha (App. D: 128; scale alpha / r); the LoRA is always fp32")
    gradient_checkpointing: Optional[bool] = HfArg(default=None, metadata={"nargs": "?", "const": True}, help="recompute each block in backward instead of keeping its "
                                                   "activations (512^2: 0.8 instead of 11.8 GiB per image); default: on on CUDA")
    # prompts
    prompts_per_process: int = HfArg(default=1, help="G: prompts per process per step (App. D: 1 per GPU)")
    # sampling (Sec. 4.2, App. C)
    method: Literal["tmpo", "grpo"] = HfArg(default="tmpo", help="tmpo (Softmax-TB advantage, Eq. 5) | grpo (z-scored reward, Eq. 28)")
    sampler: Literal["tree", "independent"] = HfArg(default="tree", help="tree (Sec. 4.2) | independent (Flow-GRPO: K SDE trajectories)")
    num_steps: int = HfArg(default=6, help="N: denoising steps of a training rollout (App. D: 6)")
    branch_k: int = HfArg(default=3, help="k: children per branch point (App. D: 3); leaves per prompt K = k^L")
    branch_early: list[int] = HfArg(default_factory=lambda: [0, 2, 3], help="branch positions at the start (Eq. 41), 0-based, 0 = roots; released [1,2,3]")
    branch_late: list[int] = HfArg(default_factory=lambda: [0, 3, 4], help="branch positions at the end (Eq. 41); released [1,3,5] (5 clamped to N-2)")
    kappa: float = HfArg(default=6.0, help="kappa: Beta concentration of the position perturbation (Eq. 43; inf = no perturbation)")
    eta: float = HfArg(default=0.7, help="eta: SDE noise level (CPS, Eq. 9: s = t' sin(eta pi / 2); App. D: 0.7)")
    sde_kind: Literal["cps", "flow_grpo"] = HfArg(default="cps", help="cps (Eq. 9, released configs) | flow_grpo (Eqs. 39-40)")
    rollout_batch: int = HfArg(default=0, help="max rows per transformer call in the rollout (0 = all active nodes at once)")
    decode_batch: int = HfArg(default=8, help="images per VAE decode call (bounds decode memory)")
    # reward and advantage (Sec. 4.1, App. D.2)
    reward: list[str] = HfArg(default_factory=lambda: ["pickscore"], help=f"reward model(s), from {', '.join(rewards.REWARDS)}")
    reward_weights: list[float] = HfArg(default_factory=list, help="weights w_m of several rewards (App. D.2; normalised to sum 1; default equal)")
    reward_path: list[str] = HfArg(default_factory=list, metadata={"action": "extend"}, help="NAME=PATH: weights (or hub id) of reward NAME; repeatable")
    reward_dtype: Literal["fp32", "bf16"] = HfArg(default="fp32", help="reward models' dtype")
    reward_zscore: bool = HfArg(default=True, help="z-score a single reward within each prompt's group (released configs); several are z-scored and summed already")
    beta_start: float = HfArg(default=0.8, help="beta_0: reward temperature at step 0 (Sec. 4.1; released: 0.8)")
    beta_end: float = HfArg(default=2.0, help="beta_1: reward temperature after warmup (released: 2.0)")
    beta_warmup_steps: int = HfArg(default=150, help="W: steps of linear beta warmup (released: 150; 100 for OCR)")
    logprob_reduce: Literal["mean", "sum"] = HfArg(default="mean", help="mean (per-dimension, Eq. 49, the paper) | sum (log-density, Eq. 48)")
    target: Literal["boltzmann", "tilted"] = HfArg(default="boltzmann", help="TMPO's target: boltzmann softmax(beta R) (Eq. 5, as "
                                                   "published) | tilted P_ref exp(beta R / lambda), the base (LoRA off) in the target")
    tilt_weight: float = HfArg(default=1.0, help="lambda: weight of log P_ref - log P in the tilted advantage; optimum "
                                                 "P_ref exp(beta R / lambda) (per dimension under --logprob_reduce mean: KL / D)")
    # update (Eqs. 6-7, 30-32)
    clip_eps: float = HfArg(default=0.2, help="epsilon: IS ratio clip range (Eq. 6; App. D: 0.2)")
    dual_clip: float = HfArg(default=tmpo.DUAL_CLIP, help="c: cap on rho of leaves with A < 0 (dual-clip PPO, Ye et al. 2020; "
                                                          "not in the paper; every method); 0 = Eq. (6) exactly")
    ratio_norm: bool = HfArg(default=True, help="RatioNorm bias correction of the IS ratio (Eq. 32)")
    kl_coef: float = HfArg(default=0.0, help="weight of the KL to the reference model (LoRA off); 0 for TMPO as released. The true "
                           "Gaussian KL ||mu - mu_ref||^2 / (2 s^2) per transition, summed along the path; with --sde_kind "
                           "flow_grpo, Flow-GRPO's is |dt| times this one (7.3x smaller at step 2 of 6)")
    updates_per_rollout: int = HfArg(default=1, help="optimizer steps per rollout (the first is exactly on-policy)")
    update_chunk: int = HfArg(default=4, help="parents per backward in the update (same gradient; 0 = one graph); memory per parent "
                                              "at 512^2: 11.8 GiB of activations, 0.8 with --gradient_checkpointing")
    lr: float = HfArg(default=5e-5, aliases=["--learning_rate"], help="AdamW learning rate (App. D: 5e-5 PickScore, 3e-5 others)")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = HfArg(default="cosine", help="diffusers' get_scheduler (App. D: cosine)")
    lr_warmup_steps: int = HfArg(default=0, help="lr warmup in optimizer steps (diffusers: lr 0 at the first step, then linear)")
    weight_decay: float = HfArg(default=1e-4, help="AdamW weight decay (App. D: 1e-4)")
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1")
    adam_beta2: float = HfArg(default=0.999, help="AdamW beta2")
    adam_eps: float = HfArg(default=1e-8, help="AdamW epsilon")
    max_grad_norm: float = HfArg(default=0.3, help="global grad-norm clip (App. D: 0.3 PickScore, 0.5 others)")
    max_steps: int = HfArg(default=500, aliases=["--max_train_steps"], help="steps (App. D: 500 PickScore and joint, 1000 GenEval, 250 OCR)")
    ema_decay: float = HfArg(default=0.9, help="EMA decay of the LoRA weights (App. D: 0.9)")
    ema_every: int = HfArg(default=8, help="EMA update interval in steps (App. D: 8)")
    # validation (not in the paper: a view of the EMA policy while it trains)
    validation_every: int = HfArg(default=0, help="validate every this many steps (0 = never): EMA weights, fixed noise, ODE")
    validation_prompts: str = HfArg(default="", help="held-out prompt file for validation (same formats as --prompts)")
    validation_split: int = HfArg(default=0, help="or hold out this many prompts of --prompts (chosen by --seed) for validation")
    validation_images: int = HfArg(default=4, help="images per validation prompt (>= 2: LGMD compares them)")
    validation_steps: int = HfArg(default=28, help="ODE steps of a validation sample (the paper's evaluation: 28)")
    # run
    seed: int = HfArg(default=0, help="seed: LoRA init, data order and branch positions (same on all ranks); noise per (seed, rank)")
    output_dir: str = HfArg(default="outputs/tmpo", help="checkpoints, run_summary.json, metrics.jsonl, validation grids, tracker logs")
    save_every: int = HfArg(default=50, help="write checkpoint-{step} every this many steps (and at the end)")
    checkpoints_total_limit: int = HfArg(default=0, help="keep only the newest N checkpoints (the oldest removed once a new one is complete; 0 = all)")
    resume: str = HfArg(default="", aliases=["--resume_from_checkpoint"], help="'latest' (newest checkpoint in --output_dir) or a checkpoint folder")
    stop_after_steps: int = HfArg(default=0, help="stop once this step number is reached, as a kill would (no final save); 0 = never")
    report_to: Literal["tensorboard", "wandb", "none"] = HfArg(default="tensorboard", help="metrics tracker (accelerate)")
    tracker_project: str = HfArg(default="tmpo", help="project name for the tracker (tensorboard: its log folder in --output_dir)")
    take_over_lock: bool = HfArg(default=False, help="take over --output_dir's lock left by a run that is gone (a stale lock)")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


# The valid range of every numeric flag (common.check_ranges), checked before any model loads.
RANGES = {
    "lora_rank": "[1, inf)", "lora_alpha": "(0, inf)", "prompts_per_process": "[1, inf)", "num_steps": "[2, inf)",
    "branch_k": "[1, inf)", "kappa": "(0, inf]", "eta": "(0, 1]", "rollout_batch": "[0, inf)", "decode_batch": "[1, inf)",
    "beta_start": "[0, inf)", "beta_end": "[0, inf)", "beta_warmup_steps": "[0, inf)", "clip_eps": "(0, 1)",
    "kl_coef": "[0, inf)", "tilt_weight": "(0, inf)", "dual_clip": "[0, inf)", "updates_per_rollout": "[1, inf)",
    "update_chunk": "[0, inf)", "lr": "(0, 1)", "lr_warmup_steps": "[0, inf)", "weight_decay": "[0, inf)",
    "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_eps": "(0, inf)", "max_grad_norm": "(0, inf)",
    "max_steps": "[1, inf)", "ema_decay": "[0, 1)", "ema_every": "[1, inf)", "validation_every": "[0, inf)",
    "validation_split": "[0, inf)", "validation_images": "[2, inf)", "validation_steps": "[1, inf)",
    "seed": "[0, 4294967295]", "save_every": "[1, inf)", "stop_after_steps": "[0, inf)",
    "checkpoints_total_limit": "[0, inf)",
}


def parse_args(argv=None) -> Args:
    """The command line (common.parse_args) with every check that needs no model: fail before minutes
    of loading (raises common.InputError)."""
    args = common.parse_args(Args, argv, prog="train.py")
    need = common.require
    common.check_flux_args(args, RANGES)
    unknown = [n for n in args.reward if n not in rewards.REWARDS]
    need(not unknown, f"unknown reward(s) {unknown} in --reward; known: {', '.join(rewards.REWARDS)} (names separated by spaces)")
    need(len(set(args.reward)) == len(args.reward), f"--reward lists a reward twice: {args.reward}")
    need(not args.reward_weights or len(args.reward_weights) == len(args.reward),
         f"--reward_weights {args.reward_weights}: give one weight per reward of --reward {args.reward}")
    need(np.isfinite(args.reward_weights).all(), f"--reward_weights must be finite, got {args.reward_weights}")
    need(not args.geneval_url or "geneval" in args.reward, f"--geneval_url given but geneval is not in --reward {args.reward}")
    extra = sorted(set(common.parse_named(args.reward_path, "--reward_path")) - set(args.reward))
    need(not extra, f"--reward_path names {extra}, which are not in --reward {args.reward}")
    for flag in ("branch_early", "branch_late"):
        need(sorted(set(getattr(args, flag))) == getattr(args, flag),
             f"--{flag} {getattr(args, flag)}: branch positions must be distinct and increasing")
    need(len(args.branch_early) == len(args.branch_late),
         f"--branch_early {args.branch_early} and --branch_late {args.branch_late} need the same length")
    try:  # the curriculum endpoints must be valid positions (raises with the valid range)
        tree_sampler.branch_schedule(0.0, args.branch_early, args.branch_late, float("inf"), args.num_steps)
    except ValueError as err:
        raise common.InputError(f"--branch_early/--branch_late: {err}") from err
    need(args.target == "boltzmann" or args.method == "tmpo", "--target tilted is TMPO's target: use it with --method tmpo")
    # The tilted advantage already carries lambda KL(P_theta || P_ref); a --kl_coef penalty on top would
    # weigh the same KL twice (and run the reference forwards of the rollout again in the update).
    need(args.target == "boltzmann" or args.kl_coef == 0, "--target tilted has the KL to the base in its target: "
         "weigh it with --tilt_weight, not --kl_coef")
    need(args.dual_clip == 0 or args.dual_clip > 1 + args.clip_eps,
         f"--dual_clip {args.dual_clip}: must be 0 (Eq. 6 exactly) or > 1 + --clip_eps = {1 + args.clip_eps}")
    need(not (args.validation_prompts and args.validation_split), "give --validation_prompts or --validation_split, not both")
    need(not args.validation_every or args.validation_prompts or args.validation_split,
         "--validation_every needs held-out prompts: --validation_prompts FILE or --validation_split N")
    return args


# ----------------------------------------------------------------------------------------------
# The tree of one step and the plan of the run
# ----------------------------------------------------------------------------------------------


def make_spec(args: Args, branch_steps) -> tree_sampler.TreeSpec:
    """TMPO's tree at the given branch positions, or Flow-GRPO's K independent SDE trajectories."""
    if args.sampler == "tree":
        return tree_sampler.TreeSpec.tree(args.num_steps, branch_steps, args.branch_k, args.eta, args.sde_kind)
    K = args.branch_k ** len(args.branch_early)  # the same group size as the tree
    last = args.num_steps - 2 if args.sde_kind == "cps" else args.num_steps - 1  # CPS: no noise on the last step
    return tree_sampler.TreeSpec.independent(args.num_steps, K, range(0, last + 1), args.eta, args.sde_kind)


def plan_lines(args: Args, world_size: int) -> list:
    """What the run will do, in numbers (printed at start, stored in run_summary.json)."""
    early, late = make_spec(args, args.branch_early), make_spec(args, args.branch_late)
    G, K, ref = args.prompts_per_process, early.leaves_per_group, args.target == "tilted"
    tree = args.sampler == "tree"
    shape = (f"tree: {early.roots} root(s), k = {args.branch_k} at SDE steps; branch positions {list(args.branch_early)} -> "
             f"{list(args.branch_late)} (kappa {args.kappa})" if tree else
             f"independent: {K} trajectories, SDE at steps {sorted(early.fanout)}")
    rollout = f"{early.rollout_nfe(G, ref)}" + (f" (early tree) .. {late.rollout_nfe(G, ref)} (late tree)" if tree else "")
    if ref:
        rollout += (f", of which {early.rollout_nfe(G, True) - early.rollout_nfe(G)} reference forwards without grad "
                    "(LoRA off: log P_ref of every leaf, --target tilted)")
    per_update = early.update_nfe(G)  # forwards with grad: one per unique parent of each SDE step
    extra = [text for on, text in (
        (args.updates_per_rollout > 1 and args.update_chunk > 0,
         f"{per_update} without grad before each later update (the ratio at the new parameters)"),
        (args.kl_coef > 0, f"{per_update} reference forwards without grad per update (KL)")) if on]
    return [
        f"method {args.method}" + (f" (target {args.target})" if args.method == "tmpo" else "") + f", sampler {shape}",
        f"processes (world size): {world_size}",
        f"prompts per step: {G} per process x {world_size} = {G * world_size}",
        f"leaves (images) per prompt: K = {K}; images per step: {G * K * world_size} ({G * K} per process)",
        f"denoising steps: {args.num_steps}; resolution {args.height}x{args.width}; guidance {args.guidance}",
        f"transformer forwards per rollout per process: {rollout}; {G * K * args.num_steps} if every leaf were sampled alone",
        f"forwards with grad per update per process: {per_update}" + (f" (+ {'; + '.join(extra)})" if extra else "")
        + f"; {args.update_chunk or 'all'} parents per backward",
        f"updates per rollout: {args.updates_per_rollout}; steps: {args.max_steps}; "
        f"optimizer steps: {args.max_steps * args.updates_per_rollout}",
    ]


# ----------------------------------------------------------------------------------------------
# LoRA weights, EMA and checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(run, step: int) -> str:
    """checkpoint-{step}: the LoRA and its EMA in diffusers' format, the optimizer and lr schedule,
    the arguments, and each rank's RNG streams (see the module docstring)."""
    # {"lora" / "ema": {key in the LoRA file: full tensor}}: collective under FSDP (every rank gathers)
    full = {sub: {run.keys[n]: common.full_tensor(t) for n, t in tensors.items()} for sub, tensors in run.weights.items()}
    state = {"step": step, "world_size": run.world, "args": dataclasses.asdict(run.args), "base_fingerprint": run.fingerprint,
             "optimizer": None if run.sharded else run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
    rank_state = {**common.rng_states(run.device, noise_generator=run.noise_gen, schedule_rng=run.sched_rng),
                  "optimizer": run.optimizer.state_dict() if run.sharded else None}
    path = common.save_checkpoint(run.accelerator, run.args.output_dir, step, run.base, full, state, rank_state)
    if run.is_main:  # only once the new checkpoint is complete
        common.prune_checkpoints(run.args.output_dir, run.args.checkpoints_total_limit)
        run.summary["checkpoints"] = common.loadable_checkpoints(run.args.output_dir)
        common.write_json(os.path.join(run.args.output_dir, "run_summary.json"), run.summary)
    return path


# Flags that do not change what a run computes: free to differ when resuming. Every other flag must
# equal the checkpoint's (schedules, data order and tree shapes depend on them).
OPERATIONAL_ARGS = {"config", "model", "output_dir", "resume", "stop_after_steps", "report_to", "tracker_project",
                    "save_every", "rollout_batch", "decode_batch", "reward_path", "geneval_url", "gradient_checkpointing",
                    "validation_every", "validation_prompts", "validation_images", "validation_steps", "take_over_lock",
                    "checkpoints_total_limit", "reward_timeout", "reward_retries"}


def load_checkpoint(run, path: str) -> int:
    """Restore everything `save_checkpoint` wrote; return the step to continue from."""
    state = common.read_checkpoint_file(path, "trainer_state.pt")
    rank_state = common.read_checkpoint_file(path, f"rank{run.rank}.pt")
    now = dataclasses.asdict(run.args)
    # A finished run (its last checkpoint) may be extended with a larger --max_steps; the lr schedule
    # and the branch curriculum then run to the new length from here.
    extend = state["step"] == state["args"]["max_steps"] < run.args.max_steps
    changed = {k: (v, now[k]) for k, v in state["args"].items()
               if k not in OPERATIONAL_ARGS and k in now and v != now[k] and not (extend and k == "max_steps")}
    common.require(not changed, f"{path} belongs to a run with other settings; resuming would not continue it. "
                   + "; ".join(f"--{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items()))
    common.require(state["base_fingerprint"] == run.fingerprint, f"{path} was trained on other base weights (fingerprint "
                   f"{state['base_fingerprint']}) than --model {run.args.model} ({run.fingerprint}): pass the model it was trained on")
    common.require(state["world_size"] == run.world, f"{path} was written by {state['world_size']} processes, this run has "
                   f"{run.world}: resume with the same number (each rank's noise stream is saved)")
    for sub, tensors in run.weights.items():  # the LoRA files save_checkpoint wrote (diffusers prefixes "transformer.")
        saved = common.read_checkpoint_file(path, f"{sub}/pytorch_lora_weights.safetensors")
        for name, key in run.keys.items():
            common.assign(tensors[name], saved[f"transformer.{key}"])
    run.optimizer.load_state_dict(rank_state["optimizer"] if run.sharded else state["optimizer"])
    if not extend:
        run.scheduler.load_state_dict(state["scheduler"])
    for _ in range(state["step"] * run.args.updates_per_rollout if extend else 0):  # the longer run's schedule, from its start
        run.scheduler.step()
    common.set_rng_states(rank_state, run.device, noise_generator=run.noise_gen, schedule_rng=run.sched_rng)
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def setup(args: Args, stack) -> SimpleNamespace:
    """Accelerator, output folder, rewards, FLUX + LoRA, optimizer, schedule, RNGs, resume: the state of
    a run. The output folder's lock is released by `stack` (a contextlib.ExitStack) however the run ends."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    items, val_items = common.prompt_sets(args)  # a bad prompt file fails before any model is loaded
    acc = common.make_accelerator(args.report_to, args.output_dir, fsdp_plugin=flux.fsdp_plugin())
    run = SimpleNamespace(args=args, accelerator=acc, items=items, val_items=val_items, rank=acc.process_index,
                          world=acc.num_processes, device=acc.device, is_main=acc.is_main_process,
                          dtype=common.resolve_dtype(args.dtype, acc.device), last_ckpt=None, start_step=0,
                          sharded=acc.distributed_type == DistributedType.FSDP)
    common.require(args.update_chunk or acc.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU),
                   "--update_chunk 0 puts every recomputed transition in one graph, and DDP cannot reduce a parameter "
                   "used by several forwards of one backward: use --update_chunk >= 1")

    def claim():  # main process; before any model loads
        common.claim_output_dir(args.output_dir, args.take_over_lock)
        stack.callback(common.release_output_dir, args.output_dir)
        return common.resume_target(args.output_dir, args.resume, args.max_steps)

    resume_path = common.on_main_process(acc, claim)
    set_seed(args.seed)  # same seed on every rank: identical LoRA init (FSDP2 does not broadcast it), data order, trees

    # Rewards first: a missing reward model is found in seconds, not after loading FLUX.
    paths = {**common.parse_named(args.reward_path, "--reward_path"), **({"geneval": args.geneval_url} if args.geneval_url else {})}
    run.reward_fn = rewards.load_rewards(args.reward, weights=args.reward_weights or None, paths=paths, device=run.device,
                                         dtype=common.DTYPES[args.reward_dtype], reward_kwargs={"geneval": {
                                             "timeout": args.reward_timeout, "retries": args.reward_retries}})
    # Default: on on a GPU (needed there, see the memory plan below), off on the CPU smoke runs (only a slowdown there).
    args.gradient_checkpointing = run.device.type == "cuda" if args.gradient_checkpointing is None else args.gradient_checkpointing
    run.pipe = flux.load_flux(args.model, dtype=run.dtype, device=run.device, offload_text_encoders=True)
    run.fingerprint = common.fingerprint(run.pipe)  # of the base weights, stored with every checkpoint
    base = run.pipe.transformer
    flux.add_lora(base, rank=args.lora_rank, alpha=args.lora_alpha)  # LoRA on a frozen base
    cast_training_params(base, dtype=torch.float32)  # the trainable (LoRA) weights in fp32, the base in its dtype
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    _, _, run.seq_len, run.channels = flux.latent_geometry(run.pipe, args.height, args.width)  # S tokens of C channels
    run.sigmas = flux.flux_sigmas(run.pipe, args.num_steps, args.height, args.width)  # (N + 1,)
    run.img_ids = flux.image_ids(run.pipe, args.height, args.width, device=run.device, dtype=run.dtype)  # (S, 3)

    run.memory = flux.memory_plan(  # what one GPU holds, from the models' own sizes (flux.memory_plan), printed at start
        flux.memory_parts(run.pipe, run.reward_fn), flux.activation_bytes(base, run.img_ids, args.max_sequence_length),
        make_spec(args, args.branch_early), args.prompts_per_process, rollout_batch=args.rollout_batch,
        update_chunk=args.update_chunk, world_size=run.world, sharded=run.sharded, checkpointing=args.gradient_checkpointing,
        device_bytes=torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda" else None)
    # No list of the LoRA tensors is kept: prepare() shards them under FSDP2, and a reference would keep the full copies.
    run.optimizer = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_eps, weight_decay=args.weight_decay)
    # Not prepared: accelerate would step a prepared scheduler once per process per call.
    run.scheduler = get_scheduler(args.lr_scheduler, run.optimizer, num_warmup_steps=args.lr_warmup_steps,
                                  num_training_steps=args.max_steps * args.updates_per_rollout)
    run.transformer, run.optimizer = acc.prepare(base, run.optimizer)
    run.base = acc.unwrap_model(run.transformer)
    run.params = {n: p for n, p in run.base.named_parameters() if p.requires_grad}  # after prepare (FSDP2 reshards)
    run.keys = {n: n.replace(".default.", ".") for n in run.params}  # keys in the LoRA file: peft drops the adapter name
    # fp32 EMA of the LoRA: ema <- d ema + (1 - d) theta (App. D: d = 0.9 every 8 steps), per rank on its
    # (possibly sharded) parameters, elementwise, so exact under FSDP. min_decay = decay and
    # update_after_step = -1 switch off diffusers' decay warmup (ema = theta at the first update).
    run.ema = EMAModel(list(run.params.values()), decay=args.ema_decay, min_decay=args.ema_decay, update_after_step=-1)
    run.weights = {"lora": run.params, "ema": dict(zip(run.params, run.ema.shadow_params))}  # what a checkpoint holds

    # A different noise stream per rank, seeded from (seed, rank).
    run.noise_gen = torch.Generator(device=run.device).manual_seed(int(np.random.SeedSequence([args.seed, run.rank]).generate_state(1)[0]))
    run.sched_rng = np.random.default_rng(args.seed)  # the same on every rank: the tree shapes agree
    if resume_path:
        run.start_step, run.last_ckpt = load_checkpoint(run, resume_path), resume_path
        if run.is_main:
            print(f"resumed from {resume_path} at step {run.start_step}", flush=True)
            common.truncate_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), run.start_step)
    return run


def train_step(run, step: int, stop) -> dict:
    """One iteration (steps 1-6 of the module docstring) on this rank; returns its metrics (means over
    ranks), with "stop" > 0 if any rank received SIGTERM (`stop`, from common.stop_signal)."""
    args = run.args
    t_iter = time.perf_counter()
    # 1. Branch positions (Eqs. 41-46); p = step / total steps
    branch = tree_sampler.branch_schedule(step / args.max_steps, args.branch_early, args.branch_late, args.kappa,
                                          args.num_steps, generator=run.sched_rng) if args.sampler == "tree" else []
    spec = make_spec(args, branch)
    K, G = spec.leaves_per_group, args.prompts_per_process
    indices = common.prompt_indices(step, run.rank, G, run.world, len(run.items), args.seed)
    batch = [run.items[i] for i in indices]
    prompts = [b["prompt"] for b in batch]
    cond, text_ids = flux.encode_prompts(run.pipe, prompts, args.max_sequence_length, device=run.device)
    velocity_fn = flux.make_velocity_fn(run.transformer, text_ids, run.img_ids, guidance=args.guidance, dtype=run.dtype)

    def check(what, values):
        common.check_finite(what, values, step, prompts, run.rank, run.last_ckpt)

    # 2. Rollout (Sec. 4.2): x_root drawn here so its checksum shows each rank's own noise
    t0 = time.perf_counter()
    x_root = torch.randn((G * spec.roots, run.seq_len, run.channels), generator=run.noise_gen, device=run.device)
    if step == run.start_step:  # evidence for run_summary.json: each rank its own noise and prompts
        run.summary["root_noise_checksum_per_rank"] = run.accelerator.gather(x_root.double().sum().reshape(1)).tolist()
        run.summary["prompt_indices_per_rank"] = run.accelerator.gather(torch.tensor(indices, device=run.device)).view(run.world, G).tolist()
    ref_fn = reference_velocity(run, velocity_fn) if args.target == "tilted" or args.kl_coef > 0 else None
    ro = tree_sampler.rollout(velocity_fn, spec, run.sigmas, cond, G, (run.seq_len, run.channels), generator=run.noise_gen,
                              x_root=x_root, device=run.device, dtype=torch.float32, max_batch=args.rollout_batch or None,
                              reduce=args.logprob_reduce, ref_velocity_fn=ref_fn if args.target == "tilted" else None)
    t_rollout, t0 = time.perf_counter() - t0, time.perf_counter()
    log_p = ro.traj_log_prob(args.logprob_reduce)  # (G, K), Eq. (47)
    check("trajectory log-prob", log_p)
    check("final latents", ro.x0.reshape(G, -1))  # (G, K*S*C)

    # 3. Decode and reward; leaves are group-major: rows g*K .. g*K+K-1 belong to prompt g
    images = flux.decode(run.pipe, ro.x0, args.height, args.width, max_batch=args.decode_batch)  # (G*K, 3, H, W)
    check("decoded images", images.reshape(G, -1))
    t_decode, t0 = time.perf_counter() - t0, time.perf_counter()
    try:
        raw, R = run.reward_fn(images, [p for p in prompts for _ in range(K)], [dict(b) for b in batch for _ in range(K)],
                               group_size=K)
    except (FloatingPointError, rewards.RewardServerError) as err:  # rewards.py names the reward, prompt or server
        raise common.RunError(f"step {step + 1} (rank {run.rank}): {err}; {common.kept(run.last_ckpt)}") from err
    R = R.float().view(G, K)  # (G*K,) -> (G, K)
    check("reward", R)
    t_reward = time.perf_counter() - t0

    # 4. Advantage: Eq. (5) for TMPO (or its reward-tilted target), Eq. (28) for GRPO; beta warms up
    # (Sec. 4.1). Several rewards arrive already z-scored and summed (rewards.aggregate_rewards, App. D.2):
    # a second z-score would sharpen beta by 1 / std(sum) (1.73x for three rewards); the release has none.
    beta = tmpo.beta_schedule(step, args.beta_start, args.beta_end, args.beta_warmup_steps)
    R_adv = tmpo.group_zscore(R) if args.reward_zscore and not run.reward_fn.standardized else R
    extra = {}
    if args.method == "grpo":
        A = tmpo.grpo_advantage(R_adv)  # (G, K), Eq. (28)
    elif args.target == "tilted":  # A = beta R + lambda (log P_ref - log P) + const: lambda * A(beta / lambda)
        ref_log_p = ro.traj_log_prob(args.logprob_reduce, reference=True)  # (G, K)
        check("reference log-prob", ref_log_p)
        A = args.tilt_weight * tmpo.softmax_tb_advantage(log_p, R_adv, beta / args.tilt_weight, ref_log_probs=ref_log_p)
        extra["policy/ref_log_ratio"] = (log_p - ref_log_p).mean()  # estimates KL(P_theta || P_ref) over the SDE steps
    else:
        A = tmpo.softmax_tb_advantage(log_p, R_adv, beta)  # (G, K), Eq. (5)
    check("advantage", A)

    # 5. Clipped importance-sampled update(s), Eqs. (6)-(7) with RatioNorm (32)
    t0 = time.perf_counter()
    upd = update_policy(run, velocity_fn, ro, cond, A, check, ref_fn)
    t_update = time.perf_counter() - t0

    # 6. EMA of the LoRA weights (App. D: decay 0.9 every 8 steps)
    if (step + 1) % args.ema_every == 0:
        run.ema.step(run.params.values())

    local = {"reward/mean": R.mean(), "reward/std": R.std(dim=1, unbiased=False).mean(), "adv/abs_mean": A.abs().mean(),
             "time/rollout_s": t_rollout, "time/decode_s": t_decode, "time/reward_s": t_reward, "time/update_s": t_update,
             "train/grad_norm": upd.pop("grad_norm"), **{f"reward/{n}": raw[n].float().mean() for n in args.reward},
             **{f"policy/{k}": upd.pop(k) for k in ("loss", "clipfrac", "approx_kl", "kl")},
             "nonfinite_lora": upd.pop("nonfinite_lora"), "stop": float(stop.received), **extra}
    mean = common.mean_over_ranks(run.accelerator, local)  # every rank joins the collective
    if mean.pop("nonfinite_lora"):  # checked before anything is saved from this state
        check("LoRA weights after the optimizer step", torch.tensor(float("nan")))
    return {**mean, "tree/leaves": K, "tree/nfe_rollout": ro.nfe, **{f"tree/branch_{b}": n for b, n in enumerate(branch)},
            **upd, "train/beta": beta, "time/iter_s": time.perf_counter() - t_iter}


def reference_velocity(run, velocity_fn):
    """The reference P_ref = the base model: the same velocity function with the LoRA switched off, no grad
    (for --target tilted in the rollout, and for the KL of --kl_coef in the update)."""
    @torch.no_grad()
    def ref_fn(x, t, c):
        run.base.disable_adapters()
        try:
            return velocity_fn(x, t, c)
        finally:
            run.base.enable_adapters()
    return ref_fn


def update_policy(run, velocity_fn, ro, cond, A, check, ref_fn) -> dict:
    """Step 5: `updates_per_rollout` optimizer steps on the clipped loss of Eq. (6); returns the
    means of tree_sampler.update's statistics over them, the last grad norm and lr, and the forwards."""
    args = run.args
    nfe, nonfinite, update_stats = 0, 0, []
    for u in range(args.updates_per_rollout):
        run.optimizer.zero_grad(set_to_none=True)
        # One call for all G groups: the loss is already the mean over the G*K leaves.
        stats = tree_sampler.update(
            velocity_fn, ro, cond, A, clip_eps=args.clip_eps, dual_clip=args.dual_clip or None, reduce=args.logprob_reduce,
            ratio_norm=args.ratio_norm, chunk_size=args.update_chunk or None, on_policy=(u == 0),
            kl_coef=args.kl_coef, ref_velocity_fn=ref_fn if args.kl_coef > 0 else None, backward=run.accelerator.backward,
        )
        check("loss", torch.tensor(stats["loss"]))
        grad_norm = run.accelerator.clip_grad_norm_(list(run.params.values()), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        check("gradient norm", torch.as_tensor(grad_norm))
        lr = run.scheduler.get_last_lr()[0]  # the lr this optimizer step uses
        run.optimizer.step()
        run.scheduler.step()
        # LoRA weights finite after every optimizer step (this rank's shard; summed over ranks with the metrics)
        nonfinite += sum(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in run.params.values())
        nfe += stats["nfe_grad"] + stats["nfe_nograd"]
        update_stats.append(stats)
    return {**{k: sum(s[k] for s in update_stats) / len(update_stats) for k in ("loss", "clipfrac", "approx_kl", "kl")},
            "grad_norm": grad_norm, "nonfinite_lora": float(nonfinite), "train/lr": lr, "tree/nfe_update": nfe}


@torch.no_grad()
def validate(run, step: int) -> dict:
    """Step 7: ODE samples of the held-out prompts from the EMA weights, the same noise every time
    (common.initial_noise: seed, prompt, image); rewards, LGMD and a grid. Every rank samples an
    equal share (padded by repeating the last prompt: FSDP needs the same forwards on every rank)."""
    from accelerate.utils import gather_object

    args, n = run.args, run.args.validation_images
    records = []
    run.ema.store(run.params.values())  # the trained weights, put back exactly below: training continues bit-identically
    run.ema.copy_to(run.params.values())
    try:
        with run.accelerator.split_between_processes(list(range(len(run.val_items))), apply_padding=True) as mine:
            for p in mine:  # this rank's share of the held-out prompts
                item = run.val_items[p]
                _, images, latents = common.paired_samples(run.pipe, [item["prompt"]], [p], args.seed, n, args.validation_steps,
                                                           args.guidance, args.height, args.width, args.max_sequence_length,
                                                           args.decode_batch)  # (n, 3, H, W), (n, C, h, w)
                raw, _ = run.reward_fn(images, [item["prompt"]] * n, [dict(item)] * n, group_size=n)
                records.append({"index": p, "lgmd": metrics.lgmd(latents), "pixels": common.to_uint8(images),
                                **{f"reward_{k}": float(v.float().mean()) for k, v in raw.items()}})
    finally:
        run.ema.restore(run.params.values())
    records = {r["index"]: r for r in gather_object(records)}  # the padding's repeats collapse
    if not run.is_main:
        return {}
    rows = [records[p] for p in range(len(run.val_items))]
    out = {f"validation/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("index", "pixels")}
    title = f"step {step}, EMA weights, {n} fixed noises per row: " + "; ".join(
        f"{p}: {it['prompt']}" for p, it in enumerate(run.val_items))
    grid = np.asarray(common.save_grid(os.path.join(args.output_dir, "validation", f"step-{step}.png"), title,
                                       {str(p): r["pixels"] for p, r in enumerate(rows)}, 256))  # (H, W, 3)
    common.log_image(run.accelerator, "validation/grid", grid, step)
    return out


def train(run, stop) -> int:
    """The loop: steps, validation, logging, checkpoints; returns the exit status (143 after SIGTERM)."""
    from tqdm.auto import tqdm

    args, acc = run.args, run.accelerator
    plan = plan_lines(args, run.world) + run.memory["lines"]
    if run.is_main:
        print("TMPO run plan:\n  " + "\n  ".join(plan), flush=True)
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(args).items()}
        acc.init_trackers(args.tracker_project, config=config)
    run.summary = {"plan": plan, "world_size": run.world, "args": dataclasses.asdict(args), "start_step": run.start_step,
                   "checkpoints": common.loadable_checkpoints(args.output_dir)}
    stop_at = min(args.max_steps, args.stop_after_steps or args.max_steps)
    bar = tqdm(range(run.start_step, stop_at), initial=run.start_step, total=args.max_steps, disable=not run.is_main,
               desc=args.method, dynamic_ncols=True)
    metrics_, stopping = {}, False
    for step in bar:
        metrics_ = train_step(run, step, stop)
        stopping = metrics_.pop("stop") > 0  # the same decision on every rank
        if args.validation_every and (step + 1) % args.validation_every == 0 and not stopping:
            metrics_.update(validate(run, step + 1))
        if run.is_main:
            acc.log(metrics_, step=step + 1)
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": step + 1, **metrics_}) + "\n")
            bar.set_postfix(reward=f"{metrics_['reward/mean']:.4g}", loss=f"{metrics_['policy/loss']:.3g}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stopping:
            run.last_ckpt = save_checkpoint(run, step + 1)
        elif step == run.start_step and run.is_main:
            common.write_json(os.path.join(args.output_dir, "run_summary.json"), run.summary)
        if stopping:
            stop_at = step + 1
            break
    bar.close()
    # Every rank's LoRA must be identical after synchronised updates (DDP all-reduce / FSDP): record it.
    lora_sum = sum(common.full_tensor(p).double().sum() for p in run.params.values()).reshape(1).to(run.device)
    run.summary["lora_checksum_per_rank"] = acc.gather(lora_sum).tolist()
    if run.is_main and stopping:
        print(f"stopped by SIGTERM after step {stop_at}: {run.last_ckpt} saved; continue with --resume latest", flush=True)
    elif run.is_main and stop_at < args.max_steps:
        print(f"stopping after step {stop_at} as asked (--stop_after_steps); resume with --resume latest", flush=True)
    elif run.is_main:
        run.summary.update(final_step=args.max_steps, final_metrics=metrics_, final_checkpoint=run.last_ckpt)
        common.write_json(os.path.join(args.output_dir, "run_summary.json"), run.summary)
        print(f"done: {run.last_ckpt} (load the EMA LoRA with FluxPipeline.load_lora_weights('{run.last_ckpt}/ema'))",
              flush=True)
    return 143 if stopping else 0


def main(argv=None) -> int:
    """Exit status: 0, 143 after SIGTERM, 1 for a run-time failure, 2 for bad input (common.run_main)."""
    def run_training():
        args = parse_args(argv)
        with contextlib.ExitStack() as stack:  # releases the output folder's lock, restores SIGTERM
            stop = stack.enter_context(common.stop_signal())
            run = setup(args, stack)
            status = train(run, stop)
            common.end_run(run.accelerator, run)
            return status

    return common.run_main("train.py", run_training)


if __name__ == "__main__":
    sys.exit(main())
