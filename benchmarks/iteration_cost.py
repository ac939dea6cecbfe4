"""Iteration cost of TMPO's tree against per-leaf recompute, independent rollouts and Flow-GRPO; the
memory of rollout and update against flux.memory_plan.

Paper: Li et al. 2026, Sec. 4.2 and App. C (tree sampling); Table 1 (iteration time TMPO 68.3 s,
Flow-GRPO 108.9 s, TreeGRPO 79.1 s on 8 GPUs) and Table 2 (w/o tree structure 123.7 s). The claim:
prefix sharing and gradients only at the branch points cut the cost of an iteration. This script
measures it on a randomly initialised FLUX-architecture transformer, with the project's own
sampler and update (tree_sampler.rollout / update), and shows the code reaches the floor the
mathematics allows:

  rollout: transformer forwards = sum over denoising steps of the active nodes, one batched call
           per step. Paper tree (6 steps, 3 roots, k = 3 at steps 2 and 3, K = 27 leaves):
           3 + 3 + 3 + 9 + 27 + 27 = 72, against 6 * 27 = 162 for 27 independent trajectories.
  update:  one forward with grad per unique parent at an SDE step (Eq. 47 has terms only there):
           3 + 9 = 12, against 27 * 2 = 54 when every leaf's path is recomputed, and 27 * 5 = 135
           for Flow-GRPO (a forward with grad per leaf per SDE step). Same gradient (checked).

Methods (one iteration = rollout + advantage + update + AdamW step on the LoRA weights):
  tmpo           tree rollout; plain update (one graph, one backward).
  tmpo_chunked   tree rollout; update(chunk_size=c, on_policy=True): same gradient, <= c graphs.
  tmpo_per_leaf  tree rollout; update on Rollout.unshared(): each leaf's path recomputed on its own
                 (what the tree avoids: 54 forwards with grad instead of 12).
  no_tree        the paper's "w/o tree structure" (Table 2): K independent trajectories, CPS SDE at
                 the tree's SDE steps (2, 3), Softmax-TB advantage.
  flow_grpo      Flow-GRPO: K independent trajectories, CPS SDE (eta 0.7) at steps 0..4 (every step
                 with noise; also the 5 of 6 steps its FLUX PickScore config trains), GRPO advantage
                 (Eq. 28); KL to the reference off as in that config (--kl-coef > 0 turns it on and
                 counts its reference forwards).
  The baselines back-propagate c parents at a time (Flow-GRPO's trainer also back-propagates one
  timestep at a time; one graph of 135 forwards would not fit a GPU at FLUX size).

Timed: the transformer work of each method and everything sampler and update do around it. Not
timed: VAE decode and reward models (the same for every method at equal K; rewards here are fixed
random numbers), so the paper's ratios, which include them and 8-GPU communication, are diluted
towards 1 compared with these. Forwards are counted three ways and must agree: the sampler's own
counts, a counter around the velocity function, and TreeSpec's formulas.

Memory, K = 9, 27, 81 (trees k = 3 at [0, 2], [0, 2, 3], [0, 1, 2, 3] on 6 steps), with and
without gradient checkpointing, plain and chunked update:
  - saved-for-backward bytes (any device): flux.SavedTensorMeter's peak over the update (the
    activation memory that grows with the forwards alive), next to the plan's count
    (flux.activation_bytes: rows alive x saved bytes per row, counted on a meta-device copy). With
    checkpointing the meter sees the blocks' inputs, not the block recomputed in backward;
  - rollout: the bytes the Rollout keeps for the update (x, mean and children of each SDE step);
  - on CUDA also torch.cuda.max_memory_allocated() above what was allocated before, for rollout
    and update, next to flux.memory_plan's working sets (update: rows alive x (checkpointed +
    block); rollout: rows per call x block). This is the check of the plan at FLUX width; it has
    not run yet (no GPU so far): benchmarks/gpu_check.py runs it.
Exact gradient (after the warm-up round): chunked (on- and off-policy), per-leaf and chunked per-leaf
updates give the plain update's gradient on one tree rollout (relative max difference <= 1e-4 in
fp32, 5e-2 in bf16).

Presets (random weights, FLUX.1-dev layout, LoRA on the paper's targets via flux.add_lora):
  tiny   1 + 1 blocks, width 32, 4x4 tokens, fp32      (--quick; the tests)
  small  2 + 4 blocks, width 128, 8x8 = 64 image tokens (FLUX at 128x128 px), 32 text tokens,
         LoRA rank 16, fp32                              (CPU default)
  large  1 + 2 blocks at FLUX.1-dev width (24 heads x 128 = 3072, T5 4096, CLIP 768), 32x32 = 1024
         image tokens (512x512 px) + 512 text tokens, LoRA rank 64 / alpha 128, bf16, 697 M
         parameters (CUDA default). Saved activations: 0.62 GiB per row (flux.activation_bytes),
         so the plain update at K = 81 (39 rows) holds ~24 GiB, the per-leaf gradient check ~34.
Depth scales every method's transformer cost by the same factor, so to first order the ratios
carry over to the 19 + 38 blocks of FLUX.1-dev; the large preset keeps width and token count,
which set the per-forward cost and memory.

    python benchmarks/iteration_cost.py                   # CPU, small preset (~1-2 min on 2 cores)
    python benchmarks/iteration_cost.py --quick           # tiny preset, 2 reps (seconds)
    python benchmarks/iteration_cost.py --device cuda     # large preset, bf16 (benchmarks/gpu_check.py)
    python -m pytest -q tests/test_benchmark.py
Writes benchmarks/results/iteration_cost_<device>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flux  # noqa: E402
import tmpo  # noqa: E402
import tree_sampler as ts  # noqa: E402
from metrics import need  # noqa: E402

# Table 1 (PickScore-only protocol, FLUX.1-dev, 8 GPUs) and Table 2 of the paper, seconds per iteration.
PAPER_S = {"tmpo": 68.3, "flow_grpo": 108.9, "tree_grpo": 79.1, "no_tree": 123.7}
N, ETA, BRANCH, BETA, LR, MAX_GRAD_NORM = 6, 0.7, (0, 2, 3), 1.0, 5e-5, 0.3  # the paper's tree and update
MEMORY_TREES = {9: (0, 2), 27: (0, 2, 3), 81: (0, 1, 2, 3)}  # k = 3, L = 2, 3, 4 levels on 6 steps
VARIANTS = ("plain", "chunked", "plain_checkpointed", "chunked_checkpointed")  # update x gradient checkpointing
PRESETS = {  # double / single blocks, heads x head_dim, RoPE split, T5 / CLIP width, tokens per side, T5 tokens
    "tiny": dict(double=1, single=1, heads=2, head_dim=16, rope=(4, 6, 6), text=32, pooled=32, side=4, text_len=8,
                 rank=4, alpha=8.0, dtype="float32"),
    "small": dict(double=2, single=4, heads=4, head_dim=32, rope=(8, 12, 12), text=64, pooled=64, side=8, text_len=32,
                  rank=16, alpha=32.0, dtype="float32"),
    "large": dict(double=1, single=2, heads=24, head_dim=128, rope=(16, 56, 56), text=4096, pooled=768, side=32,
                  text_len=512, rank=64, alpha=128.0, dtype="bfloat16"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--config", choices=sorted(PRESETS), help="model preset (default: small on CPU, large on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny preset (whatever --config says), 2 repetitions: seconds")
    p.add_argument("--reps", type=int, default=7, help="timed rounds, each runs every method once in turn; medians")
    p.add_argument("--groups", type=int, default=1, help="G, prompts per iteration (the paper: one per GPU)")
    p.add_argument("--chunk-size", type=int, default=9, help="c: parents per backward of the chunked updates")
    p.add_argument("--kl-coef", type=float, default=0.0, help="Flow-GRPO's KL weight (its FLUX PickScore config: 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default 1: threads of a shared CPU make 10x outliers)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompt embeddings, noises and rewards")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/iteration_cost_<device>.json)")
    args = p.parse_args(argv)
    args.config = "tiny" if args.quick else args.config or ("small" if args.device == "cpu" else "large")
    args.reps = min(args.reps, 2) if args.quick else args.reps
    if min(args.reps, args.groups, args.chunk_size) < 1 or torch.device(args.device).type not in ("cpu", "cuda"):
        p.error("need --reps, --groups, --chunk-size >= 1 and --device cpu or cuda[:i]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch.cuda.is_available() is False")
    return args


def build_model(preset: str, groups: int, seed: int, device: torch.device) -> SimpleNamespace:
    """A randomly initialised FluxTransformer2DModel with the paper's LoRA (flux.add_lora), as velocity functions."""
    from diffusers import FluxTransformer2DModel

    c = PRESETS[preset]
    dtype = getattr(torch, c["dtype"])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=c["double"], num_single_layers=c["single"],
            attention_head_dim=c["head_dim"], num_attention_heads=c["heads"], joint_attention_dim=c["text"],
            pooled_projection_dim=c["pooled"], guidance_embeds=True, axes_dims_rope=c["rope"])
    transformer.to(dtype).requires_grad_(False).eval()  # the paper's bf16 base weights (large)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        lora = flux.add_lora(transformer, rank=c["rank"], alpha=c["alpha"])  # fp32, the only trained weights
    S = c["side"] ** 2
    img_ids = flux.token_grid_ids(c["side"], c["side"], device=device)  # (S, 3)
    velocity_fn = flux.make_velocity_fn(transformer, torch.zeros(c["text_len"], 3, device=device), img_ids,
                                        guidance=3.5, dtype=dtype)

    def ref_velocity_fn(x, t, cond):  # the base model, LoRA switched off for this call (Flow-GRPO's KL)
        transformer.disable_adapters()
        try:
            return velocity_fn(x, t, cond)
        finally:
            transformer.enable_adapters()

    g = torch.Generator().manual_seed(seed + 2)
    cond = {"prompt_embeds": torch.randn(groups, c["text_len"], c["text"], generator=g).to(device, dtype),
            "pooled_prompt_embeds": torch.randn(groups, c["pooled"], generator=g).to(device, dtype)}
    return SimpleNamespace(transformer=transformer, lora=lora, velocity_fn=velocity_fn, ref_velocity_fn=ref_velocity_fn,
                           cond=cond, event_shape=(S, 64), sigmas=ts.sigma_schedule(N, image_seq_len=S),
                           img_ids=img_ids, text_len=c["text_len"], dtype=c["dtype"])


