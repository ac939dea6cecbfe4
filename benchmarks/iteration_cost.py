"""Iteration cost of TMPO's tree against per-leaf recompute, independent rollouts and Flow-GRPO.

Paper: Li et al. 2026, Sec. 4.2 and App. C (tree sampling); Table 1 (iteration time TMPO 68.3 s,
Flow-GRPO 108.9 s, TreeGRPO 79.1 s on 8 GPUs) and Table 2 (w/o tree structure 123.7 s). The claim:
prefix sharing and gradients only at the branch points cut the cost of an iteration. This script
measures that claim on a randomly initialised FLUX-architecture transformer, with the project's
own sampler and update (tree_sampler.rollout / tree_sampler.update), and shows that the code
reaches the floor the mathematics allows:

  rollout: transformer forwards = sum over denoising steps of the active nodes, one batched call
           per step. Paper tree (6 steps, 3 roots, k = 3 at steps 2 and 3, K = 27 leaves):
           3 + 3 + 3 + 9 + 27 + 27 = 72, against 6 * 27 = 162 for 27 independent trajectories.
  update:  one forward with grad per unique parent at an SDE step (Eq. 47 has terms only there):
           3 + 9 = 12, against 27 * 2 = 54 when every leaf's path is recomputed, and 27 * 5 = 135
           for Flow-GRPO (a forward with grad per leaf per SDE step). Same gradient (checked below).
  memory:  with chunk_size = c the update keeps at most c forwards' graphs alive, whatever K is,
           with the same gradient (tree_sampler.update; tests/test_tree_sampler.py).

Methods (one iteration = rollout + advantage + update + AdamW step on the LoRA weights):
  tmpo           tree rollout; plain update (chunk_size=None: one graph, one backward).
  tmpo_chunked   tree rollout; update(chunk_size=c, on_policy=True): same gradient, <= c graphs.
  tmpo_per_leaf  tree rollout; update on Rollout.unshared(): recompute each leaf's own path (what the
                 tree avoids; 54 forwards with grad instead of 12).
  no_tree        the paper's "w/o tree structure" (Table 2: "independent rollouts"): K independent
                 trajectories, CPS SDE at the tree's SDE steps (2, 3), Softmax-TB advantage.
  flow_grpo      Flow-GRPO: K independent trajectories, CPS SDE (eta 0.7) at steps 0..4, i.e. every
                 step with noise (CPS has none on the last step, t' = 0), GRPO advantage (Eq. 28).
                 Steps 0..4 also match Flow-GRPO's FLUX PickScore config, which trains
                 int(6 * timestep_fraction 0.99) = 5 of its 6 steps; the CPS kernel keeps the
                 transition identical to TMPO's, so only the sampling structure differs. KL to the
                 reference is off by default as in that config (train.beta = 0); --kl-coef > 0
                 turns it on and its reference forwards (LoRA disabled, no grad) are counted.
  The three baselines back-propagate c forwards at a time (chunk_size = --baseline-chunk-size,
  default = --chunk-size; on_policy): Flow-GRPO's own trainer also back-propagates one minibatch
  per timestep, and one graph of 135 forwards would not fit a GPU at FLUX size. Pass
  --baseline-chunk-size 0 for one graph.

What is timed: the transformer work of each method and everything the sampler and the update do
around it (Euler/SDE steps, log-probs, the loss, the optimizer step). Not timed: VAE decode and
reward models. They cost the same for every method at equal K (one decode and one reward call per
leaf), so they add the same number of seconds to every row; rewards here are fixed random
numbers. The paper's iteration times include them (plus 8-GPU communication), so its ratios are
diluted towards 1 compared with the pure transformer cost measured here.

Counting: forwards are counted twice and must agree: from rollout's `nfe` and update's
`nfe_grad` / `nfe_nograd`, and by a counter wrapped around the velocity function (rows seen with
and without grad, and the number of calls: one per denoising step in the rollout). Both are
checked against TreeSpec.rollout_nfe / update_nfe.

Memory of the update, for K = 9, 27, 81 (trees k = 3 at positions [0, 2], [0, 2, 3], [0, 1, 2, 3]
on 6 steps), plain vs chunked:
  - saved-for-backward bytes (every device): a torch.autograd.graph.saved_tensors_hooks pack hook
    wraps each tensor autograd saves; the bytes of its storage are added to a live total when it is
    first saved and removed when the last saved reference is freed (the graph releases it in
    backward), deduplicated by storage (a tensor saved by q, k and v counts once), and model
    parameters / buffers excluded (they exist regardless of the update). The reported number is the
    peak of that live total: the activation memory that grows with the number of forwards alive.
    It does not include transient workspaces or gradient buffers.
  - on CUDA also torch.cuda.max_memory_allocated() minus the allocation before the update (all of
    the update's memory: activations, temporaries, LoRA gradients).

Exact gradient: with --check-grad (default on) the script checks, after the warm-up round, on one
tree rollout, that the chunked (on-policy and off-policy), per-leaf and chunked per-leaf updates
give the plain update's gradient (max |g - g_plain| / max |g_plain| below 1e-4 in fp32, 5e-2 in
bf16). tests/test_tree_sampler.py checks the same off-policy, with clipping active, on an MLP.

Model presets (random weights, FLUX.1-dev layout: double- and single-stream blocks, guidance
embedding, RoPE over (text, row, column), T5 sequence + CLIP pooled conditioning, 16 latent
channels packed 2x2 -> 64; LoRA on the paper's targets via flux.add_lora, only LoRA trained):
  tiny   1 + 1 blocks, width 32, 4x4 tokens, fp32      (--quick; the test)
  small  2 + 4 blocks, width 128, 8x8 = 64 image tokens (FLUX at 128x128 px), 32 text tokens,
         LoRA rank 16, fp32                              (CPU default)
  large  1 + 2 blocks at FLUX.1-dev width (24 heads x 128 = 3072, T5 width 4096, CLIP 768),
         32x32 = 1024 image tokens (512x512 px) + 512 text tokens, LoRA rank 64 / alpha 128,
         bf16, 697 M parameters                          (CUDA default)
         Saved activations measured on CPU at 96 and 320 tokens grow linearly, 0.42 MB per token per
         forward: ~0.64 GB per forward at 1536 tokens (extrapolated), so the plain update at K = 81
         (39 forwards) needs ~25 GB and the plain per-leaf update of the gradient check (54 forwards)
         ~35 GB. To trade depth for memory, edit MODEL_CONFIGS["large"].
Depth scales every method's transformer cost by the same factor, so to first order the ratios
carry over to the 19 + 38 blocks of FLUX.1-dev; the large preset keeps width and token count,
which set the per-forward cost and memory.

    python benchmarks/iteration_cost.py                   # CPU, small preset (~1-2 min on 2 cores)
    python benchmarks/iteration_cost.py --quick           # tiny preset, 2 reps (seconds)
    python benchmarks/iteration_cost.py --device cuda     # large preset, bf16
    python benchmarks/iteration_cost.py --reps 11 --out /tmp/cost.json
    python -m pytest -q tests/test_benchmark.py
Writes benchmarks/results/iteration_cost_<device>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tmpo  # noqa: E402
import tree_sampler as ts  # noqa: E402

# Table 1 (PickScore-only protocol, FLUX.1-dev, 8 GPUs) and Table 2 of the paper, seconds per iteration.
PAPER_S = {"tmpo": 68.3, "flow_grpo": 108.9, "tree_grpo": 79.1, "no_tree": 123.7}

# Memory table: trees with k = 3 and L = 2, 3, 4 levels on 6 steps (position 0 = independent roots).
MEMORY_TREES = {9: (0, 2), 27: (0, 2, 3), 81: (0, 1, 2, 3)}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A randomly initialised FluxTransformer2DModel plus LoRA and the token grid it sees."""

    double_blocks: int  # FLUX "transformer_blocks" (19 in FLUX.1-dev)
    single_blocks: int  # FLUX "single_transformer_blocks" (38 in FLUX.1-dev)
    heads: int  # attention heads; width = heads * head_dim (3072 in FLUX.1-dev)
    head_dim: int
    axes_dims_rope: tuple  # RoPE split of head_dim over (text, row, column); sums to head_dim
    text_dim: int  # T5 width = joint_attention_dim (4096)
    pooled_dim: int  # CLIP pooled width = pooled_projection_dim (768)
    token_side: int  # image tokens per side: S = token_side^2 (32 at 512x512: 512 / 8 / 2)
    text_len: int  # T5 tokens (512 in FluxPipeline)
    lora_rank: int
    lora_alpha: float
    dtype: str  # transformer compute dtype; the sampler state stays fp32
    latent_channels: int = 16  # FLUX's VAE latent channels; packed 2x2 -> 64 per token


