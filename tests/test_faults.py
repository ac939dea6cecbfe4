"""Faults that must not lose, corrupt or mix runs (issue 9): one test per row of its table.

Each test runs train.py (or eval.py) as a user would, on the tiny random models, and asserts the
exit status, the message, and that nothing written before the fault was lost or changed. Faults no
flag can cause (infinite weights after an optimizer step) are injected with tests/inject.py.
Row 13 (the rank-0 SIGABRT at exit of a 2-process run) has one run here; the 30-run loop that
measured it is outside CI:

    python tests/test_faults.py --loop 30        # 30 two-process runs, prints the failures
    python -m pytest -q tests/test_faults.py
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__":  # run as a script (the row-13 loop): the modules are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import eval as eval_script  # noqa: E402
import train  # noqa: E402
from inject import ADAM_SCALES_WEIGHTS, ROOT, run_script  # noqa: E402
from tiny_flux import build_tiny_flux, tiny_flux_dir  # noqa: E402, F401  (session fixture)
from tiny_rewards import build_tiny_pickscore  # noqa: E402

PROMPTS = ["a photo of a cat", "a red cube on a blue cube", "a dog with a blue cube"]
LORA_FILE = "pytorch_lora_weights.safetensors"
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_flux_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("fault_assets")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    geneval = root / "geneval.jsonl"
    geneval.write_text(json.dumps({"prompt": "a photo of a cat", "tag": "single_object",
                                   "include": [{"class": "cat", "count": 1}]}) + "\n")
    return {"flux": tiny_flux_dir, "pickscore": build_tiny_pickscore(root / "pickscore"), "prompts": str(prompts),
            "geneval": str(geneval), "root": root}


def flags(assets, out, *extra, reward="pickscore"):
    """train.py's flags at tiny sizes (K = 2^3 = 8 leaves, one step in about a second)."""
    reward_flags = ["--reward_path", f"pickscore={assets['pickscore']}"] if reward == "pickscore" else []
    return ["--model", assets["flux"], "--prompts", assets["geneval" if reward == "geneval" else "prompts"],
            "--reward", reward, *reward_flags, "--height", "32", "--width", "32", "--max_sequence_length", "16",
            "--lora_rank", "4", "--lora_alpha", "8", "--dtype", "fp32", "--branch_k", "2", "--report_to", "none",
            "--output_dir", str(out), *map(str, extra)]


def train_py(args, **kw):
    return run_script("train.py", args, **kw)


