"""The 24 GB LoRA recipe of the VLA-0 configuration guide: values, and a tiny end-to-end run of it."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import tiny
import tinyvla

PRESET = ROOT / "config_lora_24gb.yaml"


def test_preset_resolves_to_the_guide():
    m, d, e, t = tinyvla.parse_args(["--config", str(PRESET), "--bf16", "false"])
    assert (m.model_id, m.use_lora, m.lora_r, m.lora_alpha, m.lora_dropout) == (
        "Qwen/Qwen2.5-VL-3B-Instruct", True, 32, 64, 0.05)
    assert (d.horizon, d.num_bins, d.img_size, d.tile_images, d.action_mask_aug_pct, d.val_ratio) == (
        10, 1000, 128, False, 0.3, 0.1)
    assert len(d.image_keys) == 2 and tinyvla.image_pixels(d) == 128 * 128
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.optim) == (4, 16, "adamw_8bit")
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.learning_rate, t.max_grad_norm) == (0.9, 0.95, 0.01, 5e-5,
                                                                                             1.0)
    assert (str(t.lr_scheduler_type), t.warmup_steps, t.num_train_epochs) == ("SchedulerType.COSINE", 0.05, 64)
    assert (t.eval_strategy, e.eval_max_batches, e.gen_eval_every, e.gen_eval_samples) == ("epoch", 50, 5, 30)
    assert (t.save_strategy, t.save_steps, t.save_total_limit, e.ensemble_window) == ("steps", 500, 3, 10)


def test_preset_trains_end_to_end(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes", reason="adamw_8bit needs bitsandbytes")
    data = tiny.make_dataset(tmp_path / "data", episodes=5, length=(8, 10))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), "--config", str(PRESET), "--model_id", tiny_model,
                        "--repo_id", data, "--output_dir", out, "--dtype", "float32", "--bf16", "false",
                        "--use_cpu", "true", "--num_train_epochs", "5", "--dataloader_num_workers", "0",
                        "--report_to", "none", "--per_device_eval_batch_size", "2", "--eval_max_batches", "3"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-5"]  # a step an epoch: none every 500 steps, the last step's as a run ends
    for name in [checkpoints[0], "best", "final"]:
        assert (out / name / tinyvla.RUN_CONFIG).exists() and (out / name / "adapter_config.json").exists()
    run = json.loads((out / "final" / tinyvla.RUN_CONFIG).read_text())
    assert run["data"]["horizon"] == 10 and not run["data"]["tile_images"] and run["train"]["optim"] == "adamw_8bit"
    state = json.loads((out / checkpoints[0] / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    gens = [h for h in state["log_history"] if "val/parse_rate" in h]
    assert len(evals) == 4 and not gens  # epochs 1-4 (the 5th evaluates after the last step's save): no generation
    assert all(h["eval_num_tokens"] > 0 for h in evals)
    assert "| val parse rate / mae / mse (last generation eval) | 1 / " in r.stdout  # the 5th evaluation's
    # eval reads the checkpoint's settings back (the preset's 16 envs, window 10); flags still override them
    e = tinyvla.parse_args(["--eval", str(out / "final")])[2]
    assert (e.num_envs, e.ensemble_window, e.eval) == (16, 10, str(out / "final"))
    assert tinyvla.parse_args(["--eval", str(out / "final"), "--num_envs", "2"])[2].num_envs == 2
    policy = tinyvla.Policy(out / "final", device="cpu")
    obs = [[np.zeros((128, 128, 3), np.uint8)] * 2]
    assert policy(obs, [tiny.TASKS[0]]).shape == (1, 10, 7)