MODEL_CONFIGS = {
    "tiny": ModelConfig(1, 1, 2, 16, (4, 6, 6), 32, 32, 4, 8, 4, 8.0, "float32"),
    "small": ModelConfig(2, 4, 4, 32, (8, 12, 12), 64, 64, 8, 32, 16, 32.0, "float32"),
    "large": ModelConfig(1, 2, 24, 128, (16, 56, 56), 4096, 768, 32, 512, 64, 128.0, "bfloat16"),
}


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class Args:
    """Command-line options (python benchmarks/iteration_cost.py --help)."""

    device: str = _help("'cpu' or 'cuda' (a CUDA device index as 'cuda:1')", "cpu")
    config: Optional[str] = _help("model preset: tiny | small | large (default: small on CPU, large on CUDA)", None)
    quick: bool = _help("tiny preset and 2 repetitions: a smoke run in seconds (the test uses it)", False)
    reps: int = _help("timed repetitions; each runs every method once, in turn; the median is reported", 7)
    warmup: int = _help("untimed rounds of every method first (allocator, thread pools, first calls)", 1)
    groups: int = _help("G, prompts per iteration (the paper: one prompt per GPU)", 1)
    num_steps: int = _help("denoising steps of a training rollout (6 in the paper)", 6)
    eta: float = _help("CPS noise level eta of Eq. (9) (0.7 in the released configs)", 0.7)
    branch_steps: tuple = _help("TMPO tree positions (0 = independent roots); [0,2,3] = released [1,2,3]", (0, 2, 3))
    k: int = _help("children per branch point (K = k^L leaves per prompt)", 3)
    flow_grpo_sde_steps: tuple = _help("Flow-GRPO's SDE steps (CPS; every step with noise)", (0, 1, 2, 3, 4))
    chunk_size: int = _help("c: forwards with grad alive at once in tmpo_chunked (and the memory table)", 9)
    baseline_chunk_size: Optional[int] = _help("chunk size of per-leaf / no_tree / Flow-GRPO updates "
                                               "(default: --chunk-size; 0 = one graph)", None)
    kl_coef: float = _help("Flow-GRPO's KL-to-reference weight (its FLUX PickScore config: 0)", 0.0)
    beta: float = _help("reward temperature of the Softmax-TB advantage (Eq. 5)", 1.0)
    lr: float = _help("AdamW learning rate on the LoRA weights (paper: 5e-5 for PickScore)", 5e-5)
    max_grad_norm: float = _help("gradient-norm clip (paper: 0.3 for PickScore)", 0.3)
    check_grad: bool = _help("check chunked / per-leaf gradients == plain gradient after the warm-up", True)
    threads: Optional[int] = _help("torch CPU threads (default on CPU: 1; on a shared machine, multi-thread "
                                   "barriers turn other processes' load into 10x outliers)", None)
    seed: int = _help("seed of the weights, prompt embeddings, noises and rewards", 0)
    out: Optional[str] = _help("JSON output path (default: benchmarks/results/iteration_cost_<device>.json)", None)


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scalar = {"int": int, "Optional[int]": int, "float": float, "str": str, "Optional[str]": str}
    for f in dataclasses.fields(Args):  # one flag per field; annotations are strings (__future__)
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.type == "tuple":
            parser.add_argument(flag, type=int, nargs="+", default=list(f.default), help=text)
        elif f.name == "config":
            parser.add_argument(flag, choices=sorted(MODEL_CONFIGS), default=None, help=text)
        else:
            parser.add_argument(flag, type=scalar[f.type], default=f.default, help=text)
    ns = vars(parser.parse_args(argv))
    args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()})
    if args.quick:
        if args.config not in (None, "tiny"):
            parser.error("--quick uses the tiny preset; drop --config")
        args.config = "tiny"
        args.reps = min(args.reps, 2)
    if args.config is None:
        args.config = "small" if args.device == "cpu" else "large"
    if args.baseline_chunk_size is None:
        args.baseline_chunk_size = args.chunk_size
    if args.reps < 1 or args.warmup < 0 or args.groups < 1 or args.chunk_size < 1 or args.baseline_chunk_size < 0:
        parser.error("need --reps >= 1, --warmup >= 0, --groups >= 1, --chunk-size >= 1, --baseline-chunk-size >= 0")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be 'cpu' or 'cuda[:i]', got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    return args