def snapshot(folder) -> dict:
    """{relative path: SHA-256} of every file under folder: 'nothing earlier was lost or changed'."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def steps(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh]


def _reference_run(assets, name, *extra):
    out = assets["root"] / name
    proc = train_py(flags(assets, out, "--save_every", 1, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def finished(assets):
    """A finished 2-step run (a checkpoint and an EMA update after every step)."""
    return _reference_run(assets, "finished", "--max_steps", 2, "--ema_every", 1)


@pytest.fixture(scope="module")
def stopped(assets):
    """A run stopped after step 1 of 3 as a kill would leave it (checkpoint-1, its log)."""
    return _reference_run(assets, "stopped", "--max_steps", 3, "--stop_after_steps", 1)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Row 1: a non-finite number never reaches the weights unnoticed, and is never saved
# ----------------------------------------------------------------------------------------------


def test_row1_nonfinite_flags_are_refused_before_models_load(assets, tmp_path):
    for bad, flag in ((["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--max_grad_norm", "inf"], "--max_grad_norm"),
                      (["--beta_end", "nan"], "--beta_end"), (["--clip_eps", "inf"], "--clip_eps"),
                      (["--reward_timeout", "inf"], "--reward_timeout"), (["--reward_weights", "nan"], "--reward_weights")):
        with pytest.raises(common.InputError, match=f"^{flag} must be"):
            train.parse_args(["--prompts", "p", *bad])
    proc = train_py(flags(assets, tmp_path / "out", "--lr", "inf", "--max_steps", 1))
    assert proc.returncode == 2 and "train.py: error: --lr must be in (0, 1), got inf" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_row1_nonfinite_lora_after_an_optimizer_step_stops_before_it_is_saved(assets, tmp_path):
    out = tmp_path / "out"
    proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1),
                    patch=ADAM_SCALES_WEIGHTS.format(at=2, scale="float('inf')"))  # step 2's update leaves inf weights
    assert proc.returncode == 1
    assert "non-finite LoRA weights after the optimizer step at step 2" in proc.stderr
    assert "the last checkpoint (" in proc.stderr and "checkpoint-1) is intact" in proc.stderr
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1"]
    assert common.verify_checkpoint(str(out / "checkpoint-1")) == []
    from safetensors.torch import load_file

    for which in ("lora", "ema"):
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / which / LORA_FILE).values())
    summary = json.loads((out / "run_summary.json").read_text())
    assert [os.path.basename(p) for p in summary["checkpoints"]] == ["checkpoint-1"]  # the loadable ones, listed


# ----------------------------------------------------------------------------------------------
# Row 2: one run per output folder
# ----------------------------------------------------------------------------------------------


def _write_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    (out / common.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}))


def test_row2_a_folder_locked_by_a_live_run_is_refused_naming_the_owner(assets, stopped, tmp_path):
    out = copy(stopped, tmp_path / "out")
    _write_lock(out, os.getpid())  # this test process: alive
    before = snapshot(out)
    proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--resume", "latest", "--take_over_lock"))
    assert proc.returncode == 2
    assert f"is locked by another run (pid {os.getpid()} on {socket.gethostname()}, started 2026-01-01" in proc.stderr
    assert "running)" in proc.stderr and "TMPO run plan" not in proc.stdout  # before any model loaded
    assert snapshot(out) == before


def test_row2_a_stale_lock_is_reported_and_taken_over_with_the_flag(assets, stopped, tmp_path):
    out = copy(stopped, tmp_path / "out")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(out, dead.pid)  # a kill -9'd run's lock: its pid is gone
    before = snapshot(out)
    refused = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--resume", "latest"))
    assert refused.returncode == 2 and "no longer running (stale)" in refused.stderr and "--take_over_lock" in refused.stderr
    assert snapshot(out) == before
    taken = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--resume", "latest", "--take_over_lock",
                           "--stop_after_steps", 2))
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"taking over the lock of {out} from pid {dead.pid}" in taken.stdout and steps(out) == [1, 2]
    assert not (out / common.LOCK).exists()  # released at the end


def test_row2_two_runs_started_at_once_into_one_folder(assets, tmp_path):
    out = tmp_path / "out"
    procs = [run_script("train.py", flags(assets, out, "--max_steps", 2, "--save_every", 1), popen=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    (_, _, refused), = [r for r in results if r[0] == 2]
    assert "is locked by another run" in refused or "already holds" in refused  # the lock, or the winner's checkpoint
    assert steps(out) == [1, 2]  # one run's log, not two interleaved
    assert json.loads((out / "run_summary.json").read_text())["final_checkpoint"].endswith("checkpoint-2")


# ----------------------------------------------------------------------------------------------
# Rows 3-4: a GenEval server that hangs or answers garbage
# ----------------------------------------------------------------------------------------------


class _Silent:
    """A TCP server that accepts connections and never answers (a hung GenEval server)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


