"""Run plumbing shared by train.py and eval.py: the one place for what both entry points need and
the paper does not describe.

Nothing here is TMPO. It holds the command line (transformers.HfArgumentParser over each entry
point's dataclass, with YAML presets from configs/), prompt files, the dtype table, the paired
initial noise and FluxPipeline's own ODE sampler (eval.py's evaluation and train.py's validation
both sample through `ode_sample`), image grids, the cross-rank mean of a metrics dict, atomic JSON
files, checkpoint folders (the files, not what the training puts in them) and the safety of an
output folder. train.py and eval.py import this module; it uses flux.py and never train.py,
eval.py, tmpo.py or tree_sampler.py.

    python -m pytest -q tests/test_train.py tests/test_eval.py tests/test_faults.py
"""

import argparse
import dataclasses
import functools
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers.hf_argparser import HfArg

import flux
import rewards

# Weight dtypes by flag value. train.py offers bf16 / fp32 only (FLUX activations overflow in fp16).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class InputError(ValueError):
    """Bad input found before any work: the message names the flag or file and what to fix.
    train.py and eval.py print it as `prog: error: ...` and exit with status 2 (as argparse does)."""


class RunError(RuntimeError):
    """The run cannot go on (a non-finite number, a reward server that fails): printed as
    `prog: error: ...` with exit status 1; checkpoints already written stay intact."""


class RunFinished(Exception):
    """`--resume` of a run that already reached --max_steps: nothing to do (exit status 0)."""


# ---------------------------------------------------------------------------------------------
# Command line: one dataclass per entry point, presets in YAML
# ---------------------------------------------------------------------------------------------


@dataclass
class FluxArgs:
    """The flags train.py and eval.py share: what FLUX samples, from which prompts (App. D defaults)."""

    config: str = HfArg(default="", help="YAML preset (configs/*.yaml) read before the command line; flags given override it")
    model: str = HfArg(default="black-forest-labs/FLUX.1-dev", aliases=["--pretrained_model_name_or_path"],
                       help="FluxPipeline folder or hub id")
    prompts: str = HfArg(default="", help="prompt file: .txt (one per line), .json (a list of strings or of {'prompt': ...}) "
                                          "or .jsonl; objects are kept as each prompt's metadata (GenEval)")
    guidance: float = HfArg(default=3.5, help="FLUX.1-dev guidance embedding scale (App. D: 3.5; no CFG)")
    height: int = HfArg(default=512, help="image height in pixels (App. D: 512)")
    width: int = HfArg(default=512, help="image width in pixels (App. D: 512)")
    max_sequence_length: int = HfArg(default=512, help="T5 tokens per prompt (FluxPipeline's default for FLUX.1-dev: 512)")
    geneval_url: str = HfArg(default="", help=f"GenEval server URL (default {rewards.DEFAULT_GENEVAL_URL})")
    reward_timeout: float = HfArg(default=60.0, help="seconds a reward server (GenEval) may take to answer one request")
    reward_retries: int = HfArg(default=2, help="retries of a failed or timed-out reward server request (then the run stops)")


# The valid ranges of FluxArgs' numbers (see check_ranges).
FLUX_RANGES = {"guidance": "[0, inf)", "height": "[16, inf)", "width": "[16, inf)", "max_sequence_length": "[1, 512]",
               "reward_timeout": "(0, inf)", "reward_retries": "[0, inf)"}


def check_flux_args(args: FluxArgs, ranges: dict) -> None:
    """FluxArgs' checks, and check_ranges of every number with FLUX_RANGES + `ranges` (the entry point's)."""
    if not args.prompts:
        raise InputError("--prompts FILE is required (.txt one prompt per line, .json or .jsonl)")
    check_ranges(args, {**FLUX_RANGES, **ranges})
    if args.height % 16 or args.width % 16:
        raise InputError(f"--height and --width must be multiples of 16 (FLUX's VAE downsamples by 8, then 2x2 latent "
                         f"patches make one token), got {args.height}x{args.width}")


