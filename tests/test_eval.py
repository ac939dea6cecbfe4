"""eval.py end to end, on a tiny random FLUX, a tiny PickScore and a tiny DINOv2 built offline.

What is checked:
  * the real command line writes results.json, results.md and one grid per prompt, with a base row;
  * base and LoRA start every (prompt, image) from the same noise, re-derived here from the documented
    seed rule, while the LoRA really changed the images;
  * reference equivalence: eval.py's numbers for a prompt equal FluxPipeline.__call__ (base, and with
    the LoRA loaded by diffusers) scored directly by rewards.py / metrics.py;
  * a 2-process `accelerate launch` (CPU) covers every prompt, and gives the single-process numbers
    and noises although its ranks and batches differ;
  * bad input (unknown metric, empty prompt file, LoRA folders that do not fit the model, ...) fails
    with a clear message before anything is generated.

    python -m pytest -x -q tests/test_eval.py
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import eval as eval_script  # noqa: E402
import flux  # noqa: E402
import metrics  # noqa: E402
import rewards  # noqa: E402
from tiny_flux import HEAD_DIM, LATENT_CHANNELS, TEXT_WIDTH, tiny_flux_dir  # noqa: E402, F401
from tiny_rewards import build_tiny_hps, build_tiny_imagereward, build_tiny_pickscore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = W = 32  # tiny VAE downsamples by 4: 8x8 latent -> 4x4 = 16 packed tokens of 16 channels
S, C = 16, 16
STEPS, N, MAX_LEN, SEED = 4, 3, 16, 7
PROMPTS = ["a photo of a cat", "a red cube on a blue cube", "a dog with a blue cube"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _tiny_transformer(num_layers=1, num_heads=2):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=1,
        attention_head_dim=HEAD_DIM, num_attention_heads=num_heads, joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def _save_random_lora(transformer, folder, seed):
    """flux.add_lora, then a nonzero B (a fresh LoRA is exactly the base model), then flux.save_lora."""
    flux.add_lora(transformer, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    flux.save_lora(transformer, folder)
    return str(folder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_flux_dir):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    root = tmp_path_factory.mktemp("eval_assets")
    pickscore = build_tiny_pickscore(root / "pickscore")

    hps, imagereward = build_tiny_hps(root / "hps"), build_tiny_imagereward(root / "imagereward")
    dino = str(root / "dinov2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, patch_size=8, image_size=32))
        with torch.no_grad():  # transformers' init is tiny-std: widen it so that features differ between images
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    model.eval().save_pretrained(dino)
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dino)

    lora = _save_random_lora(flux.load_flux(tiny_flux_dir, dtype=torch.float32).transformer, root / "tmpo_lora", 0)
    # LoRAs trained on other FLUX variants: 3 heads (inner width 48, not 32) and 2 double blocks (not 1).
    wrong_shape = _save_random_lora(_tiny_transformer(num_heads=3), root / "wrong_shape", 1)
    extra_block = _save_random_lora(_tiny_transformer(num_layers=2), root / "extra_block", 2)

    prompts2, prompts3, empty = root / "prompts2.txt", root / "prompts3.txt", root / "empty.txt"
    prompts2.write_text("\n".join(PROMPTS[:2]) + "\n")
    prompts3.write_text("\n".join(PROMPTS) + "\n")
    empty.write_text("\n  \n")
    return {"flux": tiny_flux_dir, "pickscore": pickscore, "hps": hps, "imagereward": imagereward, "dino": dino,
            "lora": lora, "wrong_shape": wrong_shape, "extra_block": extra_block, "prompts2": str(prompts2),
            "prompts3": str(prompts3), "empty": str(empty), "root": root}


DEFAULT_METRICS = "pickscore,hps,imagereward,lgmd,cosdiv"  # eval.py's default: the paper's Table 1 (PickScore protocol)


def _cli(assets, out, prompts, metrics_=None, loras=("tmpo",), extra=()):
    """eval.py's command line at tiny sizes; metrics_=None leaves --metrics at its default."""
    args = ["--model", assets["flux"], "--prompts", assets[prompts], "--out", str(out),
            "--height", str(H), "--width", str(W), "--steps", str(STEPS), "--images-per-prompt", str(N),
            "--max-sequence-length", str(MAX_LEN), "--seed", str(SEED)]
    if metrics_ is not None:
        args += ["--metrics", *metrics_.split(",")]
    for metric in ("pickscore", "hps", "imagereward", "cosdiv"):
        if metric in (metrics_ or DEFAULT_METRICS).split(","):
            args += ["--metric-path", f"{metric}={assets['dino' if metric == 'cosdiv' else metric]}"]
    for name in loras:
        args += ["--lora", f"{name}={assets['lora']}" if name == "tmpo" else assets[name]]
    return args + list(extra)


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def main_run(assets):
    """`python eval.py ...` as a user runs it: base + one LoRA, 2 prompts x 3 images, the default metrics."""
    out = assets["root"] / "out_main"
    proc = _run([sys.executable, "eval.py"] + _cli(assets, out, "prompts2"))
    with open(out / "results.json") as fh:
        return out, json.load(fh), proc