# ----------------------------------------------------------------------------------------------
# The model: random FLUX transformer + LoRA as a velocity function
# ----------------------------------------------------------------------------------------------


@dataclass
class Model:
    transformer: torch.nn.Module
    lora_params: list
    velocity_fn: object  # velocity_fn(x, t, cond) -> v, the LoRA policy
    ref_velocity_fn: object  # the same transformer with LoRA disabled (Flow-GRPO's KL reference)
    cond: dict  # {"prompt_embeds": (G, L, D), "pooled_prompt_embeds": (G, Dp)}: one prompt per group
    event_shape: tuple  # (S, 64): one packed latent
    sigmas: torch.Tensor  # (N + 1,) FLUX's shifted grid at this token count


def build_model(cfg: ModelConfig, args: Args, device: torch.device) -> Model:
    """Randomly initialised FluxTransformer2DModel with the paper's LoRA targets (flux.add_lora)."""
    from diffusers import FluxTransformer2DModel

    import flux

    dtype = getattr(torch, cfg.dtype)
    if sum(cfg.axes_dims_rope) != cfg.head_dim:
        raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to head_dim {cfg.head_dim}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(args.seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * cfg.latent_channels,
            num_layers=cfg.double_blocks,
            num_single_layers=cfg.single_blocks,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text_dim,
            pooled_projection_dim=cfg.pooled_dim,
            guidance_embeds=True,  # FLUX.1-dev: distilled guidance enters as an embedding (one forward)
            axes_dims_rope=cfg.axes_dims_rope,
        )
    if dtype != torch.float32:
        transformer.to(dtype=dtype)  # the paper's bf16 base weights
    transformer.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        lora_params = flux.add_lora(transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha)  # fp32 LoRA, only trainable part
    S = cfg.token_side**2
    text_ids = torch.zeros(cfg.text_len, 3, device=device)  # text tokens carry no 2-D position
    img_ids = flux.token_grid_ids(cfg.token_side, cfg.token_side, device=device)  # (S, 3)
    velocity_fn = flux.make_velocity_fn(transformer, text_ids, img_ids, guidance=3.5, dtype=dtype)

    def ref_velocity_fn(x, t, cond):
        """The base model: LoRA switched off for this call (used under no_grad by update)."""
        transformer.disable_adapters()
        try:
            return velocity_fn(x, t, cond)
        finally:
            transformer.enable_adapters()

    g = torch.Generator().manual_seed(args.seed + 2)
    cond = {  # random "prompt embeddings" of the right shapes: one row per prompt (group)
        "prompt_embeds": torch.randn(args.groups, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype),
        "pooled_prompt_embeds": torch.randn(args.groups, cfg.pooled_dim, generator=g).to(device, dtype),
    }
    sigmas = ts.sigma_schedule(args.num_steps, image_seq_len=S)  # FLUX.1-dev's resolution shift
    return Model(transformer, lora_params, velocity_fn, ref_velocity_fn, cond, (S, 4 * cfg.latent_channels), sigmas)