def parse_args(cls, argv=None, prog: str | None = None):
    """Parse the command line into the dataclass `cls` with transformers.HfArgumentParser.

    Every field is a flag spelled --field_name or --field-name, plus the field's `aliases` (the
    diffusers spellings). Booleans: `--flag`, `--flag true|false`, and `--no_flag` when the default
    is True. Lists take several values (`--branch_early 0 2 3`); a field whose metadata says
    action "extend" may also be repeated (`--lora a --lora b`). Abbreviated flags are refused.
    `--config FILE.yaml` is read first (see `config_argv`); the command line comes after it, so a
    flag given there overrides the file (an "extend" list adds to the file's entries).
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(cls, prog=prog, description=(cls.__doc__ or "").split("\n")[0], allow_abbrev=False)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="")
    config = pre.parse_known_args(argv)[0].config
    file_argv = config_argv(config, cls) if config else []
    try:
        namespace = parser.parse_args(file_argv + argv)
    except SystemExit as err:  # argparse has printed the error; say which flags came from the file
        if err.code and file_argv:
            print(f"{parser.prog}: (read from --config {config}: {' '.join(file_argv)})", file=sys.stderr)
        raise
    return cls(**vars(namespace))


def config_argv(path: str, cls) -> list[str]:
    """A YAML preset as command-line words: {lr: 3e-5, reward: [hps, pickscore]} -> --lr 3e-5 --reward hps pickscore.

    Keys are field names of `cls`; the values then go through the same parser (and the same
    checks) as typed flags, so `5e-5` is a float although YAML 1.1 reads it as a string."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"--config {path}: cannot read it as YAML: {err}") from err
    if not isinstance(values, dict):
        raise InputError(f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)} | ({"config"} & set(values)))
    if unknown:
        raise InputError(f"--config {path}: unknown key(s) {unknown}; keys are the flag names of --help, with underscores")
    words = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        words += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return words


def check_ranges(args, ranges: dict) -> None:
    """Every number of `args` must be finite and inside its interval in `ranges` {field: "[low, high)"}
    ("inf" may end an interval; "(0, inf]" admits inf itself). A numeric field missing from `ranges`
    is a programming error: no number reaches a run unchecked. Raises InputError naming the flag."""
    numbers = {f.name for f in dataclasses.fields(args)
               if isinstance(getattr(args, f.name), (int, float)) and not isinstance(getattr(args, f.name), bool)}
    if numbers - set(ranges):
        raise AssertionError(f"no valid range declared for {sorted(numbers - set(ranges))}")
    for name, interval in ranges.items():
        value = getattr(args, name)
        low, high = (float(x) for x in interval[1:-1].split(","))
        if value is None:  # an Optional flag left unset
            continue
        if not ((low < value if interval[0] == "(" else low <= value) and (value < high if interval[-1] == ")" else value <= high)):
            raise InputError(f"--{name} must be in {interval}, got {value}")  # NaN compares False: never inside


def parse_named(specs: list, flag: str) -> dict:
    """['name=value', ...] -> {name: value}; a malformed or repeated name is an InputError naming `flag`."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"{flag} takes NAME=VALUE, got {spec!r}")
        if name.strip() in out:
            raise InputError(f"{flag} given twice for {name.strip()!r}")
        out[name.strip()] = value.strip()
    return out


def resolve_dtype(name: str, device) -> torch.dtype:
    """'auto' = bf16 on a GPU (the paper), fp32 on a CPU (bf16 matmuls are slow there); else DTYPES."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------


