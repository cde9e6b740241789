"""End to end: the real entry point trains the tiny model (full FT, LoRA, 2 processes, real tokenizer)."""
import json
import re
import subprocess
import sys

import pytest
from conftest import QWEN_DIR, ROOT, needs_shared, train_args

import tiny
import tinyvla


def run_cli(*args, timeout=600):
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def check_final(out, use_lora):
    final = out / "final"
    run = json.loads((final / tinyvla.RUN_CONFIG).read_text())
    stats = json.loads((final / tinyvla.ACTION_STATS).read_text())
    assert run["model"]["use_lora"] is use_lora and run["data"]["horizon"] == 8 and len(stats["global"]["lo"]) == 7
    assert (final / ("adapter_config.json" if use_lora else "model.safetensors")).exists()
    assert (out / tinyvla.RUN_CONFIG).exists()  # also beside the output
    policy = tinyvla.Policy(final, device="cpu")  # loads back: model (+ adapter), processor, config, stats
    assert policy.d.horizon == 8 and policy.m.use_lora is use_lora


@pytest.mark.parametrize("lora", [False, True])
def test_cli_trains_and_saves_final(lora, tiny_model, dataset_v2, tmp_path):
    out = tmp_path / "run"
    run_cli(*train_args(tiny_model, dataset_v2, out, "--use_lora", lora, "--save_strategy", "steps",
                        "--save_steps", "2", "--eval_strategy", "no"))
    check_final(out, lora)
    ckpt = out / "checkpoint-2"
    assert (ckpt / tinyvla.RUN_CONFIG).exists() and (ckpt / tinyvla.ACTION_STATS).exists()
    if lora:  # only the language model's projections carry adapters
        cfg = json.loads((out / "final/adapter_config.json").read_text())
        assert cfg["target_modules"] == tinyvla.LORA_TARGETS


def test_lora_targets_language_model_only(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=tinyvla.LORA_TARGETS))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 2 * 7 and all(".language_model." in n for n in wrapped)


def test_resume_and_no_overwrite(tiny_model, dataset_v2, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--save_strategy", "steps", "--save_steps", "2",
                      "--eval_strategy", "no")
    run_cli(*args)
    before = (out / "final/model.safetensors").stat().st_mtime_ns
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists" in r.stderr.splitlines()[-1]
    assert (out / "final/model.safetensors").stat().st_mtime_ns == before
    run_cli(*train_args(tiny_model, dataset_v2, out, "--eval_strategy", "no", "--max_steps", "6",
                        "--resume_from_checkpoint", out / "checkpoint-4"))
    state = json.loads((out / "final/trainer_state.json").read_text()) if (out / "final/trainer_state.json").exists() \
        else json.loads(max(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert state["global_step"] == 6


def test_resume_keeps_best_model_and_eval_cadence(tiny_model, dataset_v2, tmp_path):
    """After a resume, best/ is judged against the val losses from before it, and gen_eval_every keeps counting."""
    out = tmp_path / "run"
    args = ("--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
            "--gen_eval_every", 2)
    run_cli(*train_args(tiny_model, dataset_v2, out, *args, "--max_steps", 2))
    best = (out / "best/model.safetensors").stat().st_mtime_ns
    state_file = out / "checkpoint-2/trainer_state.json"
    state = json.loads(state_file.read_text())
    assert [h for h in state["log_history"] if "val/parse_rate" in h] == []  # 1st eval: no generation metrics
    for h in state["log_history"]:  # as if the run before the resume had reached a far lower val loss
        if "eval_loss" in h:
            h["eval_loss"] = 0.0
    state_file.write_text(json.dumps(state))
    run_cli(*train_args(tiny_model, dataset_v2, out, *args, "--max_steps", 4, "--resume_from_checkpoint",
                        out / "checkpoint-2"))
    assert (out / "best/model.safetensors").stat().st_mtime_ns == best  # a worse val loss does not replace best/
    history = json.loads((out / "checkpoint-4/trainer_state.json").read_text())["log_history"]
    assert [h["eval_loss"] > 0 for h in history if "eval_loss" in h] == [False, True]
    assert [h["step"] for h in history if "val/parse_rate" in h] == [4]  # the 2nd eval of the run, 1st since resume


def test_v3_layout_trains(tiny_model, dataset_v3, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(tiny_model, dataset_v3, out, "--image_keys", "observation.images.image",
                            "observation.images.image2", "--action_key", "action", "--eval_strategy", "steps",
                            "--eval_steps", "2", "--max_steps", "2"))
    assert (out / "final/model.safetensors").exists()
    # the run ends with a readable table: progress, losses, the generation eval, where the models are
    table = r.stdout[r.stdout.index("| training run | |"):]
    assert "| steps (epochs) | 2 (" in table and f"| final model | {out / 'final'} |" in table
    assert f"| best model (lowest val loss) | {out / 'best'} |" in table
    assert re.search(r"\| val loss \(last / best\) \| [\d.]+ / [\d.]+ \|", table)
    assert re.search(r"\| val parse rate / mae / mse \(last generation eval\) \| 1 / [\d.]+ / [\d.]+ \|", table)


def test_two_process_cpu_run(tiny_model, dataset_v2, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tinyvla.py"), *train_args(tiny_model, dataset_v2, out, "--eval_strategy", "no")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # both ranks consumed data: 4 steps x 2 per device x 2 processes samples, as a fraction of an epoch
    epochs = [float(x) for x in re.findall(r"'epoch': '([0-9.]+)'", r.stdout + r.stderr)]
    n_train = len(tinyvla.build_datasets(tinyvla.DataArgs(repo_id=str(dataset_v2)), seed=42)[0])
    assert epochs and abs(epochs[-1] - 16 / n_train) < 1e-3
    assert (out / "final/model.safetensors").exists() and (out / "final" / tinyvla.ACTION_STATS).exists()


@needs_shared
def test_real_tokenizer_and_template_train(dataset_v2, tmp_path):
    """The real Qwen2.5-VL tokenizer, processor config and chat template on a tiny model of the real vocab size."""
    import shutil
    from transformers import AutoTokenizer
    src = tmp_path / "qwen"
    shutil.copytree(QWEN_DIR, src)
    tok = AutoTokenizer.from_pretrained(src)
    chat = json.loads((QWEN_DIR / "chat_template.json").read_text())["chat_template"]
    cfg = json.loads((QWEN_DIR / "config.json").read_text())
    model = tiny.make_model_dir(tmp_path / "model", tokenizer=tok, chat_template=chat, vocab_size=cfg["vocab_size"])
    shutil.copy(QWEN_DIR / "preprocessor_config.json", model / "preprocessor_config.json")
    out = tmp_path / "run"
    run_cli(*train_args(model, dataset_v2, out, "--max_steps", "2", "--eval_strategy", "no"))
    check_final(out, False)
