"""Helpers shared by the one-time checkpoint converters (tools/convert_hps.py, tools/convert_imagereward.py).

A converter reads an official checkpoint (a torch state dict of another code base), maps every key
to a transformers module's key, builds that module without random initialisation and writes it
with save_pretrained. The helpers here make sure no weight is dropped or used twice on the way:

    load_checkpoint(file)                 the state dict, unwrapped from {"state_dict": ...} / DDP's "module."
    KeyTaker(state_dict, what)            hands out tensors, records each key's targets, refuses unknown keys
    count_blocks(state_dict, prefix)      number of "prefixN." blocks (checked contiguous)
    build_empty(model_cls, config, sd)    the module, built on the meta device and filled with `sd` exactly
    write_reward_json(out, reward, ...)   the small marker file rewards.py checks (which reward, converted how)
    check_out(out, overwrite) / prepare_out(out)   refuse a used --out before the work; replace it after
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

REWARD_JSON = "reward.json"  # read by rewards.py: {"reward": name, "converted_by": script, ...}


def load_checkpoint(file: str) -> dict:
    """A plain state dict of tensors, unwrapped from {"state_dict": ...} and a DDP "module." prefix.

    weights_only=True: these files are plain tensors, so nothing in them needs to execute code."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {file}: {type(e).__name__}: {str(e)[:300]}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{file} is not a state dict of tensors")
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


class KeyTaker:
    """Hands out checkpoint tensors and records that each key was used exactly once.

    `report[src]` is the list of target keys built from `src`, or "ignored: <why>"."""

    def __init__(self, state_dict: dict, what: str):
        self.sd, self.what, self.report = state_dict, what, {}

    def take(self, key: str, *targets: str) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.what} checkpoint has no key '{key}': is this the right file?")
        if key in self.report:
            raise RuntimeError(f"converter bug: '{key}' used twice")
        self.report[key] = list(targets)
        return self.sd[key]

    def ignore(self, key: str, why: str) -> torch.Tensor:
        if key in self.report:
            raise RuntimeError(f"converter bug: '{key}' used twice")
        self.report[key] = f"ignored: {why}"
        return self.sd[key]

    def finish(self) -> dict:
        left = sorted(set(self.sd) - set(self.report))
        if left:
            raise ValueError(
                f"{self.what} checkpoint has {len(left)} key(s) the converter does not know, e.g. {left[:8]}; "
                "refusing to drop weights silently"
            )
        return self.report


def count_blocks(sd: dict, prefix: str) -> int:
    """How many "prefix0.", "prefix1.", ... blocks the state dict holds; they must be contiguous."""
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    if not idx or idx != set(range(max(idx) + 1)):
        raise ValueError(f"checkpoint has no contiguous '{prefix}N.' blocks (found {sorted(idx)[:10]})")
    return len(idx)


def build_empty(model_cls, config, state_dict: dict, what: str, **model_kwargs) -> torch.nn.Module:
    """`model_cls(config)` built on the meta device (no random init of ~1B parameters), then given
    exactly `state_dict`: a missing, unexpected or left-over tensor is an error."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers real
        module = model_cls(config, **model_kwargs)
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    # position_ids are arange buffers that transformers builds itself (non-persistent).
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: converted weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    meta = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if meta:
        raise ValueError(f"{what}: tensors left uninitialised: {meta[:8]}")
    return module.eval()


def write_reward_json(out: str, reward: str, script: str, checkpoint: str, **extra) -> None:
    """The marker rewards.py reads to know the folder is a converted `reward` (and its extra constants)."""
    info = {"reward": reward, "converted_by": script, "checkpoint": os.path.basename(checkpoint), **extra}
    with open(os.path.join(out, REWARD_JSON), "w") as f:
        json.dump(info, f, indent=2)


def check_out(out: str, overwrite: bool) -> None:
    """Before any work: `out` must be new or empty, or an earlier conversion (it has reward.json)
    that --overwrite allows to replace."""
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty; "
                                  "pass --overwrite to replace an earlier conversion")
        if not os.path.isfile(os.path.join(out, REWARD_JSON)):
            raise FileExistsError(f"--out {out} holds files but no {REWARD_JSON}: "
                                  "not an earlier conversion, not removing it")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a folder")


def prepare_out(out: str) -> None:
    """After the conversion succeeded: remove an earlier conversion in `out` (so no stale file of it
    stays beside the new ones) and create the folder."""
    if os.path.isfile(os.path.join(out, REWARD_JSON)):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