def load_prompts(path: str, flag: str = "--prompts") -> list[dict]:
    """Prompts with their metadata: a list of dicts with at least a non-empty 'prompt' string.

    .txt: one prompt per line (blank lines skipped); .json: a list of strings or of objects with a
    'prompt' field; .jsonl: one JSON string or object per line. Objects keep all their fields as
    metadata (GenEval reads its tags from them, e.g. its evaluation_metadata.jsonl). A missing,
    binary or empty file, or a malformed entry, raises InputError naming `flag` and the file.
    """
    where = f"{flag} {path}"
    if not os.path.isfile(path):
        raise InputError(f"{where}: prompt file does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".json", ".jsonl"):
        raise InputError(f"{where}: unknown extension {ext!r}; use .txt, .json or .jsonl")
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not UTF-8 text (byte {err.start}): pass a text prompt file") from err
    if "\x00" in text:
        raise InputError(f"{where} holds NUL bytes: a binary file, not a prompt file")

    def entry(value, at):
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or not value["prompt"].strip():
            raise InputError(f"{where}, {at}: expected a non-empty string or an object with a "
                             f"non-empty 'prompt' string, got {json.dumps(value)[:120]}")
        return value

    if ext == ".txt":
        items = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    elif ext == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not valid JSON: {err}") from err
        if not isinstance(values, list):
            raise InputError(f"{where} must hold a JSON list of prompts, got {type(values).__name__}")
        items = [entry(v, f"item {i}") for i, v in enumerate(values)]
    else:
        items = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(entry(json.loads(line), f"line {i}"))
                except json.JSONDecodeError as err:
                    raise InputError(f"{where}, line {i} is not valid JSON ({err}): {line[:120]!r}") from err
    if not items:
        raise InputError(f"{where}: the file holds no prompts")
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
    raise RunError(
        f"non-finite {what} at step {step + 1} (rank {rank}) for prompt(s) {culprits!r}; the run stops and "
        f"{kept(last_ckpt)}. Nothing is clamped: lower --lr or --max_grad_norm, or rerun with --dtype fp32 to look closer."
    )


def kept(last_ckpt) -> str:
    """What a run that stops now leaves behind, for its error message."""
    return f"the last checkpoint ({last_ckpt}) is intact" if last_ckpt else "no checkpoint was written yet"


# ---------------------------------------------------------------------------------------------
# Paired initial noise and FluxPipeline's ODE sampler
# ---------------------------------------------------------------------------------------------


def noise_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 64-bit generator seed for image `image_index` of prompt `prompt_index` (global indices).
    SeedSequence mixes the three numbers, so nearby (p, j) do not get correlated streams."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, dtype=np.uint64)[0])


def initial_noise(seed: int, prompt_index: int, num_images: int, event_shape) -> torch.Tensor:
    """(num_images, *event_shape) float32 N(0, I) drawn on the CPU: the same on any machine, rank,
    batch or model, so every model starts image (p, j) from the same x_1."""
    return torch.stack([
        torch.randn(tuple(event_shape), generator=torch.Generator("cpu").manual_seed(noise_seed(seed, prompt_index, j)))
        for j in range(num_images)
    ])


def checksum(x: torch.Tensor) -> str:
    """Short SHA-256 of a tensor's fp32 bytes: equal strings = bit-identical tensors."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def paired_samples(pipe, prompts: list, indices: list, seed: int, n: int, steps: int, guidance: float, height: int,
                   width: int, max_sequence_length: int, max_batch: int | None = None):
    """n ODE samples of each prompt from its paired noise (initial_noise(seed, index, j)), as eval.py
    compares models and train.py validates. Returns (x1 (B*n, S, C) the initial noises on the CPU,
    images (B*n, 3, H, W) in [0, 1], latents (B*n, C, h, w) the flow model's final latents, LGMD's z),
    group-major: rows b*n .. b*n + n - 1 belong to prompt b."""
    _, _, seq_len, channels = flux.latent_geometry(pipe, height, width)
    x1 = torch.cat([initial_noise(seed, p, n, (seq_len, channels)) for p in indices])  # (B*n, S, C)
    cond, _ = flux.encode_prompts(pipe, prompts, max_sequence_length)
    cond = {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}  # (B, ...) -> (B*n, ...), group-major
    x0 = ode_sample(pipe, cond, x1.to(pipe._execution_device), steps, guidance, height, width, max_batch)
    images = flux.decode(pipe, x0, height, width, max_batch=max_batch)
    return x1, images, flux.unpacked_latents(pipe, x0, height, width)


def ode_sample(pipe, cond: dict, latents: torch.Tensor, steps: int, guidance: float, height: int, width: int,
               max_batch: int | None = None) -> torch.Tensor:
    """Deterministic samples of FluxPipeline.__call__ itself from given initial noise.

    cond: {"prompt_embeds": (N, L, D), "pooled_prompt_embeds": (N, Dp)}, one row per image;
    latents: (N, S, C) packed initial noise x_1. Returns the final packed latents (N, S, C)
    (decode with flux.decode). `steps` Euler steps on FluxPipeline's shifted sigma grid, FLUX's
    guidance embedding at `guidance` (no CFG); at most `max_batch` images per pipeline call.
    tests/test_eval.py keeps this equal to tree_sampler.rollout with no branch point.
    """
    pipe.set_progress_bar_config(disable=True)
    size = max_batch or latents.shape[0]
    out = []
    for i in range(0, latents.shape[0], size):
        rows = slice(i, i + size)
        out.append(pipe(prompt_embeds=cond["prompt_embeds"][rows], pooled_prompt_embeds=cond["pooled_prompt_embeds"][rows],
                        latents=latents[rows], guidance_scale=guidance, num_inference_steps=steps, height=height,
                        width=width, output_type="latent").images)  # (n, S, C)
    return torch.cat(out).float()


# ---------------------------------------------------------------------------------------------
# Images, metrics and files
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 (as a PNG stores it)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: str, title: str, rows: dict, cell_height: int):
    """One PNG: `title` on top, one labelled row per entry of rows {label: (n, H, W, 3) uint8}, one
    column per image; cells scaled to `cell_height` pixels (0 = full size). Returns the PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n, h, w = next(iter(rows.values())).shape[:3]
    ch = h if cell_height == 0 or cell_height >= h else cell_height
    cw = max(1, round(w * ch / h))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(probe.textlength(label, font=font)) for label in rows)
    line_h = 14
    header = textwrap.wrap(title, width=max(20, (label_w + n * cw) // 7))[:4] or [""]
    top = 6 + line_h * len(header)
    grid = Image.new("RGB", (label_w + n * cw, top + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(header):
        draw.text((4, 3 + i * line_h), line, fill="black", font=font)
    for r, (label, images) in enumerate(rows.items()):
        y = top + r * ch
        draw.text((4, y + ch // 2 - 6), label, fill="black", font=font)
        for j, img in enumerate(images):
            tile = Image.fromarray(img)
            if tile.size != (cw, ch):
                tile = tile.resize((cw, ch), Image.LANCZOS)
            grid.paste(tile, (label_w + j * cw, y))
    grid.save(path)
    return grid


def make_accelerator(report_to: str, output_dir: str, fsdp_plugin=None):
    """accelerate's Accelerator logging to `report_to` (tensorboard | wandb | none) under output_dir.
    accelerate silently drops a tracker whose package is missing; here that is an InputError."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "none": lambda: True}
    if not available[report_to]():
        raise InputError(f"--report_to {report_to}: the package is not installed (pip install {report_to}), or use --report_to none")
    return Accelerator(log_with=None if report_to == "none" else report_to, project_dir=output_dir, fsdp_plugin=fsdp_plugin)


def log_image(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """One (H, W, 3) uint8 image to every tracker that takes images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")  # (1, H, W, 3)
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)


def mean_over_ranks(accelerator, values: dict) -> dict:
    """{name: float} -> {name: mean over all ranks}, in one collective. Every rank must call it
    with the same keys; they are stacked in sorted order, so no value is read back by position."""
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, reduction="mean").tolist()))


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: checkpoint-{step}/{lora,ema}/ (diffusers LoRA files), trainer_state.pt, rank{r}.pt
# ---------------------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full CPU fp32 copy of a (possibly FSDP2-sharded DTensor) tensor; collective under FSDP2."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full, for a plain tensor or an FSDP2-sharded DTensor parameter."""
    with torch.no_grad():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
        p.copy_(full.to(p.device, p.dtype))


def peft_keys(model, names: list) -> dict:
    """{parameter name: key in diffusers' LoRA file}, as peft's get_peft_model_state_dict renames."""
    from peft.utils import get_peft_model_state_dict

    tagged = {n: torch.tensor(float(i)) for i, n in enumerate(names)}  # identify each entry by value
    renamed = get_peft_model_state_dict(model, state_dict=tagged, adapter_name="default")
    if len(renamed) != len(names):
        raise RuntimeError(f"peft kept {len(renamed)} of {len(names)} LoRA parameters when renaming")
    return {names[int(v.item())]: k for k, v in renamed.items()}


def rng_states(device, **generators) -> dict:
    """The process's RNG states (torch, its own CUDA device's, numpy, python) and those of the named
    torch / numpy Generators. Only this rank's device: another rank restores its own."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            **{k: g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state for k, g in generators.items()}}


def set_rng_states(states: dict, device, **generators) -> None:
    """Inverse of rng_states."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    for k, g in generators.items():
        if isinstance(g, torch.Generator):
            g.set_state(states[k])
        else:
            g.bit_generator.state = states[k]


def save_checkpoint(accelerator, output_dir: str, step: int, model, loras: dict, state: dict, rank_state: dict) -> str:
    """Write checkpoint-{step} atomically: every file into checkpoint-{step}.tmp, then one rename.

    loras {subfolder: {file key: full tensor}} become diffusers LoRA files (flux.save_lora, with
    `model`'s LoraConfig), `state` trainer_state.pt (main process), `rank_state` rank{r}.pt (each
    rank). Collective: every rank calls it. A non-finite tensor is refused: such a state is never saved."""
    bad = [f"{sub}/{k}" for sub, sd in loras.items() for k, t in sd.items() if not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"checkpoint-{step} not written: non-finite LoRA tensors {bad[:3]} ({len(bad)} in all)")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for sub, state_dict in loras.items():
            flux.save_lora(model, os.path.join(tmp, sub), state_dict=state_dict)
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    torch.save(rank_state, os.path.join(tmp, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        write_json(os.path.join(tmp, MANIFEST), {"step": step, "files": files})  # what verify_checkpoint checks
        if os.path.exists(final):  # an older run's checkpoint of the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


_LORA_KEY = re.compile(r"^(?P<part>[^.]+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def check_lora_fits(transformer: torch.nn.Module, folder: str, name: str) -> tuple[dict, dict]:
    """Read a LoRA folder the way diffusers' FLUX loader does and check every weight against the
    transformer: each key must name a Linear layer of it, with A (r, in_features), B (out_features, r).
    Returns (the state dict as diffusers reads it, {module path: rank}). Checked before loading because diffusers' loader does not fail on
    a LoRA for another model: layers it lacks only give a warning (unless none matches), and a LoRA
    A wider than the layer silently widens the base layer (a feature for FLUX Control LoRAs; seen
    with diffusers 0.42: to_q of the base model became Linear(48 -> 32))."""
    from diffusers import FluxPipeline

    where = f"LoRA {name!r} ({folder})"
    try:
        state_dict, _, metadata = FluxPipeline.lora_state_dict(folder, return_alphas=True, return_lora_metadata=True)
    except Exception as err:  # re-raised with the folder's name
        raise InputError(f"{where}: cannot be read as a diffusers FLUX LoRA: {err}") from err
    unknown = [k for k in state_dict if not _LORA_KEY.match(k)]
    parts = {m.group("part") for m in map(_LORA_KEY.match, state_dict) if m}
    other_parts = sorted(parts - {"transformer"})
    if unknown:
        raise InputError(f"{where}: {len(unknown)} key(s) are not LoRA A/B weights, e.g. {unknown[:3]}")
    if other_parts:
        raise InputError(f"{where}: has weights for {other_parts}; only transformer LoRAs (what train.py writes) are read")
    if not state_dict:
        raise InputError(f"{where}: holds no LoRA weights")
    modules = dict(transformer.named_modules())
    shapes: dict[str, dict[str, tuple]] = {}
    for key, tensor in state_dict.items():
        m = _LORA_KEY.match(key)
        shapes.setdefault(m.group("module"), {})[m.group("ab")] = tuple(tensor.shape)
    missing = sorted(p for p in shapes if p not in modules)
    if missing:
        raise InputError(f"{where} does not fit the model: {len(missing)} of its {len(shapes)} layers do not exist "
                             f"in the transformer, e.g. {missing[:3]} (a LoRA for another model?)")
    ranks, bad = {}, []
    for path, ab in shapes.items():
        layer = modules[path]
        layer = getattr(layer, "base_layer", layer)  # already wrapped by an earlier adapter
        if not isinstance(layer, torch.nn.Linear):
            bad.append(f"{path} is a {type(layer).__name__}, not a Linear layer")
            continue
        if set(ab) != {"A", "B"}:
            bad.append(f"{path} has lora_{''.join(ab)} only")
            continue
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
            bad.append(f"{path}: A {a}, B {b}, but the layer is Linear({layer.in_features} -> {layer.out_features}), "
                       f"which needs A (r, {layer.in_features}) and B ({layer.out_features}, r)")
            continue
        ranks[path] = a[0]
    if bad:
        raise InputError(f"{where} does not fit the model ({len(bad)} layer(s)): " + "; ".join(bad[:3]))
    config = json.loads(metadata) if isinstance(metadata, str) else (metadata or {})  # keys "transformer.r", ...
    r = config.get("transformer.r")
    if r is not None and not config.get("transformer.rank_pattern") and set(ranks.values()) != {r}:
        raise InputError(f"{where}: its saved LoraConfig says rank {r}, its weights have ranks {sorted(set(ranks.values()))}")
    return state_dict, ranks




def load_lora_file(model, folder: str, keys: dict) -> dict:
    """{parameter name: tensor} of a LoRA folder written by save_checkpoint, checked against `model`
    (check_lora_fits) and against the LoRA parameters `keys` names ({name: key in the file})."""
    state_dict, _ = check_lora_fits(model, folder, os.path.basename(folder))
    expected = {f"transformer.{k}" for k in keys.values()}
    if set(state_dict) != expected:
        raise InputError(f"{folder} does not match this model's LoRA ({len(state_dict)} tensors, expected {len(expected)}, "
                         f"e.g. {sorted(expected - set(state_dict))[:2]} missing): different --lora_rank / model?")
    return {name: state_dict[f"transformer.{key}"] for name, key in keys.items()}


def list_checkpoints(output_dir: str) -> list:
    """(step, path) of the complete checkpoints in output_dir, oldest first (*.tmp are incomplete)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return sorted(found)


def on_main_process(accelerator, fn):
    """fn() on the main process only; its result, or the InputError / RunFinished it raised, on
    every rank: a refusal stops all ranks before any of them loads a model."""
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except (InputError, RunFinished) as err:
            box[1] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    if box[1] is not None:
        raise box[1]
    return box[0]


def end_run(state, *holders) -> None:
    """Finish the trackers and take the process group down in an order that cannot deadlock.

    `state`: the Accelerator (or PartialState); `holders`: namespaces holding the prepared models.
    Why (issue 9, row 13: rank 0 died with SIGABRT "terminate called without an active exception"
    after "done", and one run in our loops hung there instead): gloo's worker threads release the
    tensors of a finished collective after it completed, which needs the GIL; ProcessGroupGloo's
    destructor joins those threads while the thread destroying it holds the GIL (gdb: main thread in
    ~ProcessGroupGloo -> std::thread::join, worker in ~AsyncAllgatherWork -> decref_pyobject ->
    take_gil). The group died with the DDP wrapper (its reducer holds it) when main() returned - a
    deadlock - or at interpreter shutdown, where the waiting worker is ended inside a noexcept
    destructor - std::terminate. So: a barrier (no collective in flight), a pause without the GIL
    (the workers finish releasing), then every reference to the models dropped and the group
    destroyed here, with idle workers."""
    state.wait_for_everyone()
    if state.num_processes > 1:
        time.sleep(0.5)  # releases the GIL
    for tracker in getattr(state, "trackers", []):
        tracker.finish()
    if hasattr(state, "free_memory"):
        state.free_memory()  # the Accelerator's own references to the prepared models and optimizers
    for holder in holders:
        vars(holder).clear()
    gc.collect()  # the DDP wrapper sits in reference cycles
    getattr(state, "state", state).destroy_process_group()  # Accelerator.state / PartialState


class StopSignal:
    """SIGTERM (a preemption) sets `received` instead of killing the process mid-step: the loop
    finishes the step, saves a checkpoint and exits with status 143 (128 + SIGTERM)."""

    def __enter__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def write_json(path: str, data) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)


MANIFEST = "manifest.json"  # in each checkpoint: its step and every file's size when it was written
LOCK = "train.lock"  # in an output folder while a run owns it: pid, host, start time


def verify_checkpoint(path: str) -> list[str]:
    """What is wrong with a checkpoint folder: files missing or not of the size they were written
    with (a truncated copy, a full disk); [] if it passes. Cheap: reads sizes, not tensors."""
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{os.path.join(path, MANIFEST)} cannot be read ({err})"]
    problems = []
    for rel, size in files.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
        elif os.path.getsize(file) != size:
            problems.append(f"{file} has {os.path.getsize(file)} bytes, {size} when it was written (truncated?)")
    return problems


def loadable_checkpoints(output_dir: str) -> list[str]:
    """The checkpoints of output_dir that pass verify_checkpoint, oldest first."""
    return [path for _, path in list_checkpoints(output_dir) if not verify_checkpoint(path)]


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (0 = keep all); call it once a new one is complete."""
    for _, path in list_checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(path)


def read_checkpoint_file(file: str):
    """torch.load of a checkpoint file; an unreadable one is an InputError naming it and the
    checkpoints of its output folder that pass their manifest."""
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # zipfile / pickle / EOF errors name neither the file nor a way out
        folder = os.path.dirname(os.path.dirname(os.path.abspath(file)))
        raise InputError(f"{file} cannot be read ({type(err).__name__}: {err}); checkpoints in {folder} that pass "
                         f"their manifest: {loadable_checkpoints(folder) or 'none'} (--resume PATH picks one)") from err


def fingerprint(pipe) -> str:
    """A short hash of the base weights (every parameter's name, shape, dtype, sum and sum of |w| in
    float64): another base model of the same shape gets another fingerprint. One pass over the weights."""
    h = hashlib.sha256()
    for part, module in sorted(pipe.components.items()):
        for name, p in module.named_parameters() if isinstance(module, torch.nn.Module) else ():
            w = p.detach().double()
            h.update(f"{part}.{name} {tuple(p.shape)} {p.dtype} {float(w.sum())!r} {float(w.abs().sum())!r}".encode())
    return h.hexdigest()[:16]


def claim_output_dir(output_dir: str, take_over: bool) -> None:
    """Create output_dir and take its lock file (LOCK) before any model loads; a second run into the
    same folder is refused, naming the owner. A lock whose process is gone (a dead pid on this
    host, e.g. after kill -9) is reported as stale and taken over with --take_over_lock."""
    lock = os.path.join(output_dir, LOCK)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(lock) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            owner = {}  # half-written by a run killed while taking it
        here = owner.get("host") == socket.gethostname()
        alive = here and _pid_alive(owner.get("pid", -1))
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        if alive or not take_over:
            state = "running" if alive else ("no longer running (stale)" if here else "on another host: cannot check")
            raise InputError(f"--output_dir {output_dir} is locked by another run ({who}; {state}). Use another "
                             "--output_dir" + ("" if alive else ", or pass --take_over_lock if that run is gone"))
        print(f"taking over the lock of {output_dir} from {who}", flush=True)
        os.remove(lock)
        return claim_output_dir(output_dir, take_over=False)
    except OSError as err:
        raise InputError(f"--output_dir {output_dir} is not usable: {err}") from err
    with os.fdopen(fd, "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists but belongs to another user
    return True


def release_output_dir(output_dir: str) -> None:
    """Remove the lock if this process holds it."""
    try:
        with open(os.path.join(output_dir, LOCK)) as fh:
            mine = json.load(fh).get("pid") == os.getpid()
    except (OSError, ValueError):
        return
    if mine:
        os.remove(os.path.join(output_dir, LOCK))


def resume_target(output_dir: str, resume: str, max_steps: int) -> str | None:
    """The checkpoint a run continues from (--resume 'latest' or a folder), or None for a new run.

    Refuses to start a second run in a folder that holds one (checkpoints, or the log of a run that
    stopped before its first checkpoint), and to resume from a checkpoint that fails
    verify_checkpoint: 'latest' never falls back to an older one silently. A checkpoint that
    already reached max_steps raises RunFinished."""
    existing = list_checkpoints(output_dir)
    if not resume:
        if existing:
            raise InputError(f"{output_dir} already holds {existing[-1][1]}: pass --resume latest to continue it, "
                             "or a new --output_dir")
        other = sorted(set(os.listdir(output_dir)) - {LOCK}) if os.path.isdir(output_dir) else []
        if other:
            raise InputError(f"{output_dir} holds {other} but no checkpoint (a run stopped before its first one?): "
                             "nothing there can be resumed; delete them to start anew there, or pass a new --output_dir")
        return None
    if resume == "latest" and not existing:
        raise InputError(f"--resume latest: no checkpoint-* in {output_dir}; drop --resume to start a new run")
    path = existing[-1][1] if resume == "latest" else resume
    if not os.path.isdir(path):
        raise InputError(f"--resume {resume!r} is neither 'latest' nor a checkpoint folder")
    problems = verify_checkpoint(path)
    if problems:
        ok = loadable_checkpoints(os.path.dirname(os.path.abspath(path)))
        raise InputError(f"{path} does not load: {'; '.join(problems)}. Checkpoints that do: {ok or 'none'}"
                         + (f" (continue from one with --resume {ok[-1]})" if ok else ""))
    with open(os.path.join(path, MANIFEST)) as fh:
        step = json.load(fh)["step"]
    if step >= max_steps:
        raise RunFinished(f"the run is finished: {path} is step {step} of --max_steps {max_steps}; its "
                          "run_summary.json and checkpoints are kept. To train longer, resume with a larger --max_steps.")
    return path


def truncate_jsonl(file: str, step: int) -> None:
    """Keep a metrics.jsonl's rows up to `step`: a killed run's later steps are run (and logged) again.
    A partial last line (a crash while writing it) is dropped, and said so; a broken line before
    the last is an InputError naming the file and the line."""
    if not os.path.isfile(file):
        return
    with open(file) as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i < len(lines):
                raise InputError(f"{file}, line {i} is not JSON ({err}): repair or delete that line, then resume") from err
            print(f"{file}: dropped its partial last line (written when the run was killed): {line[:60]!r}", flush=True)
            continue
        if row["step"] <= step:
            rows.append(line.rstrip("\n") + "\n")
    with open(file + ".tmp", "w") as fh:
        fh.writelines(rows)
    os.replace(file + ".tmp", file)