def _http_server(reply):
    """An HTTP server answering every GET and POST with reply(body) -> (status, bytes)."""
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, data = reply(body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def hung_geneval_run(assets):
    server = _Silent()
    out = assets["root"] / "hung_geneval"
    start = time.monotonic()
    proc = train_py(flags(assets, out, "--max_steps", 1, "--geneval_url", server.url, "--reward_timeout", 1,
                          "--reward_retries", 1, reward="geneval"), timeout=240)
    return proc, server.url, out, time.monotonic() - start


def test_row3_a_hung_geneval_server_times_out_naming_it(hung_geneval_run):
    proc, url, out, seconds = hung_geneval_run
    assert proc.returncode != 0 and url in proc.stderr, proc.stderr[-2000:]
    assert seconds < 120  # --reward_timeout 1 with one retry, not minutes per batch
    assert not any(d.startswith("checkpoint") for d in os.listdir(out))


def test_row3_the_geneval_server_is_checked_before_models_load(hung_geneval_run):
    proc, url, _, _ = hung_geneval_run
    assert proc.returncode != 0 and url in proc.stderr
    assert "TMPO run plan" not in proc.stdout  # the plan is printed once FLUX is loaded


def _geneval_run(assets, tmp_path, reply):
    server, url = _http_server(reply)
    try:
        return train_py(flags(assets, tmp_path / "out", "--max_steps", 1, "--geneval_url", url, "--reward_timeout", 5,
                              "--reward_retries", 0, reward="geneval"), timeout=240), url
    finally:
        server.shutdown()


def test_row4_a_geneval_reply_of_html_is_an_error_naming_the_url_and_what_came_back(assets, tmp_path):
    proc, url = _geneval_run(assets, tmp_path, lambda body: (200, b"<html><body>502 Bad Gateway</body></html>"))
    assert proc.returncode == 1 and url in proc.stderr and "Bad Gateway" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_row4_none_in_an_unused_field_of_the_geneval_reply(assets, tmp_path):
    def reply(body):
        n = len(pickle.loads(body)["images"]) if body else 0
        return 200, pickle.dumps({"scores": [1.0] * n, "rewards": None, "strict_rewards": [1.0] * n})
    proc, url = _geneval_run(assets, tmp_path, reply)
    assert proc.returncode == 0 or (url in proc.stderr and "TypeError" not in proc.stderr), proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Rows 5-9: resuming
# ----------------------------------------------------------------------------------------------


def test_row5_a_partial_last_log_line_is_dropped_and_the_run_resumes(assets, stopped, tmp_path):
    out = copy(stopped, tmp_path / "out")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "reward/me')  # killed while writing step 2's row
    proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dropped its partial last line" in proc.stdout and steps(out) == [1, 2, 3]
    bad = copy(stopped, tmp_path / "bad")
    (bad / "metrics.jsonl").write_text('{"step": 1, "reward/me\n{"step": 1}\n')  # broken before the last line
    before = snapshot(bad)
    proc = train_py(flags(assets, bad, "--max_steps", 3, "--save_every", 1, "--resume", "latest"))
    assert proc.returncode == 2 and "metrics.jsonl, line 1 is not JSON" in proc.stderr
    assert snapshot(bad) == before


def test_row6_a_log_without_a_checkpoint_is_not_mixed_with_a_new_run(assets, tmp_path):
    out = tmp_path / "out"
    first = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 5, "--stop_after_steps", 1))
    assert first.returncode == 0 and steps(out) == [1] and not any(d.startswith("checkpoint") for d in os.listdir(out))
    before = snapshot(out)
    proc = train_py(flags(assets, out, "--max_steps", 3))
    assert proc.returncode == 2
    assert "holds ['metrics.jsonl', 'run_summary.json'] but no checkpoint" in proc.stderr
    assert snapshot(out) == before


def test_row7_a_truncated_checkpoint_is_named_and_the_loadable_ones_listed(assets, finished, tmp_path):
    """Each file of a checkpoint truncated in turn: --resume latest names it, lists what does load and
    picks nothing (checked here through common.resume_target; the first one through train.py)."""
    for i, broken in enumerate(["trainer_state.pt", "lora/pytorch_lora_weights.safetensors", "rank0.pt"]):
        out = copy(finished, tmp_path / f"out{i}")
        file = out / "checkpoint-2" / broken
        file.write_bytes(file.read_bytes()[:100])
        before = snapshot(out)
        expect = [f"{file} has 100 bytes", f"Checkpoints that do: ['{out / 'checkpoint-1'}']"]  # not silently picked
        if i == 0:
            proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--ema_every", 1, "--resume", "latest"))
            assert proc.returncode == 2 and all(e in proc.stderr for e in expect) and "TMPO run plan" not in proc.stdout
        else:
            with pytest.raises(common.InputError) as err:
                common.resume_target(str(out), "latest", 3)
            assert all(e in str(err.value) for e in expect)
        assert snapshot(out) == before


