"""train.py run end to end, as a user would, on tiny random FLUX and PickScore folders built offline.

Every run is a subprocess (`python train.py ...` or `accelerate launch ...`) on CPU at 32x32 pixels
(8x8 latent, 16 tokens); the tests assert on what the runs write: checkpoints (loaded back with
diffusers' FluxPipeline.load_lora_weights), metrics.jsonl, run_summary.json and the error messages.

    python -m pytest -x -q tests/test_train.py
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import common  # noqa: E402
import train  # noqa: E402
from inject import ADAM_SCALES_WEIGHTS, run_script  # noqa: E402
from tiny_flux import tiny_flux_dir  # noqa: E402, F401  (session fixture)
from tiny_rewards import build_tiny_pickscore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a cat", "a red cube on a blue cube", "a dog with a blue cube"]
LORA_FILE = "pytorch_lora_weights.safetensors"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_flux_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("train_assets")
    pickscore = build_tiny_pickscore(root / "pickscore")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"flux": tiny_flux_dir, "pickscore": pickscore, "prompts": str(prompts), "root": root}


def _flags(assets, out, *extra):
    return ["--model", assets["flux"], "--reward-path", f"pickscore={assets['pickscore']}",
            "--prompts", assets["prompts"], "--height", "32", "--width", "32", "--max-sequence-length", "16",
            "--lora-rank", "8", "--lora-alpha", "16", "--dtype", "fp32", "--report-to", "none", "--output-dir", str(out),
            *extra]


def _train(args, launcher=(sys.executable,), check=True, env=None, timeout=300):
    proc = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _lora(ckpt, which):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, which, LORA_FILE))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def full_run(assets):
    """The reference: 2 uninterrupted steps of the paper's tree (27 leaves), a checkpoint and an EMA
    update after every step."""
    out = assets["root"] / "full"
    proc = _train(_flags(assets, out, "--max-steps", "2", "--save-every", "1", "--ema-every", "1"))
    return out, proc


# ----------------------------------------------------------------------------------------------
# End to end on one process
# ----------------------------------------------------------------------------------------------


def test_two_steps_print_plan_write_metrics_and_change_lora(full_run):
    out, proc = full_run
    plan = proc.stdout
    for line in ("processes (world size): 1", "prompts per step: 1 per process x 1 = 1",
                 "leaves (images) per prompt: K = 27; images per step: 27",
                 "transformer forwards per rollout per process: 72 (early tree) .. 48 (late tree)",
                 "forwards with grad per update per process: 12"):
        assert line in plan, plan
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(v) for v in r.values())
        assert r["tree/leaves"] == 27 and r["reward/mean"] == r["reward/pickscore"]  # one reward: R = the raw score
        # Re-derive the rollout's node-steps from the logged branch positions: 3 roots, x3 after each SDE branch.
        branch = [r[f"tree/branch_{b}"] for b in range(3)]
        assert branch[0] == 0 and len(set(branch)) == 3 and max(branch) <= 4
        active = [3 * 3 ** sum(1 for b in branch[1:] if b < n) for n in range(6)]
        assert r["tree/nfe_rollout"] == sum(active)
        assert r["tree/nfe_update"] == 3 + 9  # one forward with grad per unique parent of the 2 SDE branch steps
        assert r["policy/clipfrac"] == 0.0 and r["policy/approx_kl"] == 0.0  # the first update is on-policy
        assert r["adv/abs_mean"] > 0 and r["train/grad_norm"] > 0
    assert rows[0]["train/beta"] == 0.8 and rows[1]["train/beta"] == pytest.approx(0.8 + 1.2 / 150)
    assert rows[0]["train/lr"] == 5e-5 and rows[1]["train/lr"] == pytest.approx(2.5e-5)  # cosine over 2 steps

    c1, c2 = _lora(out / "checkpoint-1", "lora"), _lora(out / "checkpoint-2", "lora")
    b_keys = [k for k in c1 if "lora_B" in k]
    assert b_keys and all(k.startswith("transformer.") for k in c1)
    # LoRA B starts at 0 (the model starts as the base model); the updates moved it, and again in step 2.
    assert all(c1[k].abs().max() > 0 for k in b_keys)
    assert any(not torch.equal(c1[k], c2[k]) for k in b_keys)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["final_step"] == 2
    assert summary["final_checkpoint"].endswith("checkpoint-2")


def test_checkpoints_are_complete_ema_is_exact_and_load_in_diffusers(full_run, assets):
    from diffusers import FluxPipeline

    out, _ = full_run
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl", "run_summary.json"]
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert sorted(os.listdir(ckpt)) == ["ema", "lora", "manifest.json", "rank0.pt", "trainer_state.pt"]
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert state["step"] == step and state["world_size"] == 1 and state["optimizer"]["state"]
    # EMA with decay 0.9, updated every step: B starts at 0, so ema_1 = 0.1 B_1, ema_2 = 0.9 ema_1 + 0.1 B_2.
    l1, l2 = _lora(out / "checkpoint-1", "lora"), _lora(out / "checkpoint-2", "lora")
    e1, e2 = _lora(out / "checkpoint-1", "ema"), _lora(out / "checkpoint-2", "ema")
    for k in (k for k in l1 if "lora_B" in k):
        torch.testing.assert_close(e1[k], 0.1 * l1[k], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(e2[k], 0.9 * e1[k] + 0.1 * l2[k], rtol=1e-6, atol=1e-12)
        assert not torch.equal(e2[k], l2[k])

    pipe = FluxPipeline.from_pretrained(assets["flux"])
    for which, ref in (("lora", l2), ("ema", e2)):
        pipe.load_lora_weights(str(out / "checkpoint-2" / which), adapter_name=which)
        loaded = {n: p for n, p in pipe.transformer.named_parameters() if f".{which}." in n}
        assert len(loaded) == len(ref)
        key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
        assert torch.equal(loaded[f"transformer_blocks.0.attn.to_q.lora_B.{which}.weight"], ref[key])
    # The LoRA config (alpha 16 / rank 8) travels with the weights: the scale is alpha / r = 2, not 1.
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["ema"] == 2.0


def test_stopped_and_resumed_run_equals_uninterrupted(full_run, assets):
    out_full, _ = full_run
    out = assets["root"] / "resumed"
    flags = _flags(assets, out, "--max-steps", "2", "--save-every", "1", "--ema-every", "1")
    first = _train(flags + ["--stop-after-steps", "1"])
    assert "stopping after step 1" in first.stdout
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl", "run_summary.json"]  # as a kill would leave it
    second = _train(flags + ["--resume", "latest"])
    assert "resumed from" in second.stdout and "checkpoint-1 at step 1" in second.stdout
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    for which in ("lora", "ema"):
        a, b = _lora(out_full / "checkpoint-2", which), _lora(out / "checkpoint-2", which)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # Optimizer moments and the lr schedule continue too (not only the weights).
    sa = torch.load(out_full / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    sb = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert sa["scheduler"] == sb["scheduler"]
    for i, st in sa["optimizer"]["state"].items():
        torch.testing.assert_close(sb["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=0, atol=1e-9)


def test_resume_refuses_other_settings_and_rewrites_the_lost_steps_log(full_run, assets):
    out_full, _ = full_run
    out = assets["root"] / "killed_after_logging"
    shutil.copytree(out_full, out)
    # as if killed after step 2 was logged but before checkpoint-2 was complete
    shutil.rmtree(out / "checkpoint-2")
    flags = _flags(assets, out, "--max-steps", "2", "--save-every", "1", "--ema-every", "1")
    other = _train(flags + ["--resume", "latest", "--lr", "1e-4"], check=False)
    assert other.returncode != 0 and "--lr: checkpoint 5e-05, now 0.0001" in other.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # nothing touched by the refused resume
    _train(flags + ["--resume", "latest", "--report-to", "none"])  # operational flags may differ
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # step 2 logged once, by the resumed run


def test_existing_output_dir_without_resume_is_refused(full_run, assets):
    out, _ = full_run
    proc = _train(_flags(assets, out, "--max-steps", "2"), check=False)
    assert proc.returncode != 0 and "already holds" in proc.stderr and "--resume latest" in proc.stderr


def test_nonfinite_numbers_stop_the_run_and_keep_the_last_checkpoint(assets):
    """LoRA weights scaled by 1e30 after step 1 (a fault injected into AdamW's step: no valid --lr does
    it) make step 2's transformer overflow. The run must stop there with the step and the prompt named,
    and checkpoint-1 must still load."""
    from diffusers import FluxPipeline

    out = assets["root"] / "nan"
    proc = run_script("train.py", _flags(assets, out, "--max-steps", "3", "--save-every", "1", "--branch-k", "2"),
                      patch=ADAM_SCALES_WEIGHTS.format(at=1, scale=1e30))
    assert proc.returncode != 0
    err = proc.stderr
    assert "train.py: error: non-finite" in err and "at step 2" in err and "Traceback" not in err, err[-3000:]
    assert any(p in err for p in PROMPTS) and "checkpoint-1) is intact" in err
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1"]  # no half-written .tmp
    assert all(torch.isfinite(t).all() for t in _lora(out / "checkpoint-1", "lora").values())
    FluxPipeline.from_pretrained(assets["flux"]).load_lora_weights(str(out / "checkpoint-1" / "ema"))


def test_flow_grpo_baseline_with_kl_to_the_lora_free_reference(assets):
    """--method grpo --sampler independent: K independent SDE trajectories through the same loop.
    The KL to the reference is exactly 0 while the LoRA is still zero (update 1) and positive after
    one optimizer step (update 2): the reference really runs with the adapters disabled."""
    out = assets["root"] / "grpo"
    proc = _train(_flags(assets, out, "--method", "grpo", "--sampler", "independent", "--branch-k", "2",
                         "--kl-coef", "0.1", "--updates-per-rollout", "2", "--gradient-checkpointing",
                         "--max-steps", "1"))
    assert "independent: 8 trajectories, SDE at steps [0, 1, 2, 3, 4]" in proc.stdout
    (row,) = _metrics(out)
    assert row["tree/leaves"] == 8 and row["tree/nfe_rollout"] == 8 * 6
    # update 1: 40 with grad + 40 reference; update 2: 40 ratio (no grad) + 40 with grad + 40 reference
    assert row["tree/nfe_update"] == 80 + 120
    assert row["policy/kl"] > 0 and row["policy/approx_kl"] > 0  # update 2 sees the moved policy
    assert os.path.isfile(out / "checkpoint-1" / "lora" / LORA_FILE)


def test_tilted_target_scores_every_leaf_under_the_lora_free_base(assets):
    """--target tilted, 2 steps, reduce sum: the rollout spends one extra no-grad forward per SDE parent
    (3 + 9 = 12 per prompt) on the reference, the base with its LoRA switched off. Before the first
    update the LoRA is zero, so log P_ref = log P of every leaf exactly (ref_log_ratio 0); after it
    the policy has moved away from the base."""
    out = assets["root"] / "tilted"
    proc = _train(_flags(assets, out, "--target", "tilted", "--tilt_weight", "0.5", "--logprob_reduce", "sum",
                         "--max-steps", "2", "--branch_early", "0", "3", "4", "--kappa", "inf"))
    assert "method tmpo (target tilted)" in proc.stdout
    assert "of which 12 reference forwards without grad" in proc.stdout, proc.stdout
    rows = _metrics(out)
    for r in rows:  # fixed tree [0, 3, 4]: 3 + 3 + 3 + 3 + 9 + 27 = 48 policy forwards, + 12 reference
        assert r["tree/nfe_rollout"] == 48 + 12 and r["tree/nfe_update"] == 12
    assert rows[0]["policy/ref_log_ratio"] == 0.0
    assert rows[1]["policy/ref_log_ratio"] != 0.0 and np.isfinite(rows[1]["policy/ref_log_ratio"])
    for flags, expect in ((["--target", "tilted", "--method", "grpo"], "--target tilted is TMPO's target"),
                          (["--dual_clip", "1.1"], "--dual_clip 1.1: must be 0"),
                          (["--target", "tilted", "--kl_coef", "0.1"], "weigh it with --tilt_weight, not --kl_coef")):
        bad = _train(_flags(assets, out / "bad", "--max-steps", "1", *flags), check=False)
        assert bad.returncode == 2 and expect in bad.stderr, bad.stderr[-2000:]


def test_validation_samples_the_ema_weights_from_fixed_noise_and_logs_to_tensorboard(assets):
    """--validation_every 1 on one held-out prompt: its rewards and LGMD equal FluxPipeline with the
    checkpoint's EMA LoRA (loaded by diffusers) from the documented noise, and differ from the current
    LoRA's; the grid is written to disk and, with the scalars, to tensorboard."""
    from diffusers import FluxPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = assets["root"] / "validation"
    flags = _flags(assets, out, "--max-steps", "1", "--ema-every", "1", "--lr", "0.5", "--branch-k", "2",
                   "--validation_every", "1", "--validation_split", "1", "--validation_images", "2",
                   "--validation_steps", "3")
    flags[flags.index("--report-to") + 1] = "tensorboard"
    _train(flags)
    (row,) = _metrics(out)
    held = PROMPTS[int(np.random.default_rng(0).permutation(3)[0])]  # --validation_split 1 with --seed 0
    pickscore = __import__("rewards").load_reward("pickscore", assets["pickscore"])
    seed = np.random.SeedSequence([0, 0, 0]), np.random.SeedSequence([0, 0, 1])  # (seed, validation prompt, image)
    noise = torch.stack([torch.randn(16, 16, generator=torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0])))
                         for s in seed])  # (2, S, C) packed
    got = {}
    for which in ("ema", "lora"):
        pipe = FluxPipeline.from_pretrained(assets["flux"])
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(out / "checkpoint-1" / which))
        call = dict(prompt=[held] * 2, num_inference_steps=3, guidance_scale=3.5, height=32, width=32, max_sequence_length=16)
        z = pipe(latents=noise.clone(), output_type="latent", **call).images  # (2, S, C)
        images = pipe(latents=noise.clone(), output_type="pt", **call).images  # (2, 3, H, W)
        got[which] = (float(pickscore(images, [held] * 2).mean()),
                      __import__("metrics").lgmd(pipe._unpack_latents(z, 32, 32, pipe.vae_scale_factor)))
    assert row["validation/reward_pickscore"] == pytest.approx(got["ema"][0], abs=0.05)
    assert row["validation/lgmd"] == pytest.approx(got["ema"][1], abs=1e-6)
    assert abs(row["validation/lgmd"] - got["lora"][1]) > 1e-4  # the EMA weights were sampled, not the current ones
    assert os.path.isfile(out / "validation" / "step-1.png")
    tb = EventAccumulator(str(out / "tmpo"))  # {output_dir}/{tracker_project}
    tb.Reload()
    assert "validation/grid" in tb.Tags()["images"] and "validation/lgmd" in tb.Tags()["scalars"]
    assert tb.Scalars("validation/lgmd")[0].value == pytest.approx(row["validation/lgmd"], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on CPU)
