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

import contextlib
import dataclasses
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
from pathlib import Path
from types import SimpleNamespace

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


def require(ok, message: str) -> None:
    """Raise InputError(message) unless `ok`: one line per check of the input."""
    if not ok:
        raise InputError(message)


def run_main(prog: str, fn) -> int:
    """The exit status of an entry point: fn()'s (None = 0); an InputError prints `prog: error: ...`
    and gives 2, a RunError 1, RunFinished its message and 0 (one line each, no traceback)."""
    try:
        return fn() or 0
    except RunFinished as done:
        print(f"{prog}: {done}", flush=True)
        return 0
    except (InputError, RunError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1


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
    require(args.prompts, "--prompts FILE is required (.txt one prompt per line, .json or .jsonl)")
    check_ranges(args, {**FLUX_RANGES, **ranges})
    require(args.height % 16 == args.width % 16 == 0, f"--height and --width must be multiples of 16 (FLUX's VAE downsamples "
            f"by 8, then 2x2 latent patches make one token), got {args.height}x{args.width}")


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
    config = parser.parse_known_args(argv)[0].config  # a first pass only to find --config
    file_argv = config_argv(config, cls) if config else []
    try:
        return cls(**vars(parser.parse_args(file_argv + argv)))
    except SystemExit as err:  # argparse has printed the error; say which flags came from the file
        if err.code and file_argv:
            print(f"{parser.prog}: (read from --config {config}: {' '.join(file_argv)})", file=sys.stderr)
        raise


def config_argv(path: str, cls) -> list[str]:
    """A YAML preset as command-line words: {lr: 3e-5, reward: [hps, pickscore]} -> --lr 3e-5 --reward hps pickscore.

    Keys are field names of `cls`; the values then go through the same parser (and the same
    checks) as typed flags, so `5e-5` is a float although YAML 1.1 reads it as a string."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"--config {path}: cannot read it as YAML: {err}") from err
    require(isinstance(values, dict), f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)} | ({"config"} & set(values)))
    require(not unknown, f"--config {path}: unknown key(s) {unknown}; keys are the flag names of --help, with underscores")
    listed = ((key, value if isinstance(value, list) else [value]) for key, value in values.items())
    return [w for key, items in listed for w in (f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items))]


def check_ranges(args, ranges: dict) -> None:
    """Every number of `args` must be finite and inside its interval in `ranges` {field: "[low, high)"}
    ("inf" may end an interval; "(0, inf]" admits inf itself). A numeric field missing from `ranges`
    is a programming error: no number reaches a run unchecked. Raises InputError naming the flag."""
    numbers = {f.name for f in dataclasses.fields(args) if type(getattr(args, f.name)) in (int, float)}  # not bools
    assert numbers <= set(ranges), f"no valid range declared for {sorted(numbers - set(ranges))}"
    for name, interval in ranges.items():
        value = getattr(args, name)
        low, high = (float(x) for x in interval[1:-1].split(","))
        if value is not None and not ((low < value if interval[0] == "(" else low <= value)  # None: an Optional flag unset
                                      and (value < high if interval[-1] == ")" else value <= high)):
            raise InputError(f"--{name} must be in {interval}, got {value}")  # NaN compares False: never inside


def parse_named(specs: list, flag: str) -> dict:
    """['name=value', ...] -> {name: value}; a malformed or repeated name is an InputError naming `flag`."""
    out = {}
    for spec in specs:
        name, sep, value = (part.strip() for part in spec.partition("="))
        require(sep and name and value, f"{flag} takes NAME=VALUE, got {spec!r}")
        require(name not in out, f"{flag} given twice for {name!r}")
        out[name] = value
    return out


def resolve_dtype(name: str, device) -> torch.dtype:
    """'auto' = bf16 on a GPU (the paper), fp32 on a CPU (bf16 matmuls are slow there); else DTYPES."""
    return DTYPES[name] if name != "auto" else torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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
    where, ext = f"{flag} {path}", os.path.splitext(path)[1].lower()
    require(ext in (".txt", ".json", ".jsonl"), f"{where}: unknown extension {ext!r}; use .txt, .json or .jsonl")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise InputError(f"{where}: prompt file does not exist or cannot be read ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not UTF-8 text (byte {err.start}): pass a text prompt file") from err
    require("\x00" not in text, f"{where} holds NUL bytes: a binary file, not a prompt file")

    def parse(text, at):  # JSON, or an InputError naming the file and the line
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}{at} is not valid JSON ({err}): {text[:120]!r}") from err

    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if ext == ".json":
        values = parse(text, "")
        require(isinstance(values, list), f"{where} must hold a JSON list of prompts, got {type(values).__name__}")
        entries = [(f"item {i}", v) for i, v in enumerate(values)]
    else:
        entries = [(f"line {i}", line if ext == ".txt" else parse(line, f", line {i}")) for i, line in lines]
    items = []
    for at, value in entries:
        value = {"prompt": value} if isinstance(value, str) else value
        require(isinstance(value, dict) and isinstance(value.get("prompt"), str) and value["prompt"].strip(),
                f"{where}, {at}: expected a non-empty string or an object with a non-empty 'prompt' string, got "
                f"{json.dumps(value)[:120]}")
        items.append(value)
    require(items, f"{where}: the file holds no prompts")
    return items


def prompt_sets(args) -> tuple[list, list]:
    """train.py's (training prompts, validation prompts): --validation_split N holds out N prompts of
    --prompts chosen by --seed (not the last N: a file sorted by task would hold out one task only)."""
    items = load_prompts(args.prompts)
    if args.validation_prompts:
        return items, load_prompts(args.validation_prompts, "--validation_prompts")
    require(args.validation_split < len(items), f"--validation_split {args.validation_split} leaves no training prompt of "
            f"the {len(items)} in --prompts {args.prompts}")
    held = set(np.random.default_rng(args.seed).permutation(len(items))[:args.validation_split].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def prompt_indices(step: int, rank: int, per_process: int, world_size: int, num_prompts: int, seed: int) -> list:
    """Indices of rank `rank`'s prompts at `step`: a pure function of its arguments.

    The global stream is a fresh permutation of all prompts per epoch; step s takes the entries
    [s B, (s + 1) B) with B = per_process x world_size, and rank r the r-th slice of per_process.
    """
    first = (step * world_size + rank) * per_process  # position in the stream of all epochs
    return [int(np.random.default_rng([seed, pos // num_prompts]).permutation(num_prompts)[pos % num_prompts])  # epoch's order
            for pos in range(first, first + per_process)]


def check_finite(what: str, values: torch.Tensor, step: int, prompts: list, rank: int, last_ckpt) -> None:
    """Raise if any value is NaN/inf, naming the step and the prompt(s) of the bad groups.

    values: (G, ...) with the prompt (group) as the first dimension, or a scalar (all prompts).
    """
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        rows = bad.reshape(len(prompts), -1).any(dim=1).tolist() if values.dim() else [True] * len(prompts)  # (G,)
        raise RunError(
            f"non-finite {what} at step {step + 1} (rank {rank}) for prompt(s) {[p for p, b in zip(prompts, rows) if b]!r}; "
            f"the run stops and {kept(last_ckpt)}. Nothing is clamped: lower --lr or --max_grad_norm, or rerun with "
            "--dtype fp32 to look closer.")


def kept(last_ckpt) -> str:
    """What a run that stops now leaves behind, for its error message."""
    return f"the last checkpoint ({last_ckpt}) is intact" if last_ckpt else "no checkpoint was written yet"


# ---------------------------------------------------------------------------------------------
# Paired initial noise and FluxPipeline's ODE sampler
# ---------------------------------------------------------------------------------------------


def initial_noise(seed: int, prompt_index: int, num_images: int, event_shape) -> torch.Tensor:
    """(num_images, *event_shape) float32 N(0, I) drawn on the CPU: the same on any machine, rank,
    batch or model, so every model starts image (p, j) from the same x_1.

    Image j of prompt p (global indices) has its own generator, seeded with 64 bits of
    SeedSequence([seed, p, j]): it mixes the three numbers, so nearby (p, j) do not get correlated streams."""
    seeds = [int(np.random.SeedSequence([seed, prompt_index, j]).generate_state(1, dtype=np.uint64)[0]) for j in range(num_images)]
    return torch.stack([torch.randn(tuple(event_shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


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
    return torch.cat([
        pipe(prompt_embeds=cond["prompt_embeds"][i:i + size], pooled_prompt_embeds=cond["pooled_prompt_embeds"][i:i + size],
             latents=latents[i:i + size], guidance_scale=guidance, num_inference_steps=steps, height=height, width=width,
             output_type="latent").images  # (size, S, C)
        for i in range(0, latents.shape[0], size)
    ]).float()


# ---------------------------------------------------------------------------------------------
# Images, metrics and files
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 (as a PNG stores it)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: str, title: str, rows: dict, cell_height: int):
    """One PNG: `title` on top, one labelled row per entry of rows {label: (n, H, W, 3) uint8}, one
    column per image; cells scaled to `cell_height` pixels (0 = full size); the folder is created if
    needed. Returns the PIL image."""
    from PIL import Image, ImageDraw

    n, h, w = next(iter(rows.values())).shape[:3]
    ch = min(h, cell_height or h)
    cw = max(1, round(w * ch / h))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # measures text in PIL's default font
    label_w = 8 + max(int(probe.textlength(label)) for label in rows)
    header = "\n".join(textwrap.wrap(title, width=max(20, (label_w + n * cw) // 7))[:4])
    top = 6 + int(probe.multiline_textbbox((4, 3), header, spacing=3)[3])
    grid = Image.new("RGB", (label_w + n * cw, top + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    draw.multiline_text((4, 3), header, fill="black", spacing=3)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, top + r * ch + ch // 2 - 6), label, fill="black")
        for j, img in enumerate(images):
            grid.paste(Image.fromarray(img).resize((cw, ch), Image.LANCZOS), (label_w + j * cw, top + r * ch))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
    return grid


def make_accelerator(report_to: str, output_dir: str, fsdp_plugin=None):
    """accelerate's Accelerator logging to `report_to` (tensorboard | wandb | none) under output_dir.
    accelerate silently drops a tracker whose package is missing; here that is an InputError."""
    from accelerate import Accelerator, utils

    require(report_to == "none" or getattr(utils, f"is_{report_to}_available")(),
            f"--report_to {report_to}: the package is not installed (pip install {report_to}), or use --report_to none")
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


def write_json(path: str, data) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    Path(path + ".tmp").write_text(json.dumps(data, indent=2, default=str))
    os.replace(path + ".tmp", path)


def read_json(path: str, default=None):
    """A JSON file's content, or `default` if it is missing or not JSON (half-written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: checkpoint-{step}/{lora,ema}/ (diffusers LoRA files), trainer_state.pt, rank{r}.pt
# ---------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"  # in each checkpoint: its step and every file's size when it was written
LOCK = "train.lock"  # in an output folder while a run owns it: pid, host, start time


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full CPU fp32 copy of a (possibly FSDP2-sharded DTensor) tensor; collective under FSDP2."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()


def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full, for a plain tensor or an FSDP2-sharded DTensor parameter."""
    with torch.no_grad():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
        p.copy_(full.to(p.device, p.dtype))


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
    for k, g in generators.items():  # a torch or a numpy Generator
        g.set_state(states[k]) if isinstance(g, torch.Generator) else setattr(g.bit_generator, "state", states[k])


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
        for sub, state_dict in loras.items():  # diffusers creates the folders
            flux.save_lora(model, os.path.join(tmp, sub), state_dict=state_dict)
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    accelerator.wait_for_everyone()
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


def check_lora_fits(transformer: torch.nn.Module, folder: str, name: str) -> list[str]:
    """Read a LoRA folder the way diffusers' FLUX loader does and check every weight against the
    transformer: each key must name a Linear layer of it, with A (r, in_features), B (out_features, r).
    Returns the module paths it adapts. Checked before loading because diffusers' loader does not fail on
    a LoRA for another model: layers it lacks only give a warning (unless none matches), and a LoRA
    A wider than the layer silently widens the base layer (a feature for FLUX Control LoRAs; seen
    with diffusers 0.42: to_q of the base model became Linear(48 -> 32))."""
    from diffusers import FluxPipeline

    where = f"LoRA {name!r} ({folder})"
    try:
        state_dict = FluxPipeline.lora_state_dict(folder)
    except Exception as err:  # re-raised with the folder's name
        raise InputError(f"{where}: cannot be read as a diffusers FLUX LoRA: {err}") from err
    shapes: dict[str, dict[str, tuple]] = {}  # {module path: {"A": shape, "B": shape}}
    for key, tensor in state_dict.items():
        m = _LORA_KEY.match(key)
        if not m or m["part"] != "transformer":
            raise InputError(f"{where}: {key!r} is not a transformer LoRA A/B weight (train.py writes only those)")
        shapes.setdefault(m["module"], {})[m["ab"]] = tuple(tensor.shape)
    modules = dict(transformer.named_modules())
    require(shapes, f"{where}: holds no LoRA weights")
    missing = sorted(p for p in shapes if p not in modules)
    require(not missing, f"{where} does not fit the model: {len(missing)} of its {len(shapes)} layers do not exist in the "
            f"transformer, e.g. {missing[:3]} (a LoRA for another model?)")
    bad = []
    for path, ab in shapes.items():
        layer = getattr(modules[path], "base_layer", modules[path])  # already wrapped by an earlier adapter
        i, o = getattr(layer, "in_features", "?"), getattr(layer, "out_features", "?")
        a, b = ab.get("A"), ab.get("B")
        if not (isinstance(layer, torch.nn.Linear) and a and b and a == (b[-1], i) and b == (o, a[0])):
            bad.append(f"{path}: A {a}, B {b}, but the layer is {type(layer).__name__}({i} -> {o}), "
                       f"which needs A (r, {i}) and B ({o}, r)")
    require(not bad, f"{where} does not fit the model ({len(bad)} layer(s)): " + "; ".join(bad[:3]))
    return sorted(shapes)


def list_checkpoints(output_dir: str) -> list[str]:
    """The checkpoint-{step} folders of output_dir, oldest first (*.tmp are incomplete)."""
    found = [d for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else []) if re.fullmatch(r"checkpoint-\d+", d)]
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def verify_checkpoint(path: str) -> list[str]:
    """What is wrong with a checkpoint folder: files missing or not of the size they were written
    with (a truncated copy, a full disk); [] if it passes. Cheap: reads sizes, not tensors."""
    manifest = read_json(os.path.join(path, MANIFEST))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return [f"{os.path.join(path, MANIFEST)} is missing or not a manifest"]
    sizes = {os.path.join(path, rel): size for rel, size in files.items()}
    return [f"{file} is missing" if not os.path.isfile(file) else
            f"{file} has {os.path.getsize(file)} bytes, {size} when it was written (truncated?)"
            for file, size in sizes.items() if not os.path.isfile(file) or os.path.getsize(file) != size]


def loadable_checkpoints(output_dir: str) -> list[str]:
    """The checkpoints of output_dir that pass verify_checkpoint, oldest first."""
    return [path for path in list_checkpoints(output_dir) if not verify_checkpoint(path)]


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (0 = keep all); call it once a new one is complete."""
    for path in list_checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(path)


def read_checkpoint_file(checkpoint: str, name: str):
    """torch.load of the file `name` of a checkpoint folder (safetensors' load_file of a LoRA file); an
    unreadable one is an InputError naming it and the checkpoints of its output folder that pass their manifest."""
    from safetensors.torch import load_file

    file = os.path.join(checkpoint, name)
    try:
        return load_file(file) if file.endswith(".safetensors") else torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # zipfile / pickle / EOF errors name neither the file nor a way out
        folder = os.path.dirname(os.path.abspath(checkpoint))
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


def resume_target(output_dir: str, resume: str, max_steps: int) -> str | None:
    """The checkpoint a run continues from (--resume 'latest' or a folder), or None for a new run.

    Refuses to start a second run in a folder that holds one (checkpoints, or the log of a run that
    stopped before its first checkpoint), and to resume from a checkpoint that fails
    verify_checkpoint: 'latest' never falls back to an older one silently. A checkpoint that
    already reached max_steps raises RunFinished."""
    existing = list_checkpoints(output_dir)
    if not resume:
        other = sorted(set(os.listdir(output_dir)) - {LOCK}) if os.path.isdir(output_dir) else []
        require(not existing, f"{output_dir} already holds {''.join(existing[-1:])}: pass --resume latest to continue it, "
                "or a new --output_dir")
        require(not other, f"{output_dir} holds {other} but no checkpoint (a run stopped before its first one?): nothing "
                "there can be resumed; delete them to start anew there, or pass a new --output_dir")
        return None
    require(resume != "latest" or existing, f"--resume latest: no checkpoint-* in {output_dir}; drop --resume to start a new run")
    path = existing[-1] if resume == "latest" else resume
    require(os.path.isdir(path), f"--resume {resume!r} is neither 'latest' nor a checkpoint folder")
    problems = verify_checkpoint(path)
    if problems:
        ok = loadable_checkpoints(os.path.dirname(os.path.abspath(path)))
        raise InputError(f"{path} does not load: {'; '.join(problems)}. Checkpoints that do: {ok or 'none'}"
                         + (f" (continue from one with --resume {ok[-1]})" if ok else ""))
    step = read_json(os.path.join(path, MANIFEST))["step"]
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
    lines = [line for line in Path(file).read_text().splitlines() if line.strip()]
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
            rows.append(line + "\n")
    Path(file + ".tmp").write_text("".join(rows))
    os.replace(file + ".tmp", file)


# ---------------------------------------------------------------------------------------------
# The run's processes, its output folder and its end
# ---------------------------------------------------------------------------------------------


def claim_output_dir(output_dir: str, take_over: bool) -> None:
    """Create output_dir and take its lock file (LOCK) before any model loads; a second run into the
    same folder is refused, naming the owner. A lock whose process is gone (a dead pid on this
    host, e.g. after kill -9) is reported as stale and taken over with --take_over_lock."""
    import psutil

    lock = os.path.join(output_dir, LOCK)
    try:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(lock):
            owner = read_json(lock, {})  # {}: half-written by a run killed while taking it
            here = owner.get("host") == socket.gethostname()
            alive = here and psutil.pid_exists(owner.get("pid", -1))
            who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
            if alive or not take_over:
                state = "running" if alive else ("no longer running (stale)" if here else "on another host: cannot check")
                raise InputError(f"--output_dir {output_dir} is locked by another run ({who}; {state}). Use another "
                                 "--output_dir" + ("" if alive else ", or pass --take_over_lock if that run is gone"))
            print(f"taking over the lock of {output_dir} from {who}", flush=True)
            os.remove(lock)
        with open(lock, "x") as fh:  # "x" creates it or fails: of two runs started at once, one gets it
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
    except FileExistsError as err:
        raise InputError(f"--output_dir {output_dir} is locked by another run that took it just now") from err
    except OSError as err:
        raise InputError(f"--output_dir {output_dir} is not usable: {err}") from err


def release_output_dir(output_dir: str) -> None:
    """Remove the lock if this process holds it."""
    if read_json(os.path.join(output_dir, LOCK), {}).get("pid") == os.getpid():
        os.remove(os.path.join(output_dir, LOCK))


def on_main_process(accelerator, fn):
    """fn() on the main process only; its result, or the InputError / RunFinished it raised, on
    every rank: a refusal stops all ranks before any of them loads a model."""
    from accelerate.utils import broadcast_object_list

    box = [None, None]  # [result, error]
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


@contextlib.contextmanager
def stop_signal():
    """SIGTERM (a preemption) sets `.received` of the yielded object instead of killing the process
    mid-step: the loop finishes the step, saves a checkpoint and exits with status 143 (128 + SIGTERM)."""
    stop = SimpleNamespace(received=False)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(stop, "received", True))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


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