def _expected_noise(prompt_index, image_index):
    """The documented rule, re-derived: randn (S, C) float32 on the CPU, seeded by SeedSequence."""
    seed = np.random.SeedSequence([SEED, prompt_index, image_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.randn(S, C, generator=torch.Generator().manual_seed(int(seed)))


def _sha(x):
    return hashlib.sha256(x.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_outputs_exist_with_a_base_row(main_run):
    from PIL import Image

    out, results, proc = main_run
    assert list(results["models"]) == ["base", "tmpo"]
    assert results["models"]["base"]["lora"] is None and results["models"]["tmpo"]["lora"].endswith("tmpo_lora")
    cfg = results["config"]
    assert (cfg["steps"], cfg["images_per_prompt"], cfg["num_prompts"], cfg["num_processes"]) == (STEPS, N, 2, 1)
    assert cfg["metrics"] == ["hps", "imagereward", "pickscore", "lgmd", "cosdiv"]  # Table 1's column order
    assert len(cfg["sigmas"]) == STEPS + 1 and cfg["sigmas"][0] == 1 and cfg["sigmas"][-1] == 0

    table = (out / "results.md").read_text()
    assert "| Model | HPS-v2.1 | ImgRwd | PickScore | LGMD | Cos. Div. |" in table
    assert "\n| base | " in table and "\n| tmpo | " in table and "Paired difference to base" in table
    assert "eval: 2 model(s)" in proc.stdout

    for p in range(2):  # one grid per prompt: rows = the 2 models, columns = the 3 images (+ labels)
        grid = Image.open(out / "grids" / f"prompt_{p:03d}.png")
        assert grid.width > N * W and grid.height > 2 * H
    assert sorted(os.listdir(out / "grids")) == ["prompt_000.png", "prompt_001.png"]

    for name, model in results["models"].items():
        rows = model["per_prompt"]
        assert [r["prompt"] for r in rows] == PROMPTS[:2] and [r["index"] for r in rows] == [0, 1]
        all_scores = [s for r in rows for s in r["images"]["pickscore"]]
        assert len(all_scores) == 2 * N and all(math.isfinite(s) for s in all_scores)
        agg = model["aggregate"]
        # Rewards: mean / std over all images; LGMD / Cos. Div.: over the per-prompt values.
        assert agg["pickscore"]["mean"] == pytest.approx(np.mean(all_scores), abs=1e-9)
        assert agg["pickscore"]["std"] == pytest.approx(np.std(all_scores), abs=1e-9) and agg["pickscore"]["n"] == 2 * N
        for r in rows:
            for m in ("pickscore", "hps", "imagereward"):
                assert len(r["images"][m]) == N and r[m] == pytest.approx(np.mean(r["images"][m]), abs=1e-9)
        for m in ("lgmd", "cosdiv"):
            assert agg[m]["mean"] == pytest.approx(np.mean([r[m] for r in rows]), abs=1e-9) and agg[m]["n"] == 2
        assert all(0 < r["cosdiv"] < 2 for r in rows)
    delta = results["models"]["tmpo"]["vs_base"]["lgmd"]["mean"]
    base_rows, lora_rows = results["models"]["base"]["per_prompt"], results["models"]["tmpo"]["per_prompt"]
    assert delta == pytest.approx(np.mean([a["lgmd"] - b["lgmd"] for a, b in zip(lora_rows, base_rows)]), abs=1e-9)


def test_models_share_the_initial_noise_but_not_the_images(main_run):
    _, results, _ = main_run
    sums = results["noise_checksums"]
    expected = [[_sha(_expected_noise(p, j)) for j in range(N)] for p in range(2)]
    assert sums["base"] == expected and sums["tmpo"] == expected  # same noise for every (prompt, image)
    assert len({s for row in expected for s in row}) == 2 * N  # ...and a different one for each
    base, lora = (results["models"][m]["per_prompt"] for m in ("base", "tmpo"))
    for b, l in zip(base, lora):  # the LoRA changed every image and each prompt's image set
        assert all(abs(x - y) > 1e-3 for x, y in zip(b["images"]["pickscore"], l["images"]["pickscore"]))
        assert abs(b["lgmd"] - l["lgmd"]) > 1e-4 and abs(b["cosdiv"] - l["cosdiv"]) > 1e-6


def test_numbers_equal_flux_pipeline_scored_directly(main_run, assets):
    """Reference equivalence: prompt 1's row of each model = FluxPipeline.__call__ from the same noise
    (LoRA loaded by diffusers itself, in a fresh pipeline), scored by rewards.py / metrics.py."""
    _, results, _ = main_run
    latents = torch.stack([_expected_noise(1, j) for j in range(N)])  # (N, S, C) packed
    pickscore = rewards.load_reward("pickscore", assets["pickscore"])
    dino = metrics.load_dinov2(assets["dino"])
    for name in ("base", "tmpo"):
        pipe = flux.load_flux(assets["flux"], dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if name == "tmpo":
            pipe.load_lora_weights(assets["lora"])
        common = dict(prompt=[PROMPTS[1]] * N, num_inference_steps=STEPS, guidance_scale=3.5, height=H, width=W,
                      max_sequence_length=MAX_LEN)
        z = pipe(latents=latents.clone(), output_type="latent", **common).images  # (N, S, C)
        images = pipe(latents=latents.clone(), output_type="pt", **common).images  # (N, 3, H, W) in [0, 1]
        row = results["models"][name]["per_prompt"][1]
        # Rewards see uint8 images (PIL): a pixel on a rounding edge could move a score by ~0.01.
        ref = pickscore(images, [PROMPTS[1]] * N)
        np.testing.assert_allclose(row["images"]["pickscore"], ref.tolist(), rtol=0, atol=0.05)
        z_unpacked = pipe._unpack_latents(z, H, W, pipe.vae_scale_factor)  # (N, C, h, w)
        assert row["lgmd"] == pytest.approx(metrics.lgmd(z_unpacked), abs=1e-6)
        assert row["cosdiv"] == pytest.approx(metrics.cosine_diversity(dino(images)), abs=1e-6)


def test_flux_pipeline_sampling_equals_the_tree_sampler_without_branch_points(assets):
    """eval.py samples through FluxPipeline.__call__ (common.ode_sample); from the same noise that is
    tree_sampler.rollout with no SDE step (Euler on flux.flux_sigmas through flux.make_velocity_fn), the
    sampler train.py learns with. fp32: bit-identical here; the tolerance only allows for FluxPipeline's
    sigma * 1000 / 1000 round trip of the timestep on other hardware."""
    import common
    import tree_sampler

    pipe = flux.load_flux(assets["flux"], dtype=torch.float32)
    cond, text_ids = flux.encode_prompts(pipe, PROMPTS[:2], MAX_LEN)
    x1 = torch.cat([_expected_noise(p, j).unsqueeze(0) for p in range(2) for j in range(N)])  # (2N, S, C) group-major
    rows = {k: v.repeat_interleave(N, dim=0) for k, v in cond.items()}  # one row per image
    pipeline = common.ode_sample(pipe, rows, x1.clone(), STEPS, 3.5, H, W, max_batch=4)  # (2N, S, C), 2 calls
    velocity_fn = flux.make_velocity_fn(pipe.transformer, text_ids, flux.image_ids(pipe, H, W), guidance=3.5)
    ro = tree_sampler.rollout(velocity_fn, tree_sampler.TreeSpec(STEPS, roots=N, fanout={}), flux.flux_sigmas(pipe, STEPS, H, W),
                              cond, num_groups=2, event_shape=(S, C), x_root=x1.clone())
    assert ro.transitions == [] and ro.nfe == 2 * N * STEPS
    torch.testing.assert_close(pipeline, ro.x0, rtol=0, atol=1e-5)
    assert (pipeline - x1).abs().max() > 0.1  # the samples moved: the comparison is not of two copies of the noise


def test_two_processes_cover_all_prompts_with_the_same_noise(main_run, assets):
    """3 prompts on 2 CPU processes (rank 0: prompts 0-1 in one batch, rank 1: prompt 2) give the
    single-process run's noises and numbers for prompts 0-1, and results for every prompt."""
    _, single, _ = main_run
    out = assets["root"] / "out_2proc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "eval.py"]
    proc = subprocess.run(cmd + _cli(assets, out, "prompts3", "pickscore,lgmd", extra=["--prompts-per-batch", "2"]),
                          cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("| Model |") == 2  # one main process wrote the tables (main table + deltas)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num_processes"] == 2
    for name in ("base", "tmpo"):
        rows = results["models"][name]["per_prompt"]
        assert [r["prompt"] for r in rows] == PROMPTS
        assert results["noise_checksums"][name][:2] == single["noise_checksums"][name]
        assert results["noise_checksums"][name][2] == [_sha(_expected_noise(2, j)) for j in range(N)]
        for r, s in zip(rows[:2], single["models"][name]["per_prompt"]):
            # Batches of 6 vs 3 images change the last bits of the latents (LGMD agrees to ~1e-8); PickScore
            # rounds images to uint8 (PIL) first, so a pixel on a rounding edge can move a score by ~0.01.
            assert r["lgmd"] == pytest.approx(s["lgmd"], abs=1e-6)
            np.testing.assert_allclose(r["images"]["pickscore"], s["images"]["pickscore"], rtol=0, atol=0.05)
    assert sorted(os.listdir(out / "grids")) == ["prompt_000.png", "prompt_001.png", "prompt_002.png"]


def test_geneval_from_jsonl_metadata_through_a_server(assets, tmp_path):
    """GenEval's evaluation_metadata.jsonl -> each image's metadata -> the server, asking for the
    fraction of criteria met (only_strict False), as App. D.1 says evaluation reports."""
    import pickle
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    requests_seen = []

    class FakeGenEval(BaseHTTPRequestHandler):
        def do_POST(self):
            body = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests_seen.append(body)
            # A made-up verdict that depends on the metadata only: 1 / (number of included objects).
            scores = [1.0 / len(m["include"]) for m in body["meta_datas"]]
            reply = pickle.dumps({"scores": scores, "rewards": scores, "strict_rewards": [float(x == 1) for x in scores]})
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), FakeGenEval)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "two_object", "include": [{"class": "cube", "count": 1}, {"class": "dog", "count": 1}],
             "prompt": "a dog with a blue cube"}]
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "out"
    args = eval_script.parse_args(_cli({**assets, "geneval": str(prompts)}, out, "geneval", "geneval,lgmd", loras=())
                                  + ["--geneval-url", f"http://127.0.0.1:{server.server_port}"])
    try:
        results = eval_script.evaluate(args)
    finally:
        server.shutdown()
    assert requests_seen and all(not r["only_strict"] for r in requests_seen)
    sent = [m["tag"] for r in requests_seen for m in r["meta_datas"]]
    assert sent == ["single_object"] * N + ["two_object"] * N  # one metadata dict per image, in order
    rows = results["models"]["base"]["per_prompt"]
    assert [r["geneval"] for r in rows] == [1.0, 0.5] and results["models"]["base"]["aggregate"]["geneval"]["mean"] == 0.75
    assert "| Model | GenEval | LGMD |" in (out / "results.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, before any generation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_generation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generation started although the input was bad")

    monkeypatch.setattr(eval_script.common, "ode_sample", fail)


@pytest.mark.parametrize("case,match", [
    (dict(metrics_="pickscore,fid"), r"unknown metric\(s\) \['fid'\]; known metrics: geneval, ocr, hps, imagereward, "
                                     r"pickscore, lgmd, cosdiv"),
    (dict(prompts="empty"), r"empty.txt: the file holds no prompts"),
    (dict(loras=("tmpo", "wrong_shape")),  # the good LoRA first: all folders are checked before generating
     r"LoRA 'wrong_shape' \(.*wrong_shape\) does not fit the model \(15 layer\(s\)\): .*attn.to_.: "
     r"A \(4, 48\), B \(48, 4\), but the layer is Linear\(32 -> 32\)"),
    (dict(loras=("extra_block",)), r"LoRA 'extra_block' \(.*\) does not fit the model: 12 of its 27 layers do not exist "
                                   r"in the transformer, e.g. \['transformer_blocks.1"),
    (dict(metrics_="lgmd", extra=["--images-per-prompt", "1"]), r"--images_per_prompt must be >= 2"),
    (dict(metrics_="lgmd", extra=["--max-prompts", "0"]), r"--max_prompts must be in \[1, inf\), got 0"),
    (dict(metrics_="lgmd", extra=["--guidance", "nan"]), r"--guidance must be in \[0, inf\), got nan"),
    (dict(metrics_="geneval,lgmd"), r"geneval needs each prompt's GenEval metadata"),
    (dict(metrics_="ocr"), r"target text in double quotes"),
    (dict(metrics_="lgmd", extra=["--metric-path", "pickscore=/x"]), r"--metric_path given for \['pickscore'\], which"),
    (dict(metrics_="ocr,lgmd", extra=["--metric-path", "ocr=/x"]), r"ocr \(models inside rapidocr-onnxruntime\) take no"),
])
def test_bad_input_fails_before_generation(assets, tmp_path, no_generation, case, match):
    out = tmp_path / "out"
    case = dict(case)
    prompts = case.pop("prompts", "prompts2")
    loras = case.pop("loras", ())
    args = eval_script.parse_args(_cli(assets, out, prompts, loras=loras, **case))
    with pytest.raises(eval_script.EvalInputError, match=match):
        eval_script.evaluate(args)
    assert not os.path.exists(out / "grids") and not os.path.exists(out / "results.json")


def test_lora_folder_errors_and_names(assets, tmp_path):
    with pytest.raises(eval_script.EvalInputError, match="LoRA folder .*no_such does not exist"):
        eval_script.parse_loras([str(tmp_path / "no_such")])
    checkpoint = tmp_path / "checkpoint-500"
    (checkpoint / "ema").mkdir(parents=True)
    with pytest.raises(eval_script.EvalInputError, match=r"no .safetensors file; it has subfolders \['ema'\]"):
        eval_script.parse_loras([str(checkpoint)])
    os.symlink(assets["lora"], checkpoint / "lora")  # train.py's layout: checkpoint-STEP/{lora,ema}
    assert eval_script.parse_loras([str(checkpoint / "lora"), f"mine={assets['lora']}"]) == {
        "checkpoint-500/lora": str(checkpoint / "lora"), "mine": assets["lora"]}
    with pytest.raises(eval_script.EvalInputError, match="reserved for the base model"):
        eval_script.parse_loras([f"base={assets['lora']}"])


def test_load_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("  a cat \n\n a dog\n")
    assert eval_script.load_prompts(str(tmp_path / "p.txt")) == (["a cat", "a dog"], None)
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "tag": "x"}]))
    assert eval_script.load_prompts(str(tmp_path / "p.json"), max_prompts=5) == (
        ["a cat", "a dog"], [{"prompt": "a cat"}, {"prompt": "a dog", "tag": "x"}])
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "include": []}\n\n"a dog"\n')
    assert eval_script.load_prompts(str(tmp_path / "p.jsonl"), max_prompts=1) == (
        ["a cat"], [{"prompt": "a cat", "include": []}])
    for name, content, match in [("p.csv", "a cat", "unknown extension '.csv'"),
                                 ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "line 2 is not valid JSON"),
                                 ("noprompt.jsonl", '{"text": "a"}\n', "line 1: expected a non-empty string"),
                                 ("dict.json", '{"prompt": "a"}', "must hold a JSON list"),
                                 ("empty.json", "[]", "holds no prompts")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(eval_script.EvalInputError, match=match):
            eval_script.load_prompts(str(tmp_path / name))


def test_cli_error_is_one_clear_line(assets, tmp_path):
    cmd = [sys.executable, "eval.py"] + _cli(assets, tmp_path / "out", "prompts2", metrics_="pickscore,nope")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "eval.py: error: unknown metric(s) ['nope']; known metrics:" in proc.stderr
    assert "Traceback" not in proc.stderr and "eval:" not in proc.stdout
