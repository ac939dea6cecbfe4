r"""Train FLUX.1-dev with TMPO (or the Flow-GRPO / tree-GRPO baselines) under accelerate.

Paper: Li et al. 2026, "Trajectory Matching Policy Optimization", Sec. 4 and App. D (setup).
Equation numbers are those of ../shared/paper/EQUATIONS.md. The math lives in two files this
script only calls: tmpo.py (advantage Eq. 5 / 28, clipped loss Eq. 6, beta warmup) and
tree_sampler.py (the tree rollout of Sec. 4.2, branch curriculum Eqs. 41-46, the importance-sampled
update Eqs. 7, 30-32). flux.py turns FLUX into a velocity function, rewards.py scores images.

One iteration ("step"), per process, for `prompts_per_process` prompts (G):
  1. branch positions from the curriculum (Eqs. 41-46; the same tree shape on every rank);
  2. tree rollout (Sec. 4.2): K = k^L leaves per prompt (27 = 3 roots x 3 x 3), no grad;
  3. VAE decode, reward R (N = G K images), optionally z-scored within each group;
  4. advantage: TMPO A = log softmax(beta R) - log softmax(log P(tau)) (Eq. 5), or GRPO's
     z-scored reward (Eq. 28);
  5. `updates_per_rollout` clipped IS updates (Eqs. 6-7), AdamW, grad-norm clip, cosine lr;
  6. every `ema_every` steps the EMA of the LoRA weights (used for evaluation and saving).

Run it (the defaults are the paper's PickScore protocol, App. D):
    # 8 GPUs, FSDP (the paper's setup); --prompts: .txt (one per line), .json or .jsonl
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml train.py \
        --model black-forest-labs/FLUX.1-dev --prompts prompts/pickscore_train.txt \
        --reward pickscore --output-dir outputs/tmpo_pickscore --report-to tensorboard
    # one GPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py --prompts p.txt ...
    # baselines through the same loop
    ... train.py --method grpo --sampler independent --kl-coef KL     # Flow-GRPO
    ... train.py --method grpo --sampler tree                         # tree-GRPO
    # continue a run that was stopped
    ... train.py ... --output-dir outputs/tmpo_pickscore --resume latest
    # CPU smoke run on tiny random models (no downloads)
    python tests/tiny_flux.py /tmp/tiny_flux && python tests/tiny_rewards.py /tmp/tiny_rewards
    printf 'a photo of a cat\na red cube\n' > /tmp/p.txt
    python train.py --model /tmp/tiny_flux --reward-path pickscore=/tmp/tiny_rewards/pickscore \
        --prompts /tmp/p.txt --height 32 --width 32 --max-sequence-length 16 --max-steps 2 \
        --save-every 1 --output-dir /tmp/tmpo_smoke
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

Log-prob reduction (`--logprob-reduce`): "mean" is the paper's per-dimension log-prob (Eq. 49). It
does not cancel in the softmax of Eq. (5): log P differences shrink by D (65536 at 512^2), so p is
close to uniform and the TMPO advantage is close to log softmax(beta R) + log K. "sum" is the true
log-density (Eq. 48); the importance ratio uses the same reduction (with "mean", its RatioNorm
correction is divided by D too; tree_sampler.update).

Rewards: `--reward-zscore` (default on, as the released configs) z-scores the reward within each
group before the advantage, so beta acts on standardized rewards. Several rewards
(`--reward pickscore,hps --reward-weights 1,1`) are each z-scored within the group and summed with
the weights first (App. D.2, rewards.MultiReward).

Distributed: each rank draws its own noise (a torch.Generator seeded from (seed, rank); the released
code used one seed on every rank, so every GPU drew the same noise); the branch positions come from
a numpy Generator seeded identically on all ranks (the tree shape, hence the number of forwards and
backwards, must agree across DDP/FSDP ranks). Prompts: each step takes the next prompts_per_process
x world_size entries of a per-epoch shuffle (a pure function of (seed, step), so resuming needs no
data state) and rank r takes its slice. Logging and saving on the main process only.

Checkpoints (`--output-dir`, every `--save-every` steps, written to checkpoint-{step}.tmp and then
renamed, so a crash never leaves a half-written checkpoint-{step}):
    checkpoint-{step}/lora/pytorch_lora_weights.safetensors   current LoRA, diffusers format
    checkpoint-{step}/ema/pytorch_lora_weights.safetensors    EMA LoRA (use this one to evaluate)
    checkpoint-{step}/trainer_state.pt   step, optimizer (unless sharded), lr scheduler, args
    checkpoint-{step}/rank{r}.pt         rank r's RNG states (+ its optimizer shard under FSDP)
`FluxPipeline.load_lora_weights("checkpoint-500/ema")` loads a checkpoint as is. `--resume latest`
continues from the newest one; a run stopped and resumed ends with the same weights as an
uninterrupted run (tests/test_train.py). Also written: metrics.jsonl (one line of metrics per step)
and run_summary.json: the plan, and the evidence a distributed run did what it should: each rank's
first root-noise checksum and prompt indices (they differ across ranks) and each rank's final LoRA
checksum (equal across ranks: gradients were all-reduced).

A NaN or infinite latent, log-prob, reward, loss or gradient norm stops the run with an error that
names the step and the prompt(s); nothing is clamped or replaced, and checkpoints already written
stay intact.

Metrics (accelerate trackers, `--report-to`, and metrics.jsonl; means over all ranks):
    reward/mean        mean reward R over all images of the step (the weighted sum of z-scores
                       for several rewards; the raw score for one), before --reward-zscore
    reward/std         within-prompt std of R, averaged over prompts (0 = no learning signal)
    reward/<name>      mean raw score of each reward model (e.g. reward/pickscore, ~22-24)
    policy/loss        the clipped surrogate loss of Eq. (6) (+ kl_coef * KL) at the parameters
                       before each update; policy/* are means over the step's updates
    policy/clipfrac    fraction of leaves with |rho - 1| > clip_eps (0 by construction on the first
                       update: the parameters are the rollout's, so rho = 1 and no forward is spent on it)
    policy/approx_kl   0.5 mean (log rho)^2: how far earlier updates of this rollout moved the policy
    policy/kl          KL to the reference (LoRA disabled), summed along paths, mean over leaves
    adv/abs_mean       mean |A| (TMPO: Eq. 5; GRPO: Eq. 28)
    tree/leaves        leaves per prompt K
    tree/nfe_rollout   transformer evaluations of one rollout, per process (node-steps)
    tree/nfe_update    transformer evaluations of the update(s): with grad + without grad
    tree/branch_<b>    position of branch level b (0-based, 0 = independent roots)
    train/beta         reward temperature beta (linear warmup, Sec. 4.1)
    train/lr           learning rate after the cosine schedule
    train/grad_norm    global grad norm before clipping (last update of the step)
    time/rollout_s     seconds of the tree rollout; time/decode_s VAE decode; time/reward_s reward
    time/update_s      seconds of the update(s); time/iter_s the whole step
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch

import flux
import rewards
import tmpo
import tree_sampler

METHODS = ("tmpo", "grpo")
SAMPLERS = ("tree", "independent")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def arg(default, help: str, **kw):
    """A dataclass field that carries its one-line --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    # model
    model: str = arg("black-forest-labs/FLUX.1-dev", "diffusers FluxPipeline folder or hub id")
    dtype: str = arg("auto", "base weights' dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; LoRA is always fp32",
                    choices=("auto", *DTYPES))
    lora_rank: int = arg(64, "LoRA rank r (App. D: 64)")
    lora_alpha: float = arg(128.0, "LoRA alpha (App. D: 128; scale alpha / r)")
    gradient_checkpointing: bool = arg(None, "recompute each transformer block in backward instead of keeping its "
                                       "activations: per image at 512^2 0.8 instead of 11.8 GiB, for one more forward of "
                                       "each block in backward (default: on on CUDA, off on CPU; the memory plan at start)")
    # prompts
    prompts: str = arg("", "prompt file: .txt (one per line), .json (list of strings or of {'prompt': ...}) or .jsonl")
    prompts_per_process: int = arg(1, "G: prompts per process per step (App. D: 1 per GPU)")
    # sampling (Sec. 4.2, App. C)
    method: str = arg("tmpo", "tmpo (Softmax-TB advantage, Eq. 5) | grpo (z-scored reward, Eq. 28)", choices=METHODS)
    sampler: str = arg("tree", "tree (prefix-sharing tree, Sec. 4.2) | independent (Flow-GRPO: K independent SDE trajectories)",
                       choices=SAMPLERS)
    num_steps: int = arg(6, "N: denoising steps of a training rollout (App. D: 6)")
    branch_k: int = arg(3, "k: children per branch point (App. D: 3); leaves per prompt K = k^L")
    branch_early: tuple = arg((0, 2, 3), "curriculum branch positions at the start (Eq. 41), 0-based, 0 = independent roots; = the released configs' [1,2,3]")
    branch_late: tuple = arg((0, 3, 4), "curriculum branch positions at the end (Eq. 41); = the released configs' [1,3,5] (5 clamped to N-2)")
    kappa: float = arg(6.0, "kappa: Beta concentration of the position perturbation (Eq. 43; inf = no perturbation)")
    eta: float = arg(0.7, "eta: SDE noise level (CPS, Eq. 9: s = t' sin(eta pi / 2); App. D: 0.7)")
    sde_kind: str = arg("cps", "cps (Eq. 9, released configs) | flow_grpo (Eqs. 39-40)", choices=("cps", "flow_grpo"))
    guidance: float = arg(3.5, "FLUX.1-dev guidance embedding scale (App. D: 3.5; no CFG)")
    height: int = arg(512, "image height in pixels (App. D: 512)")
    width: int = arg(512, "image width in pixels (App. D: 512)")
    max_sequence_length: int = arg(512, "T5 tokens per prompt (FluxPipeline's default for FLUX.1-dev: 512)")
    rollout_batch: int = arg(0, "max rows per transformer call in the rollout (0 = all active nodes at once)")
    decode_batch: int = arg(8, "images per VAE decode call (bounds decode memory)")
    # reward and advantage (Sec. 4.1, App. D.2)
    reward: str = arg("pickscore", f"reward model(s), comma-separated, from {', '.join(rewards.REWARDS)}")
    reward_weights: str = arg("", "weights w_m of several rewards, comma-separated (App. D.2; default all 1)")
    reward_path: list = arg([], "NAME=PATH: local weights (or hub id) of reward NAME; repeat per reward")
    geneval_url: str = arg("", f"GenEval server URL (default {rewards.DEFAULT_GENEVAL_URL})")
    reward_dtype: str = arg("fp32", "reward models' dtype: fp32 | bf16", choices=tuple(DTYPES))
    reward_zscore: bool = arg(True, "z-score R within each prompt's group before the advantage (released configs)")
    beta_start: float = arg(0.8, "beta_0: reward temperature at step 0 (Sec. 4.1; released: 0.8)")
    beta_end: float = arg(2.0, "beta_1: reward temperature after warmup (released: 2.0)")
    beta_warmup_steps: int = arg(150, "W: steps of linear beta warmup (released: 150; 100 for OCR)")
    logprob_reduce: str = arg("mean", "log-prob reduction: mean (per-dimension, Eq. 49, the paper) | sum (log-density, Eq. 48)",
                         choices=("mean", "sum"))
    # update (Eqs. 6-7, 30-32)
    clip_eps: float = arg(0.2, "epsilon: IS ratio clip range (Eq. 6; App. D: 0.2)")
    ratio_norm: bool = arg(True, "RatioNorm bias correction of the IS ratio (Eq. 32)")
    kl_coef: float = arg(0.0, "weight of the KL to the reference model (LoRA disabled); 0 for TMPO as released. The KL "
                         "is the true Gaussian KL of each transition, ||mu - mu_ref||^2 / (2 s^2), summed along the path; "
                         "Flow-GRPO's code divides by its sigma_t^2 without the step's |dt| (s^2 = sigma_t^2 |dt|), so "
                         "with --sde-kind flow_grpo its KL is |dt| times this one (7.3x smaller at step 2 of 6)")
    updates_per_rollout: int = arg(1, "optimizer steps per rollout (the first is exactly on-policy)")
    update_chunk: int = arg(4, "parents per backward in the update (same gradient; 0 = one graph). Memory grows with it: "
                             "per parent at 512^2, 11.8 GiB of activations, 0.8 with --gradient-checkpointing")
    lr: float = arg(5e-5, "AdamW learning rate (App. D: 5e-5 PickScore, 3e-5 others)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (App. D: 1e-4)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    lr_warmup_steps: int = arg(0, "linear lr warmup, in optimizer steps, before the cosine decay")
    max_grad_norm: float = arg(0.3, "global grad-norm clip (App. D: 0.3 PickScore, 0.5 others)")
    max_steps: int = arg(500, "training steps (iterations) (App. D: 500 PickScore, 1000 GenEval, 250 OCR)")
    ema_decay: float = arg(0.9, "EMA decay of the LoRA weights (App. D: 0.9)")
    ema_every: int = arg(8, "EMA update interval in steps (App. D: 8)")
    # run
    seed: int = arg(0, "seed: LoRA init, data order and branch positions (same on all ranks); noise per (seed, rank)")
    output_dir: str = arg("outputs/tmpo", "checkpoints, run_summary.json, metrics.jsonl and tracker logs")
    save_every: int = arg(50, "write checkpoint-{step} every this many steps (and at the end)")
    resume: str = arg("", "continue from 'latest' (newest checkpoint in --output-dir) or a checkpoint folder")
    stop_after_steps: int = arg(0, "stop once this step number is reached, as a kill would (no final save); 0 = run to --max-steps")
    report_to: str = arg("none", "metrics tracker: none | tensorboard | wandb", choices=("none", "tensorboard", "wandb"))
    tracker_project: str = arg("tmpo", "project name for the tracker")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2,3; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """argparse generated from `Args`: --field-name for every field, its doc as --help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        elif tp is tuple:
            parser.add_argument(flag, type=_int_list, default=default, help=f.metadata["help"])
        elif tp is list:
            parser.add_argument(flag, action="append", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=tp, default=default, help=f.metadata["help"], choices=f.metadata.get("choices"))
    return parser


def parse_args(argv=None) -> Args:
    ns = build_parser().parse_args(argv)
    args = Args(**{k: ([] if v is None and k == "reward_path" else v) for k, v in vars(ns).items()})
    validate(args)
    return args


def validate(args: Args) -> None:
    """Every check that needs no model: fail before minutes of loading."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(f"train.py: error: {msg}")

    need(args.prompts, "--prompts FILE is required (.txt one prompt per line, .json or .jsonl)")
    need(args.method in METHODS, f"--method must be one of {METHODS}, got {args.method!r}")
    need(args.sampler in SAMPLERS, f"--sampler must be one of {SAMPLERS}, got {args.sampler!r}")
    need(args.dtype in ("auto", *DTYPES), f"--dtype must be auto, bf16 or fp32, got {args.dtype!r} "
         "(fp16 is not offered: FLUX activations overflow in fp16)")
    need(args.reward_dtype in DTYPES, f"--reward-dtype must be bf16 or fp32, got {args.reward_dtype!r}")
    need(args.logprob_reduce in ("mean", "sum"), f"--logprob-reduce must be mean or sum, got {args.logprob_reduce!r}")
    need(args.sde_kind in ("cps", "flow_grpo"), f"--sde-kind must be cps or flow_grpo, got {args.sde_kind!r}")
    need(args.report_to in ("none", "tensorboard", "wandb"), "--report-to must be none, tensorboard or wandb")
    names = [n.strip() for n in args.reward.split(",")]
    unknown = [n for n in names if n not in rewards.REWARDS]
    need(not unknown, f"unknown reward(s) {unknown} in --reward {args.reward!r}; known: {', '.join(rewards.REWARDS)}")
    need(not args.geneval_url or "geneval" in names, f"--geneval-url given but geneval is not in --reward {args.reward!r}")
    for item in args.reward_path:
        need("=" in item, f"--reward-path takes NAME=PATH, got {item!r}")
        need(item.split("=", 1)[0] in names, f"--reward-path {item!r} names a reward not in --reward {args.reward!r}")
    for name, value, lo in (("prompts-per-process", args.prompts_per_process, 1), ("num-steps", args.num_steps, 2),
                            ("branch-k", args.branch_k, 1), ("max-steps", args.max_steps, 1),
                            ("save-every", args.save_every, 1), ("ema-every", args.ema_every, 1),
                            ("updates-per-rollout", args.updates_per_rollout, 1), ("update-chunk", args.update_chunk, 0),
                            ("rollout-batch", args.rollout_batch, 0), ("decode-batch", args.decode_batch, 1),
                            ("lora-rank", args.lora_rank, 1), ("max-sequence-length", args.max_sequence_length, 1),
                            ("stop-after-steps", args.stop_after_steps, 0), ("beta-warmup-steps", args.beta_warmup_steps, 0)):
        need(value >= lo, f"--{name} must be >= {lo}, got {value}")
    need(0 < args.clip_eps < 1, f"--clip-eps must be in (0, 1), got {args.clip_eps}")
    need(0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    need(args.eta > 0, f"--eta must be > 0 (SDE steps need noise), got {args.eta}")
    need(args.kl_coef >= 0 and args.lr > 0 and args.max_grad_norm > 0, "--kl-coef must be >= 0, --lr and --max-grad-norm > 0")
    need(len(args.branch_early) == len(args.branch_late) > 0,
         f"--branch-early {args.branch_early} and --branch-late {args.branch_late} need the same, nonzero length")
    try:  # the curriculum endpoints must be valid positions (raises with the valid range)
        tree_sampler.branch_schedule(0.0, args.branch_early, args.branch_late, float("inf"), args.num_steps)
    except ValueError as err:
        need(False, f"--branch-early/--branch-late: {err}")


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def load_prompts(path: str) -> list:
    """Prompts with their metadata: a list of dicts with at least a non-empty 'prompt' string.

    .txt: one prompt per line (blank lines skipped); .json: a list of strings or of objects with a
    'prompt' field; .jsonl: one JSON string or object per line. Objects keep all their fields as
    metadata (GenEval reads its tags from them). eval.py reads prompt files through this function.
    A missing file, an empty set or a malformed entry raises ValueError saying what to fix.
    """
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as fh:
        text = fh.read()

    def entry(value, where):
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or not value["prompt"].strip():
            raise ValueError(f"{path}, {where}: expected a non-empty string or an object with a "
                             f"non-empty 'prompt' string, got {json.dumps(value)[:120]}")
        return value

    if ext == ".txt":
        items = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}")
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of prompts, got {type(data).__name__}")
        items = [entry(v, f"item {i}") for i, v in enumerate(data)]
    elif ext == ".jsonl":
        items = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {i} is not valid JSON ({err}): {line[:120]!r}")
            items.append(entry(value, f"line {i}"))
    else:
        raise ValueError(f"prompt file {path!r}: unknown extension {ext!r}; use .txt, .json or .jsonl")
    if not items:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return items


def prompt_indices(step: int, rank: int, per_process: int, world_size: int, num_prompts: int, seed: int) -> list:
    """Indices of rank `rank`'s prompts at `step`: a pure function of its arguments.

    The global stream is a fresh permutation of all prompts per epoch; step s takes the entries
    [s B, (s + 1) B) with B = per_process x world_size, and rank r the r-th slice of per_process.
    """
    B = per_process * world_size
    out = []
    for pos in range(step * B + rank * per_process, step * B + (rank + 1) * per_process):
        epoch, i = divmod(pos, num_prompts)
        out.append(int(_epoch_order(seed, epoch, num_prompts)[i]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_prompts: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_prompts)


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
    G, K = args.prompts_per_process, early.leaves_per_group
    if args.sampler == "tree":
        shape = (f"tree: {early.roots} root(s), k = {args.branch_k} at SDE steps; branch positions "
                 f"{list(args.branch_early)} -> {list(args.branch_late)} (kappa {args.kappa})")
        rollout = f"{early.rollout_nfe(G)} (early tree) .. {late.rollout_nfe(G)} (late tree)"
    else:
        shape = f"independent: {K} trajectories, SDE at steps {sorted(early.fanout)}"
        rollout = f"{early.rollout_nfe(G)}"
    per_update = early.update_nfe(G)  # forwards with grad: one per unique parent of each SDE step
    extra = []
    if args.updates_per_rollout > 1 and args.update_chunk > 0:
        extra.append(f"{per_update} without grad before each later update (the ratio at the new parameters)")
    if args.kl_coef > 0:
        extra.append(f"{per_update} reference forwards without grad per update (KL)")
    return [
        f"method {args.method}, sampler {shape}",
        f"processes (world size): {world_size}",
        f"prompts per step: {G} per process x {world_size} = {G * world_size}",
        f"leaves (images) per prompt: K = {K}; images per step: {G * K * world_size} ({G * K} per process)",
        f"denoising steps: {args.num_steps}; resolution {args.height}x{args.width}; guidance {args.guidance}",
        f"transformer forwards per rollout per process: {rollout}; "
        f"{G * K * args.num_steps} if every leaf were sampled alone",
        f"forwards with grad per update per process: {per_update}"
        + (f" (+ {'; + '.join(extra)})" if extra else "")
        + f"; {args.update_chunk or 'all'} parents per backward",
        f"updates per rollout: {args.updates_per_rollout}; steps: {args.max_steps}; "
        f"optimizer steps: {args.max_steps * args.updates_per_rollout}",
    ]


# ----------------------------------------------------------------------------------------------
# LoRA weights, EMA and checkpoints
# ----------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU fp32 copy of a (possibly FSDP2-sharded DTensor) tensor; collective under FSDP2."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def _assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full, for a plain tensor or an FSDP2-sharded DTensor parameter."""
    with torch.no_grad():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
        p.copy_(full.to(p.device, p.dtype))


def peft_keys(transformer_base, names: list) -> dict:
    """{parameter name: key in diffusers' LoRA file}, as peft's get_peft_model_state_dict renames."""
    from peft.utils import get_peft_model_state_dict

    tagged = {n: torch.tensor(float(i)) for i, n in enumerate(names)}  # identify each entry by value
    renamed = get_peft_model_state_dict(transformer_base, state_dict=tagged, adapter_name="default")
    if len(renamed) != len(names):
        raise RuntimeError(f"peft kept {len(renamed)} of {len(names)} LoRA parameters when renaming")
    return {names[int(v.item())]: k for k, v in renamed.items()}


def lora_file_state(directory: str, keys: dict) -> dict:
    """{parameter name: tensor} from a LoRA written by flux.save_lora (keys 'transformer.<peft key>')."""
    from safetensors.torch import load_file

    file = os.path.join(directory, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint is missing {file}")
    loaded = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    missing = [k for k in keys.values() if k not in loaded]
    if missing or len(loaded) != len(keys):
        raise ValueError(f"{file} does not match this model's LoRA ({len(loaded)} tensors, expected {len(keys)}; "
                         f"missing e.g. {missing[:3]}): different --lora-rank / model?")
    return {name: loaded[key] for name, key in keys.items()}


class LoraEMA:
    """fp32 EMA of the LoRA parameters: ema <- decay ema + (1 - decay) theta (App. D: 0.9, every 8 steps).

    Kept per rank on each rank's (possibly sharded) parameters, an elementwise update, so it is
    exact under FSDP too. Used only for evaluation and saving, never for sampling.
    """

    def __init__(self, params: dict, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict) -> None:
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)


def list_checkpoints(output_dir: str) -> list:
    """(step, path) of the complete checkpoints in output_dir, oldest first (*.tmp are incomplete)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return sorted(found)


def save_checkpoint(accelerator, args, step, transformer, params, keys, ema, optimizer, scheduler,
                    noise_gen, sched_rng, sharded_optimizer: bool) -> str:
    """Write checkpoint-{step} atomically: all files into checkpoint-{step}.tmp, then one rename."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    lora_sd = {keys[n]: _full(p) for n, p in params.items()}  # collective under FSDP: every rank calls it
    ema_sd = {keys[n]: _full(t) for n, t in ema.shadow.items()}
    if accelerator.is_main_process:
        flux.save_lora(transformer, os.path.join(tmp, "lora"), state_dict=lora_sd)
        flux.save_lora(transformer, os.path.join(tmp, "ema"), state_dict=ema_sd)
        torch.save({
            "step": step,
            "world_size": accelerator.num_processes,
            "optimizer": None if sharded_optimizer else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "args": dataclasses.asdict(args),
        }, os.path.join(tmp, "trainer_state.pt"))
    rank_state = {
        "noise_generator": noise_gen.get_state(),
        "schedule_rng": sched_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(accelerator.device) if accelerator.device.type == "cuda" else None,  # own GPU
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "optimizer": optimizer.state_dict() if sharded_optimizer else None,
    }
    torch.save(rank_state, os.path.join(tmp, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # an older run's checkpoint of the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


# Flags that do not change what a run computes: free to differ when resuming. Every other flag must
# equal the checkpoint's (schedules, data order and tree shapes depend on them).
OPERATIONAL_ARGS = {"model", "output_dir", "resume", "stop_after_steps", "report_to", "tracker_project", "save_every",
                    "rollout_batch", "decode_batch", "reward_path", "geneval_url", "gradient_checkpointing"}


def load_checkpoint(accelerator, args, path, params, keys, ema, optimizer, scheduler, noise_gen, sched_rng,
                    sharded_optimizer: bool) -> int:
    """Restore everything `save_checkpoint` wrote; return the step to continue from."""
    state_file = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.pt)")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    now = dataclasses.asdict(args)
    changed = {k: (v, now[k]) for k, v in state["args"].items() if k not in OPERATIONAL_ARGS and k in now and v != now[k]}
    if changed:
        raise ValueError(f"{path} belongs to a run with other settings; resuming would not continue it. "
                         + "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items()))
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}: resume with the same number (each rank's noise stream is saved)")
    for name, value in lora_file_state(os.path.join(path, "lora"), keys).items():
        _assign(params[name], value)
    for name, value in lora_file_state(os.path.join(path, "ema"), keys).items():
        _assign(ema.shadow[name], value)
    rank_state = torch.load(os.path.join(path, f"rank{accelerator.process_index}.pt"), map_location="cpu",
                            weights_only=False)
    optimizer.load_state_dict(rank_state["optimizer"] if sharded_optimizer else state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    noise_gen.set_state(rank_state["noise_generator"])
    sched_rng.bit_generator.state = rank_state["schedule_rng"]
    torch.set_rng_state(rank_state["torch"])
    if rank_state["cuda"] is not None and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(rank_state["cuda"], accelerator.device)  # this rank's GPU only
    np.random.set_state(rank_state["numpy"])
    random.setstate(rank_state["python"])
    return int(state["step"])


def _truncate_metrics_log(file: str, step: int) -> None:
    """Keep metrics.jsonl's rows up to `step`: the killed run's later steps are run (and logged) again."""
    if not os.path.isfile(file):
        return
    with open(file) as fh:
        rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
    with open(file + ".tmp", "w") as fh:
        fh.writelines(rows)
    os.replace(file + ".tmp", file)


# ----------------------------------------------------------------------------------------------
# Failing loudly
# ----------------------------------------------------------------------------------------------


def check_finite(what: str, values: torch.Tensor, step: int, prompts: list, rank: int, last_ckpt) -> None:
    """Raise if any value is NaN/inf, naming the step and the prompt(s) of the bad groups.

    values: (G, ...) with the prompt (group) as the first dimension, or a scalar (all prompts).
    """
    bad = ~torch.isfinite(values.detach())
    if not bad.any():
        return
    if values.dim() == 0:
        culprits = prompts
    else:
        culprits = [p for p, b in zip(prompts, bad.reshape(len(prompts), -1).any(dim=1).tolist()) if b]
    kept = f"the last checkpoint ({last_ckpt}) is intact" if last_ckpt else "no checkpoint was written yet"
    raise RuntimeError(
        f"non-finite {what} at step {step + 1} (rank {rank}) for prompt(s) {culprits!r}; the run stops and "
        f"{kept}. Nothing is clamped: lower --lr or --max-grad-norm, or rerun with --dtype fp32 to look closer."
    )


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def cosine_schedule(optimizer, warmup: int, total: int):
    """Linear warmup to the base lr, then cosine decay to 0 at `total` optimizer steps."""
    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(i - warmup, total - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        items = load_prompts(args.prompts)  # a bad prompt file fails before any model is loaded
    except ValueError as err:
        raise SystemExit(f"train.py: error: {err}") from err

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, is_tensorboard_available, is_wandb_available, set_seed
    from tqdm.auto import tqdm

    # accelerate silently drops a tracker whose package is missing; say so instead
    if (args.report_to == "tensorboard" and not is_tensorboard_available()) or (
            args.report_to == "wandb" and not is_wandb_available()):
        raise SystemExit(f"train.py: error: --report-to {args.report_to}: the package is not installed "
                         f"(pip install {args.report_to}), or use --report-to none")
    accelerator = Accelerator(log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=args.output_dir, fsdp_plugin=flux.fsdp_plugin())
    rank, world = accelerator.process_index, accelerator.num_processes
    device, is_main = accelerator.device, accelerator.is_main_process
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.gradient_checkpointing is None:  # on where it is needed: FLUX on a GPU (flux.memory_plan)
        args.gradient_checkpointing = device.type == "cuda"
    sharded = accelerator.distributed_type == DistributedType.FSDP
    ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if ddp and args.update_chunk == 0:
        raise SystemExit("train.py: error: --update-chunk 0 puts every recomputed transition in one graph, and DDP "
                         "cannot reduce a parameter used by several forwards of one backward: use --update-chunk >= 1")
    if device.type == "cpu" and dtype == torch.bfloat16 and is_main:
        print("note: --dtype bf16 on CPU is slow; the CPU smoke run uses fp32", flush=True)

    # Output folder: refuse to mix two runs in one folder.
    existing = list_checkpoints(args.output_dir)
    if existing and not args.resume:
        raise SystemExit(f"train.py: error: {args.output_dir} already holds {existing[-1][1]}: pass --resume latest "
                         "to continue it, or a new --output-dir")
    resume_path = None
    if args.resume:
        if args.resume == "latest":
            if not existing:
                raise SystemExit(f"train.py: error: --resume latest: no checkpoint-* in {args.output_dir}; "
                                 "drop --resume to start a new run")
            resume_path = existing[-1][1]
        elif not os.path.isdir(args.resume):
            raise SystemExit(f"train.py: error: --resume {args.resume!r} is neither 'latest' nor a checkpoint folder")
        else:
            resume_path = args.resume

    # Same seed on every rank: identical LoRA init (FSDP2 does not broadcast it), data order, trees.
    set_seed(args.seed)

    # Rewards first: a missing reward model is found in seconds, not after loading FLUX.
    names = [n.strip() for n in args.reward.split(",")]
    paths = dict(item.split("=", 1) for item in args.reward_path)
    if "geneval" in names and args.geneval_url:
        paths["geneval"] = args.geneval_url
    reward_fn = rewards.load_rewards(names, weights=args.reward_weights or None, paths=paths, device=device,
                                     dtype=DTYPES[args.reward_dtype])

    pipe = flux.load_flux(args.model, dtype=dtype, device=device, offload_text_encoders=True)  # T5/CLIP: CPU
    base = pipe.transformer
    flux.add_lora(base, rank=args.lora_rank, alpha=args.lora_alpha)  # fp32 LoRA, base frozen
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    _, _, seq_len, channels = flux.latent_geometry(pipe, args.height, args.width)  # S tokens of C channels
    sigmas = flux.flux_sigmas(pipe, args.num_steps, args.height, args.width)  # (N + 1,)
    img_ids = flux.image_ids(pipe, args.height, args.width, device=device, dtype=dtype)  # (S, 3)
    memory = flux.memory_plan(  # per GPU, from the models' sizes and a meta-device count of the activations
        flux.memory_parts(pipe, reward_fn), flux.activation_bytes(base, img_ids, args.max_sequence_length),
        make_spec(args, args.branch_early), args.prompts_per_process, rollout_batch=args.rollout_batch,
        update_chunk=args.update_chunk, world_size=world, sharded=sharded, checkpointing=args.gradient_checkpointing,
        device_bytes=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)

    # No name holds the pre-shard LoRA tensors: FSDP2 replaces them by sharded DTensors in prepare.
    optimizer = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    # Not prepared: accelerate would step a prepared scheduler once per process per call.
    scheduler = cosine_schedule(optimizer, args.lr_warmup_steps, args.max_steps * args.updates_per_rollout)
    transformer, optimizer = accelerator.prepare(base, optimizer)
    base = flux._unwrap(transformer)
    params = {n: p for n, p in base.named_parameters() if p.requires_grad}  # after prepare (FSDP2 reshards)
    keys = peft_keys(base, list(params))
    ema = LoraEMA(params, args.ema_decay)

    noise_seed = int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0])
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)  # a different stream per rank
    sched_rng = np.random.default_rng(args.seed)  # the same on every rank: the tree shapes agree

    start_step, last_ckpt = 0, None
    if resume_path:
        start_step = load_checkpoint(accelerator, args, resume_path, params, keys, ema, optimizer, scheduler,
                                     noise_gen, sched_rng, sharded)
        last_ckpt = resume_path
        if is_main:
            print(f"resumed from {resume_path} at step {start_step}", flush=True)
            _truncate_metrics_log(os.path.join(args.output_dir, "metrics.jsonl"), start_step)

    plan = plan_lines(args, world) + memory["lines"]
    if is_main:
        print("TMPO run plan:\n  " + "\n  ".join(plan), flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(args).items()}
        accelerator.init_trackers(args.tracker_project, config=config)
    summary = {"plan": plan, "world_size": world, "args": dataclasses.asdict(args), "start_step": start_step}

    def velocity_for(text_ids):
        return flux.make_velocity_fn(transformer, text_ids, img_ids, guidance=args.guidance, dtype=dtype)

    K = make_spec(args, args.branch_early).leaves_per_group
    G = args.prompts_per_process
    stop_at = min(args.max_steps, args.stop_after_steps or args.max_steps)
    bar = tqdm(range(start_step, stop_at), initial=start_step, total=args.max_steps, disable=not is_main,
               desc="tmpo" if args.method == "tmpo" else "grpo", dynamic_ncols=True)
    metrics = {}
    for step in bar:
        t_iter = time.perf_counter()
        # 1. Branch positions (Eqs. 41-46); p = step / total steps
        if args.sampler == "tree":
            branch = tree_sampler.branch_schedule(step / args.max_steps, args.branch_early, args.branch_late,
                                                  args.kappa, args.num_steps, generator=sched_rng)
        else:
            branch = []
        spec = make_spec(args, branch)
        batch = [items[i] for i in prompt_indices(step, rank, G, world, len(items), args.seed)]
        prompts = [b["prompt"] for b in batch]
        cond, text_ids = flux.encode_prompts(pipe, prompts, args.max_sequence_length, device=device)
        velocity_fn = velocity_for(text_ids)

        # 2. Rollout (Sec. 4.2): x_root drawn here so its checksum shows each rank's own noise
        t0 = time.perf_counter()
        x_root = torch.randn((G * spec.roots, seq_len, channels), generator=noise_gen, device=device)  # (G*roots, S, C)
        if step == start_step:  # evidence for run_summary.json: each rank its own noise and prompts
            summary["root_noise_checksum_per_rank"] = accelerator.gather(x_root.double().sum().reshape(1)).tolist()
            idx = torch.tensor(prompt_indices(step, rank, G, world, len(items), args.seed), device=device)
            summary["prompt_indices_per_rank"] = accelerator.gather(idx).view(world, G).tolist()
        ro = tree_sampler.rollout(velocity_fn, spec, sigmas, cond, G, (seq_len, channels), generator=noise_gen,
                                  x_root=x_root, device=device, dtype=torch.float32,
                                  max_batch=args.rollout_batch or None, reduce=args.logprob_reduce)
        t_rollout = time.perf_counter() - t0
        log_p = ro.traj_log_prob(args.logprob_reduce)  # (G, K), Eq. (47)
        check_finite("trajectory log-prob", log_p, step, prompts, rank, last_ckpt)
        check_finite("final latents", ro.x0.reshape(G, -1), step, prompts, rank, last_ckpt)  # (G, K*S*C)

        # 3. Decode and reward; leaves are group-major: rows g*K .. g*K+K-1 belong to prompt g
        t0 = time.perf_counter()
        images = flux.decode(pipe, ro.x0, args.height, args.width, max_batch=args.decode_batch)  # (G*K, 3, H, W)
        check_finite("decoded images", images.reshape(G, -1), step, prompts, rank, last_ckpt)
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        leaf_prompts = [p for p in prompts for _ in range(K)]
        leaf_meta = [dict(b) for b in batch for _ in range(K)]
        try:
            raw, R = reward_fn(images, leaf_prompts, leaf_meta, group_size=K)
        except FloatingPointError as err:  # rewards.py names the reward and the prompt
            raise RuntimeError(f"step {step + 1} (rank {rank}): {err}. The last checkpoint ({last_ckpt}) is intact.") from err
        R = R.float().view(G, K)  # (G*K,) -> (G, K)
        check_finite("reward", R, step, prompts, rank, last_ckpt)
        t_reward = time.perf_counter() - t0

        # 4. Advantage: Eq. (5) for TMPO, Eq. (28) for GRPO; beta warms up (Sec. 4.1)
        beta = tmpo.beta_schedule(step, args.beta_start, args.beta_end, args.beta_warmup_steps)
        R_adv = tmpo.group_zscore(R) if args.reward_zscore else R
        if args.method == "tmpo":
            A = tmpo.softmax_tb_advantage(log_p, R_adv, beta)  # (G, K), Eq. (5)
        else:
            A = tmpo.grpo_advantage(R_adv)  # (G, K), Eq. (28)
        check_finite("advantage", A, step, prompts, rank, last_ckpt)

        # 5. Clipped importance-sampled update(s), Eqs. (6)-(7) with RatioNorm (32)
        t0 = time.perf_counter()
        ref_fn = None
        if args.kl_coef > 0:
            def ref_fn(x, t, c):  # the reference = the base model: LoRA switched off, no grad
                base.disable_adapters()
                try:
                    with torch.no_grad():
                        return velocity_fn(x, t, c)
                finally:
                    base.enable_adapters()
        nfe_update, update_stats = 0, []
        for u in range(args.updates_per_rollout):
            optimizer.zero_grad(set_to_none=True)
            # One call for all G groups: the loss is already the mean over the G*K leaves.
            stats = tree_sampler.update(
                velocity_fn, ro, cond, A, clip_eps=args.clip_eps, reduce=args.logprob_reduce,
                ratio_norm=args.ratio_norm, chunk_size=args.update_chunk or None, on_policy=(u == 0),
                kl_coef=args.kl_coef, ref_velocity_fn=ref_fn, backward=accelerator.backward,
            )
            check_finite("loss", torch.tensor(stats["loss"]), step, prompts, rank, last_ckpt)
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            check_finite("gradient norm", torch.as_tensor(grad_norm), step, prompts, rank, last_ckpt)
            lr = scheduler.get_last_lr()[0]  # the lr this optimizer step uses
            optimizer.step()
            scheduler.step()
            nfe_update += stats["nfe_grad"] + stats["nfe_nograd"]
            update_stats.append(stats)
        upd = {k: sum(s[k] for s in update_stats) / len(update_stats) for k in ("loss", "clipfrac", "approx_kl", "kl")}
        t_update = time.perf_counter() - t0

        # 6. EMA of the LoRA weights (App. D: decay 0.9 every 8 steps)
        if (step + 1) % args.ema_every == 0:
            ema.update(params)

        # Metrics: means over ranks (every rank joins the collectives)
        per_rank = torch.tensor([
            float(R.mean()), float(R.std(dim=1, unbiased=False).mean()), upd["loss"], upd["clipfrac"],
            upd["approx_kl"], upd["kl"], float(A.abs().mean()), float(grad_norm),
            t_rollout, t_decode, t_reward, t_update,
        ] + [float(raw[n].float().mean()) for n in names], dtype=torch.float64, device=device)
        mean = accelerator.reduce(per_rank, reduction="mean").tolist()
        metrics = {
            "reward/mean": mean[0], "reward/std": mean[1], "policy/loss": mean[2], "policy/clipfrac": mean[3],
            "policy/approx_kl": mean[4], "policy/kl": mean[5], "adv/abs_mean": mean[6], "train/grad_norm": mean[7],
            "time/rollout_s": mean[8], "time/decode_s": mean[9], "time/reward_s": mean[10], "time/update_s": mean[11],
            **{f"reward/{n}": mean[12 + i] for i, n in enumerate(names)},
            "tree/leaves": K, "tree/nfe_rollout": ro.nfe, "tree/nfe_update": nfe_update,
            **{f"tree/branch_{b}": n for b, n in enumerate(branch)},
            "train/beta": beta, "train/lr": lr,
            "time/iter_s": time.perf_counter() - t_iter,
        }
        if is_main:
            accelerator.log(metrics, step=step + 1)
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": step + 1, **metrics}) + "\n")
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}", loss=f"{metrics['policy/loss']:.3g}")

        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            last_ckpt = save_checkpoint(accelerator, args, step + 1, transformer, params, keys, ema, optimizer,
                                        scheduler, noise_gen, sched_rng, sharded)
        if step == start_step and is_main:
            _write_summary(args.output_dir, summary)

    bar.close()
    # Every rank's LoRA must be identical after synchronised updates (DDP all-reduce / FSDP): record it.
    lora_sum = sum(_full(p).double().sum() for p in params.values()).reshape(1).to(device)
    summary["lora_checksum_per_rank"] = accelerator.gather(lora_sum).tolist()
    if stop_at < args.max_steps:
        if is_main:
            print(f"stopping after step {stop_at} as asked (--stop-after-steps); resume with --resume latest", flush=True)
    elif is_main:
        summary.update(final_step=args.max_steps, final_metrics=metrics, final_checkpoint=last_ckpt)
        _write_summary(args.output_dir, summary)
        print(f"done: {last_ckpt} (load the EMA LoRA with FluxPipeline.load_lora_weights('{last_ckpt}/ema'))", flush=True)
    accelerator.end_training()


def _write_summary(output_dir: str, summary: dict) -> None:
    path = os.path.join(output_dir, "run_summary.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1:])