# ----------------------------------------------------------------------------------------------
# Instruments: a forward counter and a saved-tensor meter
# ----------------------------------------------------------------------------------------------


class CountingVelocity:
    """Wraps velocity_fn; counts calls and rows (one row = one transformer forward of one node)."""

    def __init__(self, fn):
        self.fn = fn
        self.reset()

    def reset(self):
        self.calls = self.rows_grad = self.rows_nograd = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        if torch.is_grad_enabled():
            self.rows_grad += x.shape[0]
        else:
            self.rows_nograd += x.shape[0]
        return self.fn(x, t, cond)


class _Saved:
    """What the pack hook stores in the graph instead of the tensor; its death frees the bytes."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward (see the module docstring).

    Storage-deduplicated; the storages of `exclude` (model parameters and buffers) are not counted.
    Use as a context manager around the forward(s) and backward(s) to measure.
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [bytes, saved references]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.exclude:
            return tensor
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [storage.nbytes(), 1]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key):
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]


# ----------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    description: str
    spec: ts.TreeSpec
    advantage: str  # "softmax_tb" (Eq. 5) or "grpo" (Eq. 28)
    per_leaf: bool = False  # update on Rollout.unshared(): every leaf's path recomputed on its own
    chunk_size: Optional[int] = None  # None = plain update (one graph)
    on_policy: bool = False
    kl_coef: float = 0.0
    paper: Optional[str] = None  # the paper's number for this row, as printed

    def update_kwargs(self) -> dict:
        return dict(chunk_size=self.chunk_size, on_policy=self.on_policy, kl_coef=self.kl_coef)

    def expected_nfe(self, G: int) -> dict:
        """Forwards the floor allows, from TreeSpec's formulas (the counters must agree)."""
        grad = self.spec.update_nfe(G, per_leaf=self.per_leaf)
        off_policy_rho = grad if (self.chunk_size is not None and not self.on_policy) else 0
        ref = grad if self.kl_coef > 0 else 0
        return {"rollout": self.spec.rollout_nfe(G), "update_grad": grad, "update_nograd": off_policy_rho + ref}