class Counter:
    """Wraps velocity_fn; counts calls and rows with and without grad (a row = one node's forward)."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, {True: 0, False: 0}  # rows by torch.is_grad_enabled()

    def __call__(self, x, t, cond):
        self.calls += 1
        self.rows[torch.is_grad_enabled()] += x.shape[0]
        return self.fn(x, t, cond)


@dataclass
class Method:
    name: str
    description: str
    spec: ts.TreeSpec
    advantage: str = "softmax_tb"  # Eq. (5), or "grpo": Eq. (28)
    chunk: int | None = None  # parents per backward (on-policy); None = plain update, one graph
    per_leaf: bool = False  # update on Rollout.unshared()
    kl: float = 0.0
    paper: str | None = None  # key of PAPER_S

    def expected_nfe(self, G: int) -> dict:
        grad = self.spec.update_nfe(G, per_leaf=self.per_leaf)
        return {"rollout": self.spec.rollout_nfe(G), "update_grad": grad, "update_nograd": grad if self.kl > 0 else 0}


def make_methods(chunk: int, kl_coef: float) -> list[Method]:
    tree = ts.TreeSpec.tree(N, BRANCH, k=3, eta=ETA)
    K, sde = tree.leaves_per_group, sorted(tree.fanout)
    return [
        Method("tmpo", "tree rollout, plain update (one graph)", tree, paper="tmpo"),
        Method("tmpo_chunked", "tree rollout, chunked on-policy update (same gradient)", tree, chunk=chunk, paper="tmpo"),
        Method("tmpo_per_leaf", "tree rollout, update recomputes every leaf's path", tree, chunk=chunk, per_leaf=True),
        Method("no_tree", f"{K} independent trajectories, SDE at steps {sde}, Softmax-TB",
               ts.TreeSpec.independent(N, K, sde, eta=ETA), chunk=chunk, paper="no_tree"),
        Method("flow_grpo", f"{K} independent trajectories, SDE at steps 0-4, GRPO" + (f", KL {kl_coef}" if kl_coef else ""),
               ts.TreeSpec.independent(N, K, range(5), eta=ETA), "grpo", chunk=chunk, kl=kl_coef, paper="flow_grpo"),
    ]


def _clock(device) -> float:
    """time.perf_counter() once the device's queued work is done (synchronize: a no-op on CPU)."""
    torch.get_device_module(device).synchronize(device)
    return time.perf_counter()