def test_row7_an_unreadable_checkpoint_of_the_right_size_is_named_when_read(assets, finished, tmp_path):
    """The manifest checks sizes (truncation), not content; a file that then fails to load is named too."""
    out = copy(finished, tmp_path / "out")
    file = out / "checkpoint-2" / "trainer_state.pt"
    file.write_bytes(bytes(64) + file.read_bytes()[64:])  # its zip header overwritten, its size unchanged
    proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--ema_every", 1, "--resume", "latest"))
    assert proc.returncode == 2 and f"{file} cannot be read" in proc.stderr
    assert str(out / "checkpoint-1") in proc.stderr and steps(out) == [1, 2]


def test_row8_a_finished_run_says_so_and_can_be_extended(assets, finished, tmp_path):
    out = copy(finished, tmp_path / "out")
    before = snapshot(out)
    proc = train_py(flags(assets, out, "--max_steps", 2, "--save_every", 1, "--ema_every", 1, "--resume", "latest"))
    assert proc.returncode == 0 and "the run is finished" in proc.stdout and "step 2 of --max_steps 2" in proc.stdout
    assert snapshot(out) == before  # run_summary.json kept as it was
    proc = train_py(flags(assets, out, "--max_steps", 3, "--save_every", 1, "--ema_every", 1, "--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint-2 at step 2" in proc.stdout and steps(out) == [1, 2, 3]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["final_step"] == 3 and [os.path.basename(p) for p in summary["checkpoints"]] == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    row = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert row["train/lr"] == pytest.approx(5e-5 * 0.5 * (1 + np.cos(np.pi * 2 / 3)))  # cosine stretched to 3 steps


def test_row9_resuming_on_other_base_weights_is_refused(assets, stopped, tmp_path):
    other = build_tiny_flux(tmp_path / "other_flux", seed=1)  # same shapes, other weights
    out = copy(stopped, tmp_path / "out")
    before = snapshot(out)
    args = flags(assets, out, "--max_steps", 3, "--save_every", 1, "--resume", "latest")
    args[args.index("--model") + 1] = other
    proc = train_py(args)
    assert proc.returncode == 2 and "was trained on other base weights" in proc.stderr and other in proc.stderr
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# Row 10: bad flags and files, before any model loads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,expect", [
    (["--eta", "2"], r"--eta must be in \(0, 1\], got 2.0"),
    (["--eta", "3"], r"--eta must be in \(0, 1\], got 3.0"),
    (["--kappa", "-1"], r"--kappa must be in \(0, inf\], got -1.0"),
    (["--branch_early", "0", "2", "2"], r"--branch_early \[0, 2, 2\]: branch positions must be distinct"),
    (["--height", "40"], r"--height and --width must be multiples of 16 .*got 40x512"),
    (["--reward", "pickscore", "hps", "--reward_weights", "1"], r"--reward_weights \[1.0\]: give one weight per reward"),
])
def test_row10_bad_flags_name_the_flag_and_the_valid_range(bad, expect):
    with pytest.raises(common.InputError, match=expect):
        train.parse_args(["--prompts", "p", *bad])