def make_methods(args: Args) -> list[Method]:
    N, eta = args.num_steps, args.eta
    tree = ts.TreeSpec.tree(N, args.branch_steps, k=args.k, eta=eta, kind="cps")
    K = tree.leaves_per_group
    sde_steps = sorted(tree.fanout)  # the tree's SDE (branch) steps, without the root level
    c_base = args.baseline_chunk_size or None  # 0 -> None: one graph
    paper_ratio = lambda s: f"{s:.1f} s ({s / PAPER_S['flow_grpo']:.2f})"  # noqa: E731
    return [
        Method("tmpo", "tree rollout, plain update (one graph)", tree, "softmax_tb", paper=paper_ratio(PAPER_S["tmpo"])),
        Method("tmpo_chunked", "tree rollout, chunked on-policy update (same gradient)", tree, "softmax_tb",
               chunk_size=args.chunk_size, on_policy=True, paper=paper_ratio(PAPER_S["tmpo"])),
        Method("tmpo_per_leaf", "tree rollout, update recomputes every leaf's path", tree, "softmax_tb",
               per_leaf=True, chunk_size=c_base, on_policy=True),
        Method("no_tree", f"{K} independent trajectories, SDE at steps {sde_steps}, Softmax-TB",
               ts.TreeSpec.independent(N, K, sde_steps, eta=eta, kind="cps"), "softmax_tb",
               chunk_size=c_base, on_policy=True, paper=paper_ratio(PAPER_S["no_tree"])),
        Method("flow_grpo", f"{K} independent trajectories, SDE at steps {list(args.flow_grpo_sde_steps)}, GRPO"
               + (f", KL {args.kl_coef}" if args.kl_coef > 0 else ""),
               ts.TreeSpec.independent(N, K, args.flow_grpo_sde_steps, eta=eta, kind="cps"), "grpo",
               chunk_size=c_base, on_policy=True, kl_coef=args.kl_coef, paper=paper_ratio(PAPER_S["flow_grpo"])),
    ]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _advantages(method: Method, ro: ts.Rollout, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    if method.advantage == "softmax_tb":
        return tmpo.softmax_tb_advantage(ro.log_prob, rewards, beta)  # Eq. (5)
    return tmpo.grpo_advantage(rewards)  # Eq. (28)


def _check(name: str, what: str, values: dict):
    """All counts of one quantity must be equal; otherwise the benchmark's numbers mean nothing."""
    if len(set(values.values())) != 1:
        raise RuntimeError(f"{name}: {what} disagree: {values}")


def run_iteration(method: Method, model: Model, counter: CountingVelocity, ref_counter: CountingVelocity,
                  optimizer, args: Args, device: torch.device, seed: int) -> dict:
    """One training iteration (rollout + advantage + update + optimizer step), timed and counted."""
    G, spec = args.groups, method.spec
    K = spec.leaves_per_group
    gen = torch.Generator(device=device).manual_seed(seed)
    rewards = torch.randn(G, K, generator=torch.Generator().manual_seed(seed)).to(device)  # stands in for R(x)
    expected = method.expected_nfe(G)

    counter.reset()
    ref_counter.reset()
    _sync(device)
    t0 = time.perf_counter()
    ro = ts.rollout(counter, spec, model.sigmas, model.cond, G, model.event_shape, generator=gen, device=device)
    _sync(device)
    t1 = time.perf_counter()
    rollout_calls = counter.calls
    _check(method.name, "rollout forwards", {"rollout.nfe": ro.nfe, "counted": counter.rows_nograd,
                                              "formula": expected["rollout"]})
    if counter.rows_grad or rollout_calls != spec.num_steps:
        raise RuntimeError(f"{method.name}: the rollout made {rollout_calls} calls ({counter.rows_grad} rows with "
                           f"grad); expected one batched no-grad call per denoising step ({spec.num_steps})")

    counter.reset()
    optimizer.zero_grad(set_to_none=True)
    A = _advantages(method, ro, rewards, args.beta)
    out = ts.update(counter, ro.unshared() if method.per_leaf else ro, model.cond, A, ref_velocity_fn=ref_counter if method.kl_coef > 0 else None,
                    **method.update_kwargs())
    torch.nn.utils.clip_grad_norm_(model.lora_params, args.max_grad_norm)
    optimizer.step()
    _sync(device)
    t2 = time.perf_counter()
    _check(method.name, "update forwards with grad", {"update.nfe_grad": out["nfe_grad"], "counted": counter.rows_grad,
                                                      "formula": expected["update_grad"]})
    _check(method.name, "update forwards without grad",
           {"update.nfe_nograd": out["nfe_nograd"], "counted": counter.rows_nograd + ref_counter.rows_nograd,
            "formula": expected["update_nograd"]})
    return {
        "rollout_s": t1 - t0, "update_s": t2 - t1, "iteration_s": t2 - t0,
        "nfe": {"rollout": ro.nfe, "rollout_calls": rollout_calls, "update_grad": out["nfe_grad"],
                "update_nograd": out["nfe_nograd"], "update_calls": counter.calls + ref_counter.calls,
                "backward_calls": out["chunks"]},
        "loss": out["loss"],
    }


# ----------------------------------------------------------------------------------------------
# Exact-gradient check and update memory
# ----------------------------------------------------------------------------------------------


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])