def run_iteration(m: Method, model, optimizer, G: int, seed: int, device) -> tuple[dict, dict]:
    """One training iteration (rollout, advantage, update, optimizer step): seconds, and forwards counted."""
    K = m.spec.leaves_per_group
    gen = torch.Generator(device=device).manual_seed(seed)
    R = torch.randn(G, K, generator=torch.Generator().manual_seed(seed)).to(device)  # stands in for the reward
    policy, update, ref = Counter(model.velocity_fn), Counter(model.velocity_fn), Counter(model.ref_velocity_fn)
    t0 = _clock(device)
    ro = ts.rollout(policy, m.spec, model.sigmas, model.cond, G, model.event_shape, generator=gen, device=device)
    t1 = _clock(device)
    A = tmpo.softmax_tb_advantage(ro.log_prob, R, BETA) if m.advantage == "softmax_tb" else tmpo.grpo_advantage(R)
    optimizer.zero_grad(set_to_none=True)
    out = ts.update(update, ro.unshared() if m.per_leaf else ro, model.cond, A, chunk_size=m.chunk, on_policy=True,
                    kl_coef=m.kl, ref_velocity_fn=ref if m.kl else None)
    torch.nn.utils.clip_grad_norm_(model.lora, MAX_GRAD_NORM)
    optimizer.step()
    t2 = _clock(device)
    nfe = {"rollout": ro.nfe, "rollout_calls": policy.calls, "update_grad": out["nfe_grad"],
           "update_nograd": out["nfe_nograd"], "backward_calls": out["chunks"]}
    counted = {"rollout": policy.rows[False], "update_grad": update.rows[True], "update_nograd": update.rows[False] + ref.rows[False]}
    for key, formula in m.expected_nfe(G).items():  # the benchmark's numbers mean nothing if these disagree
        need(nfe[key] == counted[key] == formula, f"{m.name}: {key} forwards disagree: sampler {nfe[key]}, counted "
                                                  f"{counted[key]}, formula {formula}", RuntimeError)
    need(not policy.rows[True] and policy.calls == N, f"{m.name}: rollout made {policy.calls} calls, {policy.rows[True]} "
                                                      f"rows with grad; expected {N} no-grad calls", RuntimeError)
    need(math.isfinite(out["loss"]), f"{m.name}: non-finite loss {out['loss']}", RuntimeError)
    return {"rollout": t1 - t0, "update": t2 - t1, "iteration": t2 - t0}, nfe