# ----------------------------------------------------------------------------------------------


def test_two_process_cpu_run_draws_different_noise_and_keeps_ranks_in_sync(assets):
    out = assets["root"] / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # ACCELERATE_USE_CPU + --multi_gpu starts 2 gloo processes (`--cpu --num_processes 2` starts only one)
    proc = _train(_flags(assets, out, "--branch-k", "2", "--max-steps", "2", "--save-every", "2", "--validation-every", "2",
                         "--validation-split", "1", "--validation-images", "2", "--validation-steps", "2"),
                  launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    assert "processes (world size): 2" in proc.stdout and "1 per process x 2 = 2" in proc.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    noise = summary["root_noise_checksum_per_rank"]
    assert len(noise) == 2 and noise[0] != noise[1]  # each rank drew its own initial noise
    prompts = summary["prompt_indices_per_rank"]
    assert len(prompts) == 2 and prompts[0] != prompts[1]  # and got its own prompt
    lora = summary["lora_checksum_per_rank"]
    assert lora[0] == lora[1]  # gradients were all-reduced: every rank holds the same LoRA
    assert sorted(os.listdir(out / "checkpoint-2")) == ["ema", "lora", "manifest.json", "rank0.pt", "rank1.pt", "trainer_state.pt"]
    r0 = torch.load(out / "checkpoint-2" / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "checkpoint-2" / "rank1.pt", weights_only=False)
    assert not torch.equal(r0["noise_generator"], r1["noise_generator"])
    assert r0["schedule_rng"] == r1["schedule_rng"]  # the tree shapes agree across ranks
    # one held-out prompt, padded to both ranks (FSDP needs the same forwards everywhere), counted once
    assert all(np.isfinite(_metrics(out)[-1][k]) for k in ("validation/reward_pickscore", "validation/lgmd"))
    assert os.path.isfile(out / "validation" / "step-2.png")


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, before anything heavy where possible
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bad_prompts", "unknown_reward", "missing_reward_weights", "missing_model"])
def test_bad_input_gives_a_clear_error(assets, case, tmp_path):
    flags = _flags(assets, tmp_path / "out", "--max-steps", "1")
    if case == "bad_prompts":
        bad = tmp_path / "p.jsonl"
        bad.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
        flags[flags.index("--prompts") + 1] = str(bad)
        expect = "line 2 is not valid JSON"
    elif case == "unknown_reward":
        flags += ["--reward", "pickscore", "nope"]
        expect = "unknown reward(s) ['nope']"
    elif case == "missing_reward_weights":
        flags[flags.index("--reward-path") + 1] = f"pickscore={tmp_path / 'no_such_pickscore'}"
        expect = "no_such_pickscore does not exist"
    else:
        flags[flags.index("--model") + 1] = str(tmp_path / "no_such_flux")
        expect = "no_such_flux does not exist"
    proc = _train(flags, check=False)
    assert proc.returncode != 0 and expect in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any(d.startswith("checkpoint") for d in os.listdir(tmp_path / "out"))


def test_prompt_files_in_every_format(tmp_path):
    objs = [{"prompt": "a cat", "tag": "single_object"}, {"prompt": "a dog", "tag": "colors"}]
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "s.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp_path / "o.json").write_text(json.dumps(objs))
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(o) for o in objs) + "\n\n")
    for name in ("p.txt", "s.json", "o.json", "o.jsonl"):
        assert [d["prompt"] for d in common.load_prompts(str(tmp_path / name))] == ["a cat", "a dog"], name
    assert common.load_prompts(str(tmp_path / "o.jsonl"))[1]["tag"] == "colors"  # metadata kept (GenEval)
    bad = {"e.txt": ("\n \n", "holds no prompts"), "x.json": ('{"prompt": "a"}', "must hold a JSON list"),
           "n.json": ('["a", {"text": "b"}]', "item 1"), "q.csv": ("a,b", "unknown extension"),
           "missing.txt": (None, "does not exist"), "b.txt": ("a cat\x00\x01", "NUL bytes")}
    for name, (text, expect) in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(common.InputError, match=expect):
            common.load_prompts(str(tmp_path / name))
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9".encode("latin-1"))
    with pytest.raises(common.InputError, match="is not UTF-8 text"):
        common.load_prompts(str(tmp_path / "latin1.txt"))