def check_gradients(model: Model, args: Args, device: torch.device) -> dict:
    """Chunked / per-leaf updates give the plain update's gradient on one tree rollout."""
    spec = ts.TreeSpec.tree(args.num_steps, args.branch_steps, k=args.k, eta=args.eta)
    gen = torch.Generator(device=device).manual_seed(args.seed + 10_000)
    ro = ts.rollout(model.velocity_fn, spec, model.sigmas, model.cond, args.groups, model.event_shape,
                    generator=gen, device=device)
    rewards = torch.randn(args.groups, spec.leaves_per_group, generator=torch.Generator().manual_seed(args.seed)).to(device)
    A = tmpo.softmax_tb_advantage(ro.log_prob, rewards, args.beta)
    c = args.chunk_size
    variants = {
        "plain": {},
        "chunked_on_policy": dict(chunk_size=c, on_policy=True),
        "chunked_off_policy": dict(chunk_size=c),  # recomputes rho without grad first
        "per_leaf": dict(per_leaf=True),
        "per_leaf_chunked": dict(per_leaf=True, chunk_size=c, on_policy=True),
    }
    grads = {}
    for name, kw in variants.items():
        for p in model.lora_params:
            p.grad = None
        rollout = ro.unshared() if kw.pop("per_leaf", False) else ro
        ts.update(model.velocity_fn, rollout, model.cond, A, **kw)
        grads[name] = _flat_grad(model.lora_params)
    for p in model.lora_params:
        p.grad = None
    scale = float(grads["plain"].abs().max())
    if not scale > 0:
        raise RuntimeError("the plain update's gradient is zero: the gradient check would be vacuous")
    tol = 1e-4 if MODEL_CONFIGS[args.config].dtype == "float32" else 5e-2
    rel = {name: float((g - grads["plain"]).abs().max()) / scale for name, g in grads.items() if name != "plain"}
    result = {"max_abs_grad_plain": scale, "rel_max_diff_vs_plain": rel, "tol": tol,
              "passed": all(r <= tol for r in rel.values())}
    if not result["passed"]:
        raise RuntimeError(f"gradient check failed (tolerance {tol}): {rel}")
    return result