def _tree_rollout(model, spec, G, seed, device):
    ro = ts.rollout(model.velocity_fn, spec, model.sigmas, model.cond, G, model.event_shape,
                    generator=torch.Generator(device=device).manual_seed(seed), device=device)
    R = torch.randn(G, spec.leaves_per_group, generator=torch.Generator().manual_seed(seed)).to(device)
    return ro, tmpo.softmax_tb_advantage(ro.log_prob, R, BETA)


def _grads(model) -> torch.Tensor:
    """The LoRA gradient as one fp32 vector (zeros for a weight without one); the gradients are then cleared."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in model.lora])
    model.transformer.zero_grad(set_to_none=True)  # only the LoRA weights have gradients
    return flat


def check_gradients(model, G: int, chunk: int, device) -> dict:
    """Chunked / per-leaf updates give the plain update's gradient on one tree rollout."""
    ro, A = _tree_rollout(model, ts.TreeSpec.tree(N, BRANCH, k=3, eta=ETA), G, 10_000, device)
    on = dict(chunk_size=chunk, on_policy=True)
    variants = {"plain": (ro, {}), "chunked_on_policy": (ro, on), "chunked_off_policy": (ro, dict(chunk_size=chunk)),
                "per_leaf": (ro.unshared(), {}), "per_leaf_chunked": (ro.unshared(), on)}
    grads, _ = {}, _grads(model)  # drop the last iteration's gradients
    for name, (rollout, kw) in variants.items():
        ts.update(model.velocity_fn, rollout, model.cond, A, **kw)
        grads[name] = _grads(model)
    scale, tol = float(grads["plain"].abs().max()), 1e-4 if model.dtype == "float32" else 5e-2
    need(scale > 0, "the plain update's gradient is zero: the gradient check would be vacuous", RuntimeError)
    rel = {name: float((g - grads["plain"]).abs().max()) / scale for name, g in grads.items() if name != "plain"}
    need(max(rel.values()) <= tol, f"gradient check failed (tolerance {tol}): {rel}", RuntimeError)
    return {"max_abs_grad_plain": scale, "rel_max_diff_vs_plain": rel, "tol": tol, "passed": True}