def test_prompts_are_split_across_ranks_and_cover_each_epoch():
    n, G, world, seed = 10, 2, 3, 7
    seen = []
    for step in range(5):  # 5 steps x 6 prompts = 30 = 3 epochs of 10
        per_rank = [common.prompt_indices(step, r, G, world, n, seed) for r in range(world)]
        assert all(len(p) == G for p in per_rank)
        seen += [i for p in per_rank for i in p]
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))  # every prompt once per epoch
    assert seen[:n] != seen[n:2 * n]  # reshuffled each epoch
    assert common.prompt_indices(3, 1, G, world, n, seed) == common.prompt_indices(3, 1, G, world, n, seed)


def test_defaults_are_the_papers_pickscore_protocol_and_every_flag_is_documented():
    args = train.parse_args(["--prompts", "p.txt"])
    assert (args.lora_rank, args.lora_alpha, args.num_steps, args.branch_k, args.eta, args.guidance) == (64, 128, 6, 3, 0.7, 3.5)
    assert (args.height, args.width, args.kappa, args.clip_eps, args.lr, args.max_grad_norm) == (512, 512, 6, 0.2, 5e-5, 0.3)
    assert (args.weight_decay, args.max_steps, args.ema_decay, args.ema_every) == (1e-4, 500, 0.9, 8)
    assert (args.beta_start, args.beta_end, args.beta_warmup_steps, args.kl_coef) == (0.8, 2.0, 150, 0.0)
    assert args.branch_early == [0, 2, 3] and args.branch_late == [0, 3, 4] and args.prompts_per_process == 1
    assert args.lr_scheduler == "cosine" and args.report_to == "tensorboard" and args.reward == ["pickscore"]
    early, late = train.make_spec(args, args.branch_early), train.make_spec(args, args.branch_late)
    assert (early.roots, early.fanout, early.leaves_per_group) == (3, {2: 3, 3: 3}, 27)
    assert (late.roots, late.fanout) == (3, {3: 3, 4: 3})
    indep = train.make_spec(train.parse_args(["--prompts", "p", "--sampler", "independent"]), [])
    assert (indep.roots, indep.fanout) == (27, {n: 1 for n in range(5)})
    assert all(f.metadata.get("help") for f in train.dataclasses.fields(train.Args))  # every flag documented
    assert {**train.RANGES, **common.FLUX_RANGES}.keys() == {f.name for f in train.dataclasses.fields(train.Args) if f.type in (int, float)}
    # --flag_name, --flag-name and the diffusers spellings; booleans as eval.py's (HfArgumentParser)
    for spelling in (["--max_steps", "7", "--lr", "1e-4", "--model", "m", "--output_dir", "o", "--resume", "latest"],
                     ["--max-steps", "7", "--lr", "1e-4", "--model", "m", "--output-dir", "o", "--resume", "latest"],
                     ["--max_train_steps", "7", "--learning_rate", "1e-4", "--pretrained_model_name_or_path", "m",
                      "--output_dir", "o", "--resume_from_checkpoint", "latest"]):
        a = train.parse_args(["--prompts", "p", *spelling])
        assert (a.max_steps, a.lr, a.model, a.output_dir, a.resume) == (7, 1e-4, "m", "o", "latest")
    flipped = train.parse_args(["--prompts", "p", "--no-reward-zscore", "--branch-early", "1", "2", "3", "--reward-path",
                                "hps=/x", "--reward", "pickscore", "hps", "--reward-path", "pickscore=/y",
                                "--gradient_checkpointing", "--ratio_norm", "false"])
    assert not flipped.reward_zscore and flipped.branch_early == [1, 2, 3] and flipped.reward_path == ["hps=/x", "pickscore=/y"]
    assert flipped.gradient_checkpointing and not flipped.ratio_norm
    for bad, expect in ((["--branch-late", "0", "3", "5"], "must lie in 0..4"), (["--clip-eps", "1.5"], "--clip_eps must be in"),
                        (["--reward-path", "hps=/x"], "not in --reward")):
        with pytest.raises(common.InputError, match=expect):
            train.parse_args(["--prompts", "p", *bad])
    for bad in (["--max-st", "3"], ["--lr", "abc"], ["--method", "ppo"]):  # no abbreviations; types and choices checked
        with pytest.raises(SystemExit):
            train.parse_args(["--prompts", "p", *bad])


