"""The main job end to end on CPU: `deepspeed launch/pretrain.py` and `mpiexec -n 2 python launch/pretrain.py`."""
import json
import os

import pytest

import signal
import time

from launch_utils import ROOT, run, start_single

SCRIPT = os.path.join(ROOT, "launch", "pretrain.py")
SMALL = ["--model", "llama-tiny", "--seq_len", "64", "--micro_batch_size", "4", "--max_mb", "0.3",
         "--vocab_size", "512", "--lr", "2e-3", "--eval_batches", "4", "--mask_change_freq", "3", "--log_every", "1"]
pytestmark = pytest.mark.multirank


def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrain") / "run")
    run("deepspeed", SCRIPT, [*SMALL, "--max_steps", "12", "--eval_every", "6", "--save_every", "6",
                              "--adapter_start", "0.75", "--output_dir", out])
    return out


def test_pretraining_runs_and_logs_every_phase(first_run):
    rows = _rows(first_run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])  # loss falls
    assert [r["phase"] for r in train] == ["sparse"] * 9 + ["adapters"] * 3
    assert all(r["tokens"] == r["step"] * 2 * 4 * 64 and r["tokens_per_s"] > 0 for r in train)
    assert all(r["lr"] > 0 for r in train[2:]) and 1e-3 < max(r["lr"] for r in train) <= 2e-3
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 12] and all(r["val_ppl"] > 1 for r in val)
    ckpt = os.path.join(first_run, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "global_step12"
    assert os.path.exists(os.path.join(ckpt, "global_step12", "dsparse.json"))
    assert os.path.exists(os.path.join(first_run, "loss.png"))
    with open(os.path.join(first_run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["deepspeed"]["sparsity"]["total_steps"] == 12 and cfg["world_size"] == 2
    assert os.listdir(os.path.join(first_run, "tensorboard"))


def test_resume_continues_at_the_next_step_and_data_position(first_run):
    run("deepspeed", SCRIPT, [*SMALL, "--max_steps", "14", "--eval_every", "100", "--save_every", "100",
                              "--adapter_start", "0.75", "--output_dir", first_run, "--resume"])
    train = [r for r in _rows(first_run) if "loss" in r]
    assert [r["step"] for r in train][-2:] == [13, 14]
    ckpt = os.path.join(first_run, "checkpoints")
    import torch

    states = torch.load(os.path.join(ckpt, "global_step14", "mp_rank_00_model_states.pt"), weights_only=False)
    assert states["data"]["consumed_samples"] == 14 * 2 * 4  # 14 steps of 2 ranks x 4 samples, none repeated


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/config.json"], "is neither a preset"),
    (["--dataset", "/no/such/corpus"], "dataset path '/no/such/corpus' does not exist"),
    (["--dataset", "no-such-org/no-such-corpus"], "is neither a local path nor a reachable hub dataset"),
    (["--seq_len", "4096"], "--seq_len 4096 exceeds the model's maximum of 2048"),
])
def test_bad_input_gets_a_one_line_error(tmp_path, flags, message):
    with pytest.raises(AssertionError) as failure:
        run("single", SCRIPT, [*SMALL, "--max_steps", "1", "--output_dir", str(tmp_path), *flags])
    text = str(failure.value)
    error_lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in text


def test_mpirun_job_script_trains(tmp_path):
    """launch/mpirun_pretrain.sh: mpiexec -n 2 python launch/pretrain.py with MPI discovery."""
    out = str(tmp_path / "mpi")
    run("bash", os.path.join(ROOT, "launch", "mpirun_pretrain.sh"),
        [*SMALL, "--max_steps", "3", "--eval_every", "3", "--save_every", "3", "--output_dir", out])
    rows = _rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = str(tmp_path / "preempt")
    proc = start_single(SCRIPT, [*SMALL, "--max_steps", "500", "--eval_every", "1000", "--save_every", "1000",
                                 "--output_dir", out])
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(_rows(out)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted: checkpoint saved at step" in output
    tag = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    stopped = int(tag.removeprefix("global_step"))
    assert 3 <= stopped < 500
    run("single", SCRIPT, [*SMALL, "--max_steps", str(stopped + 2), "--eval_every", "1000", "--save_every", "1000",
                           "--output_dir", out, "--resume"])
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == list(range(1, stopped + 3))


def test_checkpoint_exports_for_inference(first_run, tmp_path):
    """`python -m dsparse.export` on the run's ZeRO checkpoint gives the trained function, sparse."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsparse import sparse_modules, sparsify
    from dsparse.export import _consolidated_state_dict, load_for_inference

    import subprocess
    import sys

    out = str(tmp_path / "export")
    subprocess.run([sys.executable, "-m", "dsparse.export", os.path.join(first_run, "checkpoints"), out,
                    "--hf_config", os.path.join(first_run, "hf_config"), "--dtype", "float32"], check=True, cwd=ROOT)
    loaded = load_for_inference(out, device="cpu")
    state, manifest = _consolidated_state_dict(os.path.join(first_run, "checkpoints"), None)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(first_run, "hf_config")))
    sparsify(reference, manifest["sparsity"])
    for name, layer in sparse_modules(reference):
        layer.add_adapter(manifest["layers"][name]["adapter_rank"], alpha=1.0)
    reference.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_ranks_end_together_at_end_process(tmp_path):
    """dsparse.process.end_process: two ranks meet and exit with code 0; what they wrote reaches the log and
    nothing after the call runs."""
    script = tmp_path / "ends.py"
    script.write_text("import sys, torch.distributed as dist\n"
                      "from dsparse.process import end_process\n"
                      "dist.init_process_group('gloo')\n"
                      "sys.stdout.write(f'rank {dist.get_rank()} wrote')\n"
                      "end_process()\n"
                      "print('after end_process')\n")
    out = run("deepspeed", str(script), []).stdout
    assert "rank 0 wrote" in out and "rank 1 wrote" in out and "after end_process" not in out