def _cuda_peak(device, fn):
    """fn(), and on CUDA the bytes allocated at its peak above what was allocated before (else None).
    The caching allocator books every allocation on the host when it is made: no synchronize needed."""
    gc.collect()
    if device.type != "cuda":
        return fn(), None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    return fn(), torch.cuda.max_memory_allocated(device) - before


def measure_memory(model, G: int, chunk: int, device) -> tuple[list, dict]:
    """Rollout and update memory at K = 9, 27, 81, with and without checkpointing, next to the plan."""
    act = flux.activation_bytes(model.transformer, model.img_ids, model.text_len)  # saved bytes per row
    # The sampler saves, per parent, a float64 residual x' - mu of each of its k = 3 children (Eq. 48):
    # 1.5 MiB per parent at 512^2 (0.2% of the transformer's 0.8 GiB with checkpointing; the plan ignores it).
    sampler = 3 * math.prod(model.event_shape) * 8
    grads = sum(p.numel() * 4 for p in model.lora)  # the fp32 LoRA gradients the first backward allocates (CUDA peak)
    exclude = [*model.transformer.parameters(), *model.transformer.buffers()]
    rows, _ = [], _grads(model)
    for K, steps in MEMORY_TREES.items():
        spec = ts.TreeSpec.tree(N, steps, k=3, eta=ETA)
        active = [G * a for a in spec.active_nodes()]  # rows per denoising step
        parents = [active[n] for n in spec.fanout]  # rows of each SDE step's recompute
        (ro, A), cuda = _cuda_peak(device, lambda: _tree_rollout(model, spec, G, K, device))
        stored = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for tr in ro.transitions
                  for t in (tr.x, tr.mean, tr.x_next, tr.log_prob)}
        row = {"K": K, "branch_steps": list(steps), "rollout": {
            "rows_per_call": max(active), "stored_bytes": sum(stored.values()) + ro.x0.nbytes, "cuda_peak_bytes": cuda,
            "plan_bytes": max(active) * act["block"]}}
        for ckpt in (False, True):
            model.transformer.enable_gradient_checkpointing() if ckpt else model.transformer.disable_gradient_checkpointing()
            per_row = act["checkpointed"] if ckpt else act["grad"]
            for variant, kw in (("plain", {}), ("chunked", dict(chunk_size=chunk, on_policy=True))):
                alive = sum(parents) if variant == "plain" else max(min(chunk, p) for p in parents)  # forwards in one graph
                with flux.SavedTensorMeter(exclude) as meter:
                    out, cuda = _cuda_peak(device, lambda: ts.update(model.velocity_fn, ro, model.cond, A, **kw))
                _grads(model)
                row[variant + ("_checkpointed" if ckpt else "")] = {
                    "grad_forwards": out["nfe_grad"], "grad_forwards_alive": alive, "backward_calls": out["chunks"],
                    "saved_peak_bytes": meter.peak, "saved_live_after_bytes": meter.live, "plan_saved_bytes": alive * (per_row + sampler),
                    "cuda_peak_bytes": cuda, "plan_peak_bytes": alive * (per_row + sampler + ckpt * act["block"]) + grads}
        model.transformer.disable_gradient_checkpointing()
        rows.append(row)
    return rows, act