def test_config_presets_are_read_and_the_command_line_overrides_them(tmp_path):
    presets = {name: train.parse_args(["--prompts", "p", "--config", os.path.join(ROOT, "configs", f"{name}.yaml")])
               for name in ("pickscore", "geneval", "ocr", "multi_reward")}
    p, g, o, j = (presets[k] for k in ("pickscore", "geneval", "ocr", "multi_reward"))
    assert (p.reward, p.lr, p.max_grad_norm, p.max_steps, p.beta_warmup_steps) == (["pickscore"], 5e-5, 0.3, 500, 150)
    assert (g.reward, g.lr, g.max_grad_norm, g.max_steps, g.beta_warmup_steps) == (["geneval"], 3e-5, 0.5, 1000, 150)
    assert (o.reward, o.lr, o.max_grad_norm, o.max_steps, o.beta_warmup_steps) == (["ocr"], 3e-5, 0.5, 250, 100)
    assert (j.reward, j.reward_weights, j.lr, j.max_grad_norm, j.max_steps) == (["hps", "imagereward", "pickscore"],
                                                                               [1.0, 1.0, 1.0], 3e-5, 0.5, 500)
    over = train.parse_args(["--config", os.path.join(ROOT, "configs", "ocr.yaml"), "--prompts", "p", "--lr", "1e-5",
                             "--max_train_steps", "9"])
    assert (over.lr, over.max_steps, over.reward, over.beta_warmup_steps) == (1e-5, 9, ["ocr"], 100)
    (tmp_path / "bad.yaml").write_text("lr: 3e-5\nlearning_rat: 1\n")
    with pytest.raises(common.InputError, match=r"unknown key\(s\) \['learning_rat'\]"):
        train.parse_args(["--prompts", "p", "--config", str(tmp_path / "bad.yaml")])
