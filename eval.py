"""Evaluation: a trained LoRA next to the base model, on reward and diversity, in one command.

Reproduces the paper's protocol (Sec. 5.1 "Setup", App. D.1 "Quality Metrics"; formulas in
EQUATIONS.md, "Section 5 / App. D"): FLUX.1-dev, 28 deterministic (ODE) Euler steps,
guidance 3.5 (FLUX's guidance embedding, no CFG), 512 x 512, 10 images per evaluation prompt, and
the metrics of Table 1:

| metric        | column      | what it is                                                     | per prompt        |
| ------------- | ----------- | -------------------------------------------------------------- | ----------------- |
| `geneval`     | GenEval     | fraction of the prompt's GenEval criteria met (HTTP server)     | mean over images  |
| `ocr`         | OCR Acc.    | 1 - NED(recognised text, the prompt's quoted text)              | mean over images  |
| `hps`         | HPS-v2.1    | cos(image, text) of the HPS-v2.1 ViT-H-14                       | mean over images  |
| `imagereward` | ImgRwd      | ImageReward-v1.0                                                | mean over images  |
| `pickscore`   | PickScore   | 100 * cos(image, text) of PickScore_v1                          | mean over images  |
| `lgmd`        | LGMD        | mean log pairwise distance of the prompt's flattened latents    | one value         |
| `cosdiv`      | Cos. Div.   | mean 1 - cos of the prompt's DINOv2 ViT-L/14 CLS features       | one value         |

Reward models come from `rewards.py`, the diversity metrics from `metrics.py` (LGMD on the latents
the flow model generates, see `flux.unpacked_latents`). Aggregates: a reward's mean / std are over
all images; LGMD's and Cos. Div.'s over prompts (each is a property of one prompt's image set).
Standard deviations are population stds (ddof 0). Every table gets a "base" row (the same pipeline
with the LoRA disabled) and each `--lora` a row of its own.

Paired comparison. The initial noise of image j of prompt p is drawn on the CPU from a
torch.Generator seeded with SeedSequence([seed, p, j]): it depends on neither the rank, nor the
batch, nor the model, so every model starts image (p, j) from the same x_1, and a second run with
the same seed reproduces them. results.json records a SHA-256 prefix of each initial noise per
model, so the pairing can be checked; the script itself refuses to write results whose checksums
differ between models. The Markdown table adds the paired difference to base (mean over prompts of
the per-prompt difference).

Multi-GPU. Prompts are split across ranks (accelerate's `split_between_processes`); each rank
generates AND scores its prompts and writes their image grids; the per-prompt scores are gathered
(`gather_object`) to the main process, which checks that every prompt was evaluated exactly once and
writes results.json / results.md. Deliberate departure from "gather images, score on rank 0": every
metric here is per image or per prompt, so scoring where the images are gives the same numbers
without sending all images to one process (about 8 MB per prompt and model at 512^2) and with 8
GPUs scoring instead of one. (The released code evaluates rank 0's prompts only; here 8 GPUs
evaluate 8 times the prompts.)

Outputs in --out (an --out that holds an earlier evaluation is refused unless --overwrite, which
removes its results and grids before anything new is written):
    results.json     {"config": every option + sigmas, dtype, processes, versions,
                      "models": {name: {"lora": folder or null,
                                        "aggregate": {metric: {"mean", "std", "n"}},
                                        "vs_base": {metric: {"mean", "std", "n"}} (per-prompt model - base),
                                        "per_prompt": [{"index", "prompt", metric: value, ...,
                                                        "images": {reward metric: [one score per image]}}],
                                        "generation_seconds": prompt encoding + sampling + decoding, all ranks}},
                      "noise_checksums": {name: [[SHA-256 prefix of each image's initial noise] per prompt]}}
                     (an LGMD of exactly duplicated images is -inf, written as -Infinity)
    results.md       Table-1-style table (rows = models, columns = metrics, mean ± std) + paired deltas
    grids/prompt_XXX.png   one per prompt: rows = models, columns = the images (the same noise per column)

Sampling: FluxPipeline.__call__ itself (prompt_embeds, pooled_prompt_embeds, latents = the paired
noise, guidance_scale, num_inference_steps; common.ode_sample), which tests/test_eval.py keeps
equal to tree_sampler.rollout with no branch point, the sampler train.py learns with.

Prompt files (as train.py's, common.load_prompts): .txt (one prompt per non-empty line), .jsonl
(one JSON string or object with a "prompt" key per line) or .json (a list of those); an object is
that prompt's metadata, e.g. GenEval's evaluation_metadata.jsonl. Flags: --flag_name or
--flag-name; lists take several values (--metrics pickscore lgmd); --lora and --metric_path may be
repeated; --config FILE.yaml reads flags from a file first.

    # one GPU: base FLUX.1-dev + the EMA weights of a train.py checkpoint (names: base, checkpoint-500/ema)
    python eval.py --model black-forest-labs/FLUX.1-dev --lora runs/tmpo/checkpoint-500/ema \\
        --prompts prompts/hpdv2_test.txt --metrics pickscore hps imagereward lgmd cosdiv --out outputs/eval
    # 8 GPUs, two LoRAs with table names, local metric weights
    accelerate launch --num_processes 8 eval.py --model /models/FLUX.1-dev \\
        --lora tmpo=runs/tmpo/checkpoint-500/ema --lora grpo=runs/grpo/checkpoint-500/ema \\
        --prompts prompts/hpdv2_test.txt --metric_path pickscore=/models/PickScore_v1 \\
        --metric_path hps=/models/HPSv2 --metric_path imagereward=/models/ImageReward \\
        --metric_path cosdiv=/models/dinov2-large --out outputs/eval_pickscore
    # GenEval (fraction of criteria met; needs Flow-GRPO's GenEval server) on its metadata file
    python eval.py --model /models/FLUX.1-dev --lora runs/geneval/checkpoint-1000/ema \\
        --prompts geneval/evaluation_metadata.jsonl --metrics geneval lgmd cosdiv \\
        --geneval_url http://127.0.0.1:18085 --out outputs/eval_geneval
    # tiny offline run (random models, seconds on a CPU)
    python tests/tiny_flux.py /tmp/tiny_flux && python tests/tiny_rewards.py /tmp/tiny_rewards
    printf 'a photo of a cat\\na red cube\\n' > /tmp/prompts.txt
    python eval.py --model /tmp/tiny_flux --prompts /tmp/prompts.txt --metrics pickscore lgmd \\
        --metric_path pickscore=/tmp/tiny_rewards/pickscore --height 32 --width 32 --steps 4 \\
        --images_per_prompt 3 --max_sequence_length 16 --out /tmp/eval_tiny
Tests:
    python -m pytest -x -q tests/test_eval.py
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal, Optional

import numpy as np
import torch
from transformers.hf_argparser import HfArg

import common
import flux
import metrics
import rewards

# metric name -> (table column, kind). Table columns follow the paper's Table 1 order.
METRICS = {
    "geneval": ("GenEval", "reward"),
    "ocr": ("OCR Acc.", "reward"),
    "hps": ("HPS-v2.1", "reward"),
    "imagereward": ("ImgRwd", "reward"),
    "pickscore": ("PickScore", "reward"),
    "lgmd": ("LGMD", "diversity"),
    "cosdiv": ("Cos. Div.", "diversity"),
}
assert set(rewards.REWARDS) == {m for m, (_, kind) in METRICS.items() if kind == "reward"}
BASE = "base"  # table name of the base model (LoRA disabled)
OUTPUTS = ("results.json", "results.md", "grids")  # what a run writes into --out
EvalInputError = common.InputError  # bad input found before generation: the message says what to fix


@dataclass
class Args(common.FluxArgs):
    """Evaluate FLUX (+ LoRAs) on reward and diversity metrics (paper Sec. 5.1); defaults = the paper's protocol."""

    # common.FluxArgs: --config, --model, --prompts, --guidance, --height, --width, --max_sequence_length, --geneval_url
    lora: list[str] = HfArg(default_factory=list, metadata={"action": "extend"}, help=(
        "LoRA folder to evaluate next to the base model, as DIR or NAME=DIR (repeatable); "
        "e.g. runs/x/checkpoint-500/ema (train.py's EMA weights)"))
    out: str = HfArg(default="outputs/eval", aliases=["--output_dir"], help="output folder")
    overwrite: bool = HfArg(default=False, help=f"replace an earlier evaluation in --out (its {', '.join(OUTPUTS)} are removed first)")
    metrics: list[str] = HfArg(default_factory=lambda: ["pickscore", "hps", "imagereward", "lgmd", "cosdiv"],
                               help=f"metrics, from: {', '.join(METRICS)}")
    metric_path: list[str] = HfArg(default_factory=list, metadata={"action": "extend"}, help=(
        "NAME=PATH weights of a metric model (repeatable): a local folder or hub id for pickscore, hps, "
        "imagereward, cosdiv (DINOv2, default facebook/dinov2-large)"))
    steps: int = HfArg(default=28, help="ODE (Euler) denoising steps (paper: 28 for evaluation)")
    images_per_prompt: int = HfArg(default=10, help="images per prompt and model (paper: 10)")
    seed: int = HfArg(default=0, help="base seed of the initial noises (>= 0); same seed = same noises")
    max_prompts: Optional[int] = HfArg(default=None, help="evaluate only the first N prompts")
    prompts_per_batch: int = HfArg(default=1, help=(
        "prompts generated together per GPU (batch = this x images-per-prompt); the noises do not depend on "
        "it, the numbers only up to floating-point rounding"))
    max_batch: Optional[int] = HfArg(default=None, help="at most this many rows per transformer / VAE call (bounds memory)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = HfArg(default="auto", help="FLUX compute dtype: auto = bf16 on GPU, fp32 on CPU")
    metric_dtype: Literal["fp32", "bf16", "fp16"] = HfArg(default="fp32", help="dtype of the reward / DINOv2 models")
    metric_batch_size: int = HfArg(default=32, help="images per forward of a reward / DINOv2 model")
    grid_size: int = HfArg(default=256, help="image height in the grids in pixels (0 = full size)")


# ---------------------------------------------------------------------------------------------
# Command line and input checks (all before anything heavy is loaded)
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> Args:
    return common.parse_args(Args, argv, prog="eval.py")


def parse_metrics(names: list[str]) -> list[str]:
    """['pickscore', 'lgmd'] in Table 1 order; unknown or repeated names are errors."""
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvalInputError(f"unknown metric(s) {unknown or names}; known metrics: {', '.join(METRICS)} (separated by spaces)")
    if len(set(names)) != len(names):
        raise EvalInputError(f"--metrics lists a metric twice: {names}")
    return [m for m in METRICS if m in names]


def load_prompts(path: str, max_prompts: int | None = None) -> tuple[list[str], list[dict] | None]:
    """Prompt texts and, for .json / .jsonl files, each prompt's metadata dict (else None); the
    formats of common.load_prompts (train.py's)."""
    records = common.load_prompts(path)[:max_prompts]
    return [r["prompt"] for r in records], None if path.lower().endswith(".txt") else records


def parse_loras(specs: list[str]) -> dict[str, str]:
    """['DIR' | 'NAME=DIR', ...] -> {table name: folder}, checking each folder holds LoRA weights.

    Default name: the folder's name, or parent/name for train.py's checkpoint-STEP/{lora,ema}."""
    models = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or os.path.exists(spec) or "/" in name or os.sep in name:
            folder = spec
            parts = os.path.normpath(os.path.abspath(spec)).split(os.sep)
            name = "/".join(parts[-2:]) if parts[-1] in ("lora", "ema") and len(parts) > 1 else parts[-1]
        name = name.strip()
        if not os.path.isdir(folder):
            raise EvalInputError(f"LoRA folder {folder} does not exist")
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            subs = [s for s in ("ema", "lora") if os.path.isdir(os.path.join(folder, s))]
            hint = (f"; it has subfolders {subs}: pass {os.path.join(folder, subs[0])} (train.py saves the EMA "
                    "weights in ema/, the raw weights in lora/)") if subs else \
                "; expected pytorch_lora_weights.safetensors as written by flux.save_lora / FluxPipeline.save_lora_weights"
            raise EvalInputError(f"LoRA folder {folder} has no .safetensors file{hint}")
        if name == BASE or name in models:
            raise EvalInputError(f"model name {name!r} is {'reserved for the base model' if name == BASE else 'used twice'};"
                                 " name the LoRA with NAME=DIR")
        models[name] = folder
    return models


# The valid range of every numeric flag (common.check_ranges), checked before any model loads.
RANGES = {"steps": "[1, inf)", "images_per_prompt": "[1, inf)", "seed": "[0, inf)", "max_prompts": "[1, inf)",
          "prompts_per_batch": "[1, inf)", "max_batch": "[1, inf)", "metric_batch_size": "[1, inf)", "grid_size": "[0, inf)"}


def check_args(args: Args) -> dict:
    """Everything that can be checked without loading a model; returns the parsed pieces."""
    names, need = parse_metrics(args.metrics), common.require
    paths = common.parse_named(args.metric_path, "--metric_path")
    extra = sorted(set(paths) - set(names))
    need(not extra, f"--metric_path given for {extra}, which is not among the metrics {names}")
    need(not {"lgmd", "ocr"} & set(paths), "lgmd (the FLUX latents) and ocr (models inside rapidocr-onnxruntime) take no --metric_path")
    need("geneval" not in paths, "give the GenEval server with --geneval_url, not --metric_path")
    need(not args.geneval_url or "geneval" in names, "--geneval_url given but geneval is not among the metrics")
    common.check_flux_args(args, RANGES)
    diversity = [m for m in names if METRICS[m][1] == "diversity"]
    need(not diversity or args.images_per_prompt >= 2,
         f"{diversity} compare a prompt's images with each other: --images_per_prompt must be >= 2")
    found = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    need(not found or args.overwrite, f"--out {args.out} holds {found} of an earlier evaluation: pass --overwrite to replace "
         "them (they are removed before anything is written), or another --out")
    texts, metadata = load_prompts(args.prompts, args.max_prompts)
    need("geneval" not in names or (metadata and all(k in m for m in metadata for k in ("tag", "include"))),
         "geneval needs each prompt's GenEval metadata: pass a .jsonl prompt file with 'prompt', 'tag' and 'include' per "
         "line (GenEval's evaluation_metadata.jsonl)")
    for text in texts if "ocr" in names else []:
        try:
            rewards.quoted_text(text)
        except ValueError as err:
            raise EvalInputError(str(err)) from err
    return {"metrics": names, "metric_paths": paths, "texts": texts, "metadata": metadata, "replaced": found,
            "loras": parse_loras(args.lora)}


# ---------------------------------------------------------------------------------------------
# LoRA: check that a folder fits the model, load it as a named adapter, switch between models
# ---------------------------------------------------------------------------------------------

def load_adapters(pipe, loras: dict[str, str]) -> dict[str, str | None]:
    """Load every LoRA as a named adapter of pipe.transformer; returns {model name: adapter name},
    with "base" -> None. All folders are checked first, so a bad one fails before any is loaded."""
    layers = {name: common.check_lora_fits(pipe.transformer, folder, name) for name, folder in loras.items()}
    adapters: dict[str, str | None] = {BASE: None}
    for i, (name, folder) in enumerate(loras.items()):
        adapter = f"eval_{i}"  # peft adapter names must be plain identifiers; table names may hold "/"
        pipe.load_lora_weights(folder, adapter_name=adapter)
        loaded = [p for p, m in pipe.transformer.named_modules()
                  if hasattr(m, "lora_A") and adapter in m.lora_A]
        if sorted(loaded) != sorted(layers[name]):
            raise RuntimeError(f"LoRA {name!r} ({folder}): diffusers loaded {len(loaded)} layers, the file has "
                               f"{len(layers[name])}")
        adapters[name] = adapter
    return adapters


def activate(transformer: torch.nn.Module, adapter: str | None) -> None:
    """Make `adapter` the only active LoRA, or disable all LoRAs (adapter None = the base model)."""
    if adapter is not None:
        transformer.enable_lora()
        transformer.set_adapters(adapter)
    elif getattr(transformer, "peft_config", None):  # with no LoRA loaded it is the base model already
        transformer.disable_lora()


# ---------------------------------------------------------------------------------------------
# Initial noise (paired across models) and scoring
# ---------------------------------------------------------------------------------------------


def load_scorers(names: list[str], paths: dict, args: Args, device) -> dict:
    """{metric: callable} for the reward metrics and cosdiv (lgmd needs no model)."""
    dtype, batch = common.DTYPES[args.metric_dtype], {"batch_size": args.metric_batch_size}
    # geneval: the fraction of criteria met (App. D.1), not the strict training reward; ocr: models inside its package
    keywords = {"geneval": {"strict": False, "timeout": args.reward_timeout, "retries": args.reward_retries}, "ocr": {}}
    scorers = {name: rewards.load_reward(name, args.geneval_url if name == "geneval" else paths.get(name), device=device,
                                         dtype=dtype, **keywords.get(name, batch)) for name in names if METRICS[name][1] == "reward"}
    if "cosdiv" in names:
        scorers["cosdiv"] = metrics.load_dinov2(paths.get("cosdiv", metrics.DINO_DEFAULT_ID), device=device, dtype=dtype, **batch)
    return scorers


def score_batch(scorers: dict, names: list[str], images, latents, texts, metadata, n: int) -> list[dict]:
    """Scores of B prompts x n images (group-major rows) -> one dict per prompt:
    reward metric -> list of n per-image scores, diversity metric -> one float."""
    per_image_texts = [t for t in texts for _ in range(n)]
    per_image_meta = None if metadata is None else [m for m in metadata for _ in range(n)]
    out = [{} for _ in texts]
    feats = scorers["cosdiv"](images) if "cosdiv" in names else None  # (B*n, F) DINOv2 CLS features
    for name in names:
        if METRICS[name][1] == "reward":
            s = scorers[name](images, per_image_texts, per_image_meta).float().cpu().view(len(texts), n)  # (B, n)
            for b in range(len(texts)):
                out[b][name] = s[b].tolist()
    for b in range(len(texts)):
        rows = slice(b * n, (b + 1) * n)  # prompt b's images
        if "lgmd" in names:
            out[b]["lgmd"] = metrics.lgmd(latents[rows])  # flattened (n, C, h, w) latents, Sec. 5.1
        if "cosdiv" in names:
            out[b]["cosdiv"] = metrics.cosine_diversity(feats[rows])
    return out


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict:
    """Population mean / std; -inf (an LGMD of exact duplicates) makes the mean -inf and the std None."""
    v = np.asarray(values, dtype=np.float64)
    finite = bool(np.isfinite(v).all())
    return {"mean": float(v.mean()), "std": float(v.std()) if finite else None, "n": int(v.size)}


def summarize(records: list[dict], names: list[str], model_names: list[str], texts: list[str]) -> dict:
    """Gathered per-(model, prompt) records -> the "models" and "noise_checksums" parts of results.json."""
    done = sorted((rec["model"], rec["index"]) for rec in records)
    if done != sorted((m, p) for m in model_names for p in range(len(texts))):
        raise RuntimeError(f"{len(done)} (model, prompt) results for {len(model_names)} x {len(texts)}: a rank did not "
                           "report, or a prompt was evaluated twice")
    by_model = {m: sorted((r for r in records if r["model"] == m), key=lambda r: r["index"]) for m in model_names}
    checksums = {m: [rec["noise"] for rec in recs] for m, recs in by_model.items()}
    for m in model_names:
        if checksums[m] != checksums[BASE]:
            raise RuntimeError(f"{m} did not start from the base model's initial noises: the comparison is not paired")
    rewarded = [name for name in names if METRICS[name][1] == "reward"]
    models = {}
    for m, recs in by_model.items():
        scores = [rec["scores"] for rec in recs]  # one dict per prompt, in prompt order
        per_prompt = [{"index": p, "prompt": texts[p], **{k: float(np.mean(s[k])) if k in rewarded else s[k] for k in names},
                       "images": {k: s[k] for k in rewarded}} for p, s in enumerate(scores)]
        # A reward's mean / std over all images, a diversity metric's over its one value per prompt.
        aggregate = {k: _mean_std([x for s in scores for x in s[k]] if k in rewarded else [row[k] for row in per_prompt])
                     for k in names}
        models[m] = {"aggregate": aggregate, "per_prompt": per_prompt, "generation_seconds": sum(r["seconds"] for r in recs)}
    for m in model_names:  # paired by prompt (and noise): mean over prompts of the per-prompt difference
        models[m]["vs_base"] = {
            name: _mean_std([a[name] - b[name] for a, b in zip(models[m]["per_prompt"], models[BASE]["per_prompt"])])
            for name in names
        } if m != BASE else {}
    return {"models": models, "noise_checksums": checksums}


def _cell(stats: dict, signed: bool = False) -> str:
    mean, std = stats["mean"], stats["std"]
    if not math.isfinite(mean):
        return f"{mean} (duplicate images)"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {std:.3f}" if std is not None else "")


def markdown_table(results: dict, names: list[str]) -> str:
    """Table 1 style: rows = models, columns = metrics (mean ± std), then the paired deltas to base."""
    cfg = results["config"]
    models = results["models"]
    head = "| Model | " + " | ".join(METRICS[n][0] for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
    lines = [
        f"# Evaluation of {cfg['model']}",
        "",
        f"{cfg['num_prompts']} prompts ({cfg['prompts']}) x {cfg['images_per_prompt']} images per model; "
        f"{cfg['steps']} ODE steps, guidance {cfg['guidance']}, {cfg['height']}x{cfg['width']}, seed {cfg['seed']}, "
        f"{cfg['dtype']} on {cfg['num_processes']} process(es). Mean ± std: rewards over images, LGMD / Cos. Div. "
        "over prompts (population std).",
        "",
        head + "".join(f"| {m} | " + " | ".join(_cell(r["aggregate"][n]) for n in names) + " |\n"
                       for m, r in models.items()),
    ]
    if len(models) > 1:
        lines += [
            "Paired difference to base (same prompt, same initial noises): mean ± std over prompts of "
            "(model - base) per prompt.",
            "",
            head + "".join(f"| {m} | " + " | ".join(_cell(r["vs_base"][n], signed=True) for n in names) + " |\n"
                           for m, r in models.items() if m != BASE),
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def evaluate(args: Args) -> dict | None:
    """Run the evaluation; returns results.json's content on the main process (None elsewhere)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env
    from tqdm.auto import tqdm

    parsed = check_args(args)  # cheap checks first: nothing heavy is loaded if the command line is wrong
    names, texts, metadata, loras = parsed["metrics"], parsed["texts"], parsed["metadata"], parsed["loras"]
    # PartialState alone does not read ACCELERATE_USE_CPU (AcceleratorState does): without it a CPU
    # `accelerate launch` would run N independent single-process evaluations.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    if launched > 1 and launched != state.num_processes:
        raise RuntimeError(f"launched as {launched} processes but accelerate formed a group of {state.num_processes}; "
                           "on CPU set ACCELERATE_USE_CPU=true")
    device = state.device
    dtype = common.resolve_dtype(args.dtype, device)
    n, H, W = args.images_per_prompt, args.height, args.width
    dtype_name = str(dtype).replace("torch.", "")

    pipe = flux.load_flux(args.model, dtype=dtype, device=device)
    flux.latent_geometry(pipe, H, W)  # checks the image size
    adapters = load_adapters(pipe, loras)  # every LoRA checked against the transformer before any is loaded
    scorers = load_scorers(names, parsed["metric_paths"], args, device)
    model_names = list(adapters)

    with state.split_between_processes(list(range(len(texts)))) as mine:
        mine = list(mine)  # this rank's global prompt indices (contiguous block)
    batches = [mine[i:i + args.prompts_per_batch] for i in range(0, len(mine), args.prompts_per_batch)]
    for old in parsed["replaced"] if state.is_main_process else ():  # --overwrite: no old grid stays beside the new
        shutil.rmtree(os.path.join(args.out, old)) if old == "grids" else os.remove(os.path.join(args.out, old))
    state.wait_for_everyone()
    grid_dir = os.path.join(args.out, "grids")
    digits = max(3, len(str(len(texts) - 1)))
    if state.is_main_process:
        print(f"eval: {len(model_names)} model(s) {model_names} x {len(texts)} prompts x {n} images "
              f"({len(model_names) * len(texts) * n} images, {len(model_names) * len(texts) * n * args.steps} transformer "
              f"evaluations); {args.steps} steps, guidance {args.guidance}, {H}x{W}, {dtype_name}, "
              f"{state.num_processes} process(es) x ~{math.ceil(len(texts) / state.num_processes)} prompts; "
              f"metrics {names}", flush=True)
    bar = tqdm(total=len(batches) * len(model_names), desc="eval (main rank's prompts)", unit="batch",
               disable=not state.is_main_process)
    records = []
    for batch in batches:
        batch_texts = [texts[p] for p in batch]
        batch_meta = None if metadata is None else [metadata[p] for p in batch]
        thumbs = {p: {} for p in batch}
        for name, adapter in adapters.items():
            start = time.perf_counter()
            activate(pipe.transformer, adapter)
            x1, images, latents = common.paired_samples(pipe, batch_texts, batch, args.seed, n, args.steps, args.guidance,
                                                        H, W, args.max_sequence_length, args.max_batch)
            noise_sums = [common.checksum(x) for x in x1]  # of exactly what this model started from
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously: time them, not their launch
            seconds = (time.perf_counter() - start) / len(batch)
            scores = score_batch(scorers, names, images, latents, batch_texts, batch_meta, n)
            pixels = common.to_uint8(images)  # (B*n, H, W, 3)
            for b, p in enumerate(batch):
                thumbs[p][name] = pixels[b * n:(b + 1) * n]
                records.append({"model": name, "index": p, "scores": scores[b], "seconds": seconds,
                                "noise": noise_sums[b * n:(b + 1) * n]})
            bar.set_postfix_str(name)
            bar.update(1)
        for p in batch:
            common.save_grid(os.path.join(grid_dir, f"prompt_{p:0{digits}d}.png"), texts[p], thumbs[p], args.grid_size)
    bar.close()

    records = gather_object(records)  # every rank's per-prompt scores, on every rank
    common.end_run(state)  # the process group, taken down in order (see common.end_run)
    if not state.is_main_process:
        return None
    config = dataclasses.asdict(args)
    config.update(
        metrics=names, num_prompts=len(texts), num_processes=state.num_processes, dtype=dtype_name, loras=loras,
        sigmas=[float(s) for s in flux.flux_sigmas(pipe, args.steps, H, W)],  # FluxPipeline's shifted grid
        sampler="FluxPipeline.__call__(prompt_embeds, pooled_prompt_embeds, latents, guidance_scale, num_inference_steps)",
        noise="torch.randn on the CPU, float32, (S, C) packed latent per image; generator seed = "
              "numpy SeedSequence([seed, prompt_index, image_index]).generate_state(1, uint64)",
        versions={package: version(package) for package in ("torch", "diffusers", "transformers")},
    )
    results = {"config": config, **summarize(records, names, model_names, texts)}
    for m, folder in {BASE: None, **loras}.items():
        results["models"][m]["lora"] = folder
    common.write_json(os.path.join(args.out, "results.json"), results)
    table = markdown_table(results, names)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table)
    print(table)
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and {len(texts)} grids in {grid_dir}")
    return results


def main(argv=None) -> int:
    """Exit status: 0, or 2 for bad input and 1 for a run-time failure, each one line (common.run_main)."""
    def run_evaluation():
        evaluate(parse_args(argv))

    return common.run_main("eval.py", run_evaluation)


if __name__ == "__main__":
    sys.exit(main())