def _table(header: list, rows: list) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def report(result: dict) -> str:
    env, cfg, mib = result["env"], result["config"], lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    pair = lambda measured, plan: f"{mib(measured)} | {mib(plan)}"  # noqa: E731
    m = ", ".join(f"{k} {v}" for k, v in PRESETS[cfg["preset"]].items())
    lines = [f"Iteration cost on {env['device_name']} ({env['threads']} threads), torch {env['torch']}: random FLUX "
             f"'{cfg['preset']}' {m}; {N} steps, K = {cfg['K']}, G = {cfg['groups']}; median of {cfg['reps']} reps, methods "
             f"alternating; load {env['loadavg_before'][0]:.2f} -> {env['loadavg_after'][0]:.2f}. No VAE, no reward model."]
    rows = [[name, *(r["nfe"][k] for k in ("rollout", "update_grad", "update_nograd", "backward_calls")),
             *(f"{r['median_s'][k]:.3f}" for k in ("rollout", "update", "iteration")), f"{r['ratio_vs_flow_grpo']:.2f}",
             f"{PAPER_S[r['paper']]:.1f} ({PAPER_S[r['paper']] / PAPER_S['flow_grpo']:.2f})" if r["paper"] else "-"]
            for name, r in result["methods"].items()]
    lines.append(_table(["method", "rollout NFE", "update NFE grad", "+ no grad", "bwd calls", "rollout s", "update s",
                         "s/iter", "vs Flow-GRPO", "paper s (vs F-GRPO)"], rows))
    lines.append(f"Paper, not implemented here: TreeGRPO {PAPER_S['tree_grpo']} s. Paper times include decode, reward, 8-GPU sync.")
    act = result["activation_bytes_per_row"]
    lines += ["", f"Memory (MiB; plan: flux.activation_bytes per row: {mib(act['grad'])} with grad, {mib(act['checkpointed'])} "
              f"checkpointed, {mib(act['block'])} largest block). Saved = saved-for-backward peak | plan; CUDA = "
              "max_memory_allocated | plan (working set)."]
    rows = []
    for r in result["memory"]:
        ro = r["rollout"]
        rows.append([r["K"], "rollout", ro["rows_per_call"], f"stored {mib(ro['stored_bytes'])}", "",
                     pair(ro["cuda_peak_bytes"], ro["plan_bytes"])])
        rows += [[r["K"], v, u["grad_forwards_alive"], pair(u["saved_peak_bytes"], u["plan_saved_bytes"]), u["backward_calls"],
                  pair(u["cuda_peak_bytes"], u["plan_peak_bytes"])] for v, u in ((v, r[v]) for v in VARIANTS)]
    lines.append(_table(["K", "phase", "rows alive", "saved | plan", "bwd calls", "CUDA | plan"], rows))
    g = result["grad_check"]
    lines += ["", f"Exact gradient (max |g - g_plain| / max |g_plain|, tol {g['tol']:.0e}): "
              + ", ".join(f"{k} {v:.1e}" for k, v in g["rel_max_diff_vs_plain"].items())]
    return "\n".join(lines + [f"Total wall time {result['wall_s']:.1f} s"])


def main(argv=None) -> dict:
    start, args = time.perf_counter(), parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else torch.get_num_threads()))
    load_before, device = os.getloadavg(), torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the paper's runs (App. D)
    model = build_model(args.config, args.groups, args.seed, device)
    methods, G = make_methods(args.chunk_size, args.kl_coef), args.groups
    optimizer = torch.optim.AdamW(model.lora, lr=LR, weight_decay=1e-4)
    n_params = sum(p.numel() for p in model.transformer.parameters())
    print(f"[iteration_cost] '{args.config}' on {device}: {n_params / 1e6:.1f} M parameters, 1 warm-up + {args.reps} rounds")
    rounds, nfe = [], {}  # rounds[r][method]: seconds of rollout, update, iteration
    for r in range(1 + args.reps):  # round 0 warms up (allocator, thread pools, first calls)
        rounds.append({})
        for i, m in enumerate(methods):  # alternate: A B C ... in every round
            rounds[r][m.name], nfe[m.name] = run_iteration(m, model, optimizer, G, args.seed * 100_003 + r * len(methods) + i, device)
        print(f"  {'warm-up' if r == 0 else f'rep {r}/{args.reps}'}: "
              + " ".join(f"{name} {s['iteration']:.3f}s" for name, s in rounds[r].items()), flush=True)
        if r == 0:  # after the warm-up LoRA's B is no longer 0: every weight has a gradient
            grad_check = check_gradients(model, G, args.chunk_size, device)
    times = {m.name: {k: [rd[m.name][k] for rd in rounds[1:]] for k in ("rollout", "update", "iteration")} for m in methods}
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    memory, act = measure_memory(model, G, args.chunk_size, device)
    result = {
        "benchmark": "iteration_cost", "command": "python benchmarks/iteration_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
                "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "config": {**vars(args), "preset": args.config, "model": PRESETS[args.config], "K": methods[0].spec.leaves_per_group,
                   "transformer_params": n_params},
        "paper_s": PAPER_S,
        "methods": {m.name: {"description": m.description, "chunk_size": m.chunk, "nfe": nfe[m.name], "nfe_formula": m.expected_nfe(G),
                             "times_s": times[m.name], "median_s": medians[m.name], "paper": m.paper,
                             "ratio_vs_flow_grpo": medians[m.name]["iteration"] / medians["flow_grpo"]["iteration"]}
                    for m in methods},
        "memory": memory, "activation_bytes_per_row": act, "grad_check": grad_check,
    }
    result["wall_s"] = time.perf_counter() - start
    print("\n" + report(result))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"iteration_cost_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