def test_row10_bad_values_paths_and_files_fail_before_models_load(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--prompts", "p", "--reward_weights", "1,abc"])
    assert "argument --reward_weights/--reward-weights: invalid float value: '1,abc'" in capsys.readouterr().err
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    for args, expect in ((flags(assets, tmp_path / "a", "--prompts", binary), f"--prompts {binary} is not UTF-8 text"),
                         (flags(assets, "/dev/null/out"), "--output_dir /dev/null/out is not usable")):
        proc = train_py(args)
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr and "TMPO run plan" not in proc.stdout


# ----------------------------------------------------------------------------------------------
# Row 11: eval.py into an existing --out
# ----------------------------------------------------------------------------------------------


def test_row11_eval_refuses_an_earlier_evaluation_unless_overwrite_which_removes_it(assets, tmp_path):
    out = tmp_path / "eval"
    cli = ["--model", assets["flux"], "--prompts", assets["prompts"], "--metrics", "lgmd", "--height", "32", "--width",
           "32", "--steps", "2", "--images_per_prompt", "2", "--max_sequence_length", "16", "--out", str(out)]
    eval_script.evaluate(eval_script.parse_args(cli))
    assert sorted(os.listdir(out / "grids")) == ["prompt_000.png", "prompt_001.png", "prompt_002.png"]
    before = snapshot(out)
    with pytest.raises(common.InputError, match=r"holds \['results.json', 'results.md', 'grids'\] of an earlier "
                                                r"evaluation: pass --overwrite"):
        eval_script.evaluate(eval_script.parse_args(cli + ["--max_prompts", "1"]))
    assert snapshot(out) == before
    eval_script.evaluate(eval_script.parse_args(cli + ["--max_prompts", "1", "--overwrite"]))
    assert sorted(os.listdir(out / "grids")) == ["prompt_000.png"]  # no old grid left beside the new one
    assert json.loads((out / "results.json").read_text())["config"]["num_prompts"] == 1


# ----------------------------------------------------------------------------------------------
# Row 12: SIGTERM (preemption)
# ----------------------------------------------------------------------------------------------


def test_row12_sigterm_finishes_the_step_saves_and_says_how_to_resume(assets, tmp_path):
    out = tmp_path / "out"
    proc = run_script("train.py", flags(assets, out, "--max_steps", 500, "--save_every", 100), popen=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = steps(out)[-1]  # the step in progress when the signal came was finished, logged and saved
    assert f"stopped by SIGTERM after step {last}: {out / f'checkpoint-{last}'} saved; continue with --resume latest" in printed
    assert common.loadable_checkpoints(str(out)) == [str(out / f"checkpoint-{last}")] and last < 500
    resumed = train_py(flags(assets, out, "--max_steps", 500, "--save_every", 100, "--resume", "latest",
                             "--stop_after_steps", last + 1))
    assert resumed.returncode == 0 and f"checkpoint-{last} at step {last}" in resumed.stdout
    assert steps(out) == list(range(1, last + 2))


# ----------------------------------------------------------------------------------------------
# Row 13: a 2-process run ends cleanly (common.end_run)
# ----------------------------------------------------------------------------------------------


def two_process_run(assets, out, port=29512):
    """One tiny 2-process CPU run (DDP over gloo); returns (exit status, stdout, stderr)."""
    cmd = [*LAUNCH_2, "--main_process_port", str(port), os.path.join(ROOT, "train.py"), *flags(assets, out, "--max_steps", 1)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def test_row13_a_two_process_run_ends_without_abort_or_hang(assets, tmp_path):
    rc, stdout, stderr = two_process_run(assets, tmp_path / "out")
    assert rc == 0 and "done:" in stdout, stderr[-3000:]
    assert "terminate called" not in stderr and "SIGABRT" not in stderr


if __name__ == "__main__" and "--loop" in sys.argv:  # the row-13 loop, outside CI
    import tempfile

    n = int(sys.argv[sys.argv.index("--loop") + 1])
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        root = Path(tmp)
        (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
        loop_assets = {"flux": build_tiny_flux(root / "flux"), "pickscore": build_tiny_pickscore(root / "pickscore"),
                       "prompts": str(root / "p.txt")}
        failures = []
        for i in range(n):
            try:
                rc, stdout, stderr = two_process_run(loop_assets, root / f"out{i}", port=29600 + i % 50)
            except subprocess.TimeoutExpired:
                rc, stdout, stderr = "timeout (hang)", "", ""
            ok = rc == 0 and "done:" in stdout and "terminate called" not in stderr
            failures += [] if ok else [(i, rc, stderr[-600:])]
            print(f"run {i + 1}/{n}: {'ok' if ok else f'FAILED ({rc})'}", flush=True)
        print(f"{len(failures)} failure(s) in {n} two-process runs")
        for i, rc, tail in failures:
            print(f"--- run {i + 1}: {rc}\n{tail}")