def measure_update_memory(model: Model, args: Args, device: torch.device) -> list[dict]:
    """Peak memory of one update (plain vs chunked) for K = 9, 27, 81 (see the module docstring)."""
    exclude = list(model.transformer.parameters()) + list(model.transformer.buffers())
    rows = []
    for K, steps in MEMORY_TREES.items():
        spec = ts.TreeSpec.tree(args.num_steps, steps, k=3, eta=args.eta)
        if spec.leaves_per_group != K:
            raise RuntimeError(f"tree {steps} has {spec.leaves_per_group} leaves, expected {K}")
        gen = torch.Generator(device=device).manual_seed(args.seed + K)
        ro = ts.rollout(model.velocity_fn, spec, model.sigmas, model.cond, args.groups, model.event_shape,
                        generator=gen, device=device)
        rewards = torch.randn(args.groups, K, generator=torch.Generator().manual_seed(K)).to(device)
        A = tmpo.softmax_tb_advantage(ro.log_prob, rewards, args.beta)
        active = spec.active_nodes()
        row = {"K": K, "branch_steps": list(steps)}
        for variant, kw in (("plain", {}), ("chunked", dict(chunk_size=args.chunk_size, on_policy=True))):
            for p in model.lora_params:
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with SavedTensorMeter(exclude) as meter:
                out = ts.update(model.velocity_fn, ro, model.cond, A, **kw)
            cuda_peak = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                cuda_peak = torch.cuda.max_memory_allocated(device) - base
            # forwards whose graphs are alive together: all of them (plain) or one chunk of parents
            alive = (spec.update_nfe(args.groups) if variant == "plain"
                     else max(min(args.chunk_size, args.groups * active[n]) for n in spec.fanout))
            row[variant] = {"grad_forwards": out["nfe_grad"], "grad_forwards_alive": alive,
                            "backward_calls": out["chunks"], "saved_peak_bytes": meter.peak,
                            "saved_live_after_bytes": meter.live, "cuda_peak_bytes": cuda_peak}
        rows.append(row)
        del ro
    for p in model.lora_params:
        p.grad = None
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(result: dict) -> str:
    env, cfg, methods = result["env"], result["config"], result["methods"]
    m = cfg["model"]
    lines = [
        f"Iteration cost on {env['device_name']} (torch threads: {env['threads']}), torch {env['torch']}: "
        f"random FLUX transformer '{cfg['preset']}' ({m['double_blocks']}+{m['single_blocks']} blocks, width "
        f"{m['heads'] * m['head_dim']}, {m['token_side']}x{m['token_side']} image + {m['text_len']} text tokens, "
        f"{m['dtype']}), LoRA rank {m['lora_rank']}; {cfg['num_steps']} steps, K = {cfg['K']} leaves, G = {cfg['groups']}; "
        f"median of {cfg['reps']} reps after {cfg['warmup']} warm-up, methods alternating.",
        "Transformer work only (no VAE decode, no reward model: identical for every method at equal K).",
        f"Load average (1 min) {env['loadavg_1_5_15_before'][0]:.2f} before, {env['loadavg_1_5_15_after'][0]:.2f} "
        f"after, on {env['cpu_count']} CPUs.",
        "",
    ]
    header = ["method", "rollout NFE", "update NFE grad", "+ no grad", "bwd calls", "rollout s", "update s",
              "s/iter", "vs Flow-GRPO", "min s/iter", "min vs F-GRPO", "paper s (vs Flow-GRPO)"]
    rows = []
    for name, r in methods.items():
        med = r["median_s"]
        rows.append([name, r["nfe"]["rollout"], r["nfe"]["update_grad"], r["nfe"]["update_nograd"],
                     r["nfe"]["backward_calls"], f"{med['rollout']:.3f}", f"{med['update']:.3f}",
                     f"{med['iteration']:.3f}", f"{r['ratio_vs_flow_grpo']['iteration']:.2f}",
                     f"{r['min_s']['iteration']:.3f}", f"{r['ratio_vs_flow_grpo_of_min']['iteration']:.2f}",
                     r["paper"] or "-"])
    lines.append(_fmt_table(header, rows))
    lines.append(f"Paper, not implemented here: TreeGRPO {PAPER_S['tree_grpo']:.1f} s "
                 f"({PAPER_S['tree_grpo'] / PAPER_S['flow_grpo']:.2f}). Paper times include decode, reward and 8-GPU sync.")
    for name, r in methods.items():
        chunk = r["update"]["chunk_size"]
        lines.append(f"  {name:14s} {r['description']}; update: " + ("one graph" if chunk is None else f"chunks of {chunk}"))
    mem = result["memory"]
    lines += ["", f"Update peak memory vs K (trees k=3 on {cfg['num_steps']} steps; chunk size {cfg['chunk_size']}): "
                  "saved-for-backward MB" + (" | CUDA peak MB" if env["device"].startswith("cuda") else "")]
    header = ["K", "branch steps", "plain fwd alive", "plain MB", "chunked fwd alive", "chunked MB", "chunked / plain"]
    rows = []
    for row in mem:
        p, c = row["plain"], row["chunked"]
        mb = lambda d: (f"{d['saved_peak_bytes'] / 2**20:.1f}"  # noqa: E731
                        + (f" | {d['cuda_peak_bytes'] / 2**20:.1f}" if d["cuda_peak_bytes"] is not None else ""))
        rows.append([row["K"], str(row["branch_steps"]), p["grad_forwards_alive"], mb(p), c["grad_forwards_alive"], mb(c),
                     f"{c['saved_peak_bytes'] / p['saved_peak_bytes']:.2f}"])
    lines.append(_fmt_table(header, rows))
    gc_ = result.get("grad_check")
    if gc_:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in gc_["rel_max_diff_vs_plain"].items())
        lines += ["", f"Exact gradient (max |g - g_plain| / max |g_plain|, tol {gc_['tol']:.0e}): {diffs}"]
    lines.append(f"Total wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the paper's runs (App. D: TF32-enabled kernels)
        torch.backends.cudnn.allow_tf32 = True
    cfg = MODEL_CONFIGS[args.config]
    model = build_model(cfg, args, device)
    methods = make_methods(args)
    G, K = args.groups, methods[0].spec.leaves_per_group
    optimizer = torch.optim.AdamW(model.lora_params, lr=args.lr, weight_decay=1e-4)
    counter, ref_counter = CountingVelocity(model.velocity_fn), CountingVelocity(model.ref_velocity_fn)

    n_params = sum(p.numel() for p in model.transformer.parameters())
    n_lora = sum(p.numel() for p in model.lora_params)
    print(f"[iteration_cost] preset '{args.config}' on {device}: {n_params / 1e6:.1f} M transformer parameters, "
          f"{n_lora / 1e6:.2f} M LoRA (trained); {args.warmup} warm-up + {args.reps} timed rounds of "
          f"{len(methods)} methods; G = {G} prompt(s), K = {K} leaves each", flush=True)
    for m in methods:
        e = m.expected_nfe(G)
        print(f"  {m.name:14s} forwards: rollout {e['rollout']}, update {e['update_grad']} with grad "
              f"+ {e['update_nograd']} without  ({m.description})", flush=True)

    times = {m.name: {"iteration": [], "rollout": [], "update": []} for m in methods}
    nfe, grad_check = {}, None
    for r in range(args.warmup + args.reps):
        round_s = {}
        for i, m in enumerate(methods):  # alternate: A B C ... in every round
            it = run_iteration(m, model, counter, ref_counter, optimizer, args, device,
                               seed=args.seed * 100_003 + r * len(methods) + i)
            nfe[m.name], round_s[m.name] = it["nfe"], it["iteration_s"]
            if not math.isfinite(it["loss"]):
                raise RuntimeError(f"{m.name}: non-finite loss {it['loss']} in round {r}")
            if r >= args.warmup:
                for key in ("iteration", "rollout", "update"):
                    times[m.name][key].append(it[f"{key}_s"])
        label = "warm-up" if r < args.warmup else f"rep {r - args.warmup + 1}/{args.reps}"
        print(f"  {label}: " + ", ".join(f"{name} {s:.3f}s" for name, s in round_s.items()), flush=True)
        if args.check_grad and grad_check is None and r >= args.warmup - 1:
            # on the parameters after the warm-up round (LoRA's B is no longer 0, so every LoRA
            # weight has a nonzero gradient)
            grad_check = check_gradients(model, args, device)

    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    minima = {name: {k: min(v) for k, v in t.items()} for name, t in times.items()}
    ref = medians["flow_grpo"]
    result_methods = {}
    for m in methods:
        ratio = {k: medians[m.name][k] / ref[k] for k in ("iteration", "rollout", "update")}
        ratio_min = {k: minima[m.name][k] / minima["flow_grpo"][k] for k in ("iteration", "rollout", "update")}
        if not all(math.isfinite(v) and v > 0 for v in ratio.values()):
            raise RuntimeError(f"{m.name}: ratio vs Flow-GRPO is not a positive finite number: {ratio}")
        result_methods[m.name] = {
            "description": m.description,
            "spec": {"num_steps": m.spec.num_steps, "roots": m.spec.roots, "fanout": m.spec.fanout,
                     "eta": m.spec.eta, "kind": m.spec.kind, "leaves_per_group": m.spec.leaves_per_group},
            "advantage": m.advantage,
            "update": m.update_kwargs(),
            "nfe": nfe[m.name],
            "nfe_formula": m.expected_nfe(G),
            "times_s": times[m.name],
            "median_s": medians[m.name],
            "ratio_vs_flow_grpo": ratio,  # of the medians
            "min_s": minima[m.name],
            "ratio_vs_flow_grpo_of_min": ratio_min,  # of the fastest reps: least disturbed by other load
            "paper": m.paper,
        }
    memory = measure_update_memory(model, args, device)

    result = {
        "benchmark": "iteration_cost",
        "command": "python benchmarks/iteration_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": {
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "diffusers": __import__("diffusers").__version__, "peft": __import__("peft").__version__,
            "cpu_count": os.cpu_count(), "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        },
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()},
                   "preset": args.config, "model": dataclasses.asdict(cfg), "K": K,
                   "transformer_params": n_params, "lora_params": n_lora},
        "paper_s": PAPER_S,
        "paper_ratio_vs_flow_grpo": {k: v / PAPER_S["flow_grpo"] for k, v in PAPER_S.items()},
        "methods": result_methods,
        "memory": memory,
        "memory_measure": "saved_peak_bytes: peak live bytes of tensors saved for backward (storage-deduplicated, "
                          "parameters excluded); cuda_peak_bytes: max_memory_allocated delta around the update",
        "grad_check": grad_check,
    }
    result["wall_s"] = time.perf_counter() - start
    print()
    print(report(result))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"iteration_cost_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
