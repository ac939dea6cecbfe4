"""Who keeps more modes at the same reward? The reward-diversity frontier of the 2-D toy.

One operating point cannot rank methods: a method that learns more slowly looks more diverse at any
fixed iteration. This script traces every method over a range of rewards instead, and compares
mode entropy at MATCHED reward. Same toy, base, sampler, budget and seeds as compare_modes.py
(imported from it); equation numbers as in EQUATIONS.md.

Each method is run across its strength knob, and every run records its curve along training
(mean reward, mode entropy of the 4 high-reward modes, TV to the tilted target p_base exp(4 R)),
from 500 ODE samples every `curve_every` iterations:
    grpo          one run; its knob is the iteration count (the points along training)
    tmpo          beta of the Boltzmann target softmax(beta R) (Eq. 5), beta in BETAS["tmpo"]
    tmpo_tilted   beta of the tilted target P_ref exp(beta R) (tmpo.softmax_tb_advantage, ref)
    grpo_kl       kl_coef of the KL to the base
The reference curve is the tilted family p_base exp(beta' R) itself, for beta' over a grid
(self-normalised reweighting of base samples, as metrics.tilted_mode_masses): for each reward,
the distribution closest to the base in KL among those with that mean reward, i.e. the best any
method can do at that reward while staying near the base. Here its mode entropy is ~1 at every
reward (the 4 high modes are equally good), so a method below 1 has dropped modes it did not need
to drop.

Matched reward: for each run, the mode entropy (and TV) where its curve first reaches R* = 0.7,
0.8, 0.9, linearly interpolated between the two curve points around the crossing; a run that
never reaches R* is counted as such, not filled in.

Outputs (with --out DIR): DIR/frontier.json (every curve, the reference, the matched-reward table)
and DIR/frontier.png (mode entropy vs mean reward, TV vs mean reward: a line per method through
its runs' end points, each run's training curve thin, the reference curve dashed).

    python toy/frontier.py --out assets/frontier      # 6 seeds x 13 runs: about 3 minutes on 2 cores (168 s measured)
    python toy/frontier.py --quick --out /tmp/front   # 2 seeds, short runs: under a minute
    python -m pytest -q tests/test_toy.py -k frontier
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_modes as cm  # noqa: E402  (adds the repository root to sys.path)
import metrics  # noqa: E402

# The strength knob of each method. beta of the tilted target is the tilt itself (its optimum is
# p_base exp(beta R): beta 4 -> E[R] ~ 0.80, 8 -> 0.91, 16 -> 0.95 on the reference curve); grpo_kl's
# optimum is the tilt 1 / (kl_coef std_group(R)) (compare_modes.Config.kl_coef), so smaller
# coefficients reach higher rewards.
BETAS = {"tmpo": (1.0, 2.0, 4.0, 8.0), "tmpo_tilted": (4.0, 8.0, 16.0, 32.0)}
KL_COEFS = (0.1, 0.2, 0.4, 0.8)
MATCHED_REWARDS = (0.7, 0.8, 0.9)
REFERENCE_BETAS = tuple(np.round(np.concatenate([np.linspace(0, 4, 9), np.geomspace(5, 64, 12)]), 3))
QUICK = dict(seeds=2, pretrain_steps=1000, iters=100, eval_samples=500, target_samples=8000, curve_samples=300)
QUICK_KNOBS = {"tmpo": (4.0,), "tmpo_tilted": (4.0, 16.0), "grpo_kl": (0.2, 0.8)}


def runs_of(quick: bool) -> list[tuple[str, str, float | None]]:
    """(method, knob name, knob value) of every run of one seed."""
    knobs = QUICK_KNOBS if quick else {**BETAS, "grpo_kl": KL_COEFS}
    runs = [("grpo", "iterations", None)]
    runs += [(m, "beta", b) for m in ("tmpo", "tmpo_tilted") for b in knobs[m]]
    runs += [("grpo_kl", "kl_coef", c) for c in knobs["grpo_kl"]]
    return runs


def reference_curve(cfg: cm.Config, target: dict, target_masses: torch.Tensor) -> dict:
    """The tilted family p_base exp(beta' R) on reweighted base samples: E[R], mode entropy, TV."""
    xb, rb = target["base_x"], target["base_rewards"]
    centers, high = cm.mode_centers(cfg), list(cfg.high_modes)
    out = {"beta": list(REFERENCE_BETAS), "reward": [], "mode_entropy": [], "tilted_tv": [], "ess": []}
    for b in REFERENCE_BETAS:
        masses = metrics.tilted_mode_masses(xb, rb, float(b), centers)  # (M,)
        out["reward"].append(float((metrics.tilt_weights(rb, float(b)) * rb.double()).sum()))
        out["mode_entropy"].append(metrics.mode_entropy(masses, high))
        out["tilted_tv"].append(metrics.total_variation(masses, target_masses))
        out["ess"].append(metrics.tilted_ess(rb, float(b)))
    return out


def seed_job(cfg: cm.Config, seed: int, quick: bool) -> dict:
    """Every run of one seed from its base (compare_modes.prepare_seed), and its reference curve."""
    torch.set_num_threads(cfg.threads)
    base, target, target_masses, _, _, curve_noise, _ = cm.prepare_seed(cfg, seed)
    runs = []
    for method, knob, value in runs_of(quick):
        run_cfg = cfg if value is None else replace(cfg, **{"beta" if knob == "beta" else "kl_coef": value})
        t0 = time.perf_counter()
        _, _, curves, diverged_at = cm.finetune(method, base, run_cfg, seed, curve_noise, target_masses)
        runs.append({"method": method, "knob": knob, "value": value, "seed": seed, "diverged_at": diverged_at,
                     "iter": curves["curve_iter"], "reward": curves["ode_reward"],
                     "mode_entropy": curves["ode_mode_entropy"], "tilted_tv": curves["ode_tilted_tv"]})
        end = f"R {curves['ode_reward'][-1]:.3f}, H {curves['ode_mode_entropy'][-1]:.3f}" if diverged_at is None \
            else f"DIVERGED at iteration {diverged_at}"
        print(f"[seed {seed}] {method:<12s} {knob} {value if value is not None else '-':<6} {end} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"seed": seed, "runs": runs, "reference": reference_curve(cfg, target, target_masses)}


def at_reward(run: dict, r_star: float, key: str) -> float | None:
    """`key` where the run's reward curve first reaches r_star (linear interpolation), else None."""
    r = np.asarray(run["reward"])
    hit = np.nonzero(r >= r_star)[0]
    if run["diverged_at"] is not None or hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(run[key][0])
    frac = (r_star - r[i - 1]) / (r[i] - r[i - 1])  # r[i-1] < r_star <= r[i]
    return float(run[key][i - 1] + frac * (run[key][i] - run[key][i - 1]))


def matched_table(results: list[dict]) -> list[dict]:
    """Per (method, knob value): mode entropy and TV at each matched reward over the seeds."""
    rows = []
    for method, knob, value in [(r["method"], r["knob"], r["value"]) for r in results[0]["runs"]]:
        runs = [r for res in results for r in res["runs"] if r["method"] == method and r["value"] == value]
        row = {"method": method, "knob": knob, "value": value, "seeds": len(runs),
               "diverged": sum(r["diverged_at"] is not None for r in runs), "matched": {}}
        for r_star in MATCHED_REWARDS:
            ent = [v for v in (at_reward(r, r_star, "mode_entropy") for r in runs) if v is not None]
            tv = [v for v in (at_reward(r, r_star, "tilted_tv") for r in runs) if v is not None]
            row["matched"][str(r_star)] = {
                "reached": len(ent),
                **({"entropy_mean": float(np.mean(ent)), "entropy_std": float(np.std(ent)),
                    "entropy_min": float(np.min(ent)), "entropy_max": float(np.max(ent)),
                    "tv_mean": float(np.mean(tv)), "tv_std": float(np.std(tv))} if ent else {}),
            }
        rows.append(row)
    ref = {"method": "reference p_base exp(beta' R)", "knob": "beta'", "value": None, "matched": {}}
    for r_star in MATCHED_REWARDS:
        ent = [float(np.interp(r_star, res["reference"]["reward"], res["reference"]["mode_entropy"])) for res in results]
        ref["matched"][str(r_star)] = {"reached": len(ent), "entropy_mean": float(np.mean(ent)),
                                       "entropy_std": float(np.std(ent)), "entropy_min": float(np.min(ent)),
                                       "entropy_max": float(np.max(ent))}
    return rows + [ref]


def format_table(rows: list[dict]) -> str:
    """Mode entropy at matched reward: mean ± std over the seeds that reached it (reached / seeds)."""
    head = f"{'method':<32s}" + "".join(f"{'H at R = ' + str(r):>26s}" for r in MATCHED_REWARDS)
    lines = [head, "-" * len(head)]
    for row in rows:
        name = row["method"] + ("" if row["value"] is None else f" ({row['knob']} {row['value']:g})")
        cells = []
        for r_star in MATCHED_REWARDS:
            m = row["matched"][str(r_star)]
            n = row.get("seeds", m["reached"])
            cells.append(f"{m['entropy_mean']:.3f} ± {m['entropy_std']:.3f} ({m['reached']}/{n})" if m["reached"]
                         else f"not reached (0/{n})")
        lines.append(f"{name:<32s}" + "".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def mean_curve(runs: list[dict], key: str) -> np.ndarray:
    """Mean over the seeds' runs of one (method, knob) at equal iterations (diverged runs left out)."""
    ok = [r for r in runs if r["diverged_at"] is None]
    return np.mean([r[key] for r in ok], axis=0) if ok else np.array([])


def plot(path: str, results: list[dict]):
    plt = cm.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = dict(zip(("grpo", "tmpo", "tmpo_tilted", "grpo_kl"), ("tab:red", "tab:orange", "tab:blue", "tab:green")))
    ref_r = np.mean([res["reference"]["reward"] for res in results], axis=0)
    for ax, key, label in ((axes[0], "mode_entropy", "mode entropy of the 4 high-reward modes (1 = even)"),
                           (axes[1], "tilted_tv", "TV to the tilted target p_base exp(4 R)")):
        ax.plot(ref_r, np.mean([res["reference"][key] for res in results], axis=0), "k--", lw=1.5,
                label="reference: p_base exp(β' R), β' = 0..64")
        for method, color in colors.items():
            values = sorted({r["value"] for r in results[0]["runs"] if r["method"] == method}, key=lambda v: v or 0)
            ends = []
            for value in values:
                runs = [r for res in results for r in res["runs"] if r["method"] == method and r["value"] == value]
                rew, val = mean_curve(runs, "reward"), mean_curve(runs, key)
                if rew.size == 0:
                    continue
                ax.plot(rew, val, color=color, lw=2.0 if method == "grpo" else 0.7, alpha=1.0 if method == "grpo" else 0.5,
                        label=f"{method} (along training)" if method == "grpo" else None)
                ends.append((rew[-1], val[-1], value))
            if method != "grpo" and ends:
                ends.sort()
                ax.plot([e[0] for e in ends], [e[1] for e in ends], "o-", color=color, lw=2.0, ms=5,
                        label=f"{method}: end points over {'beta' if method.startswith('tmpo') else 'kl_coef'} "
                              + ", ".join(f"{e[2]:g}" for e in ends))
        ax.set_xlabel("mean reward of 500 ODE samples")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"mean over {len(results)} seeds at equal iterations; thin: each knob value's training curve",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    cfg, a = cm.parse_args(argv, __doc__, replace(cm.Config(), seeds=6), QUICK, extra=())
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.seeds))
    runs = runs_of(a.quick)
    print(f"frontier: {len(runs)} runs x {len(seeds)} seeds, {cfg.iters} iterations each, curve every "
          f"{cfg.curve_every} iterations ({cfg.curve_samples} ODE samples); {a.workers} worker process(es)", flush=True)
    results = cm.run_seeds(cfg, seeds, _quick_job if a.quick else _full_job, a.workers)
    rows = matched_table(results)
    print("\nmode entropy at matched reward (mean ± std over the seeds that reached it):")
    print(format_table(rows))
    total = time.perf_counter() - t0
    print(f"\ntotal wall time {total:.1f} s")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        doc = {"config": {**asdict(cfg), "seed_list": seeds, "quick": a.quick}, "matched_rewards": list(MATCHED_REWARDS),
               "table": rows, "seeds": results, "total_wall_s": total}
        cm.write_json(os.path.join(a.out, "frontier.json"), doc)
        plot(os.path.join(a.out, "frontier.png"), results)
        print(f"wrote {a.out}/frontier.json, frontier.png")


def _full_job(cfg, seed):  # module level, so that spawned workers can unpickle it
    return seed_job(cfg, seed, quick=False)


def _quick_job(cfg, seed):
    return seed_job(cfg, seed, quick=True)


if __name__ == "__main__":
    main()
