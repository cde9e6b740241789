"""End to end: the real entry point trains the tiny model (full FT, LoRA, 2 processes, real tokenizer)."""
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QWEN_DIR, ROOT, free_port, needs_shared, observations, train_args

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
    r = run_cli(*train_args(tiny_model, dataset_v2, out, "--use_lora", lora, "--save_strategy", "steps",
                            "--save_steps", "2", "--eval_strategy", "no"))
    check_final(out, lora)
    noise = [line for line in r.stderr.splitlines() if re.search(r"warn|^\[transformers\]", line, re.IGNORECASE)]
    assert not noise  # nothing the user did (Qwen's config has no pad id; the Trainer sets the tokenizer's)
    ckpt = out / "checkpoint-2"
    assert (ckpt / tinyvla.RUN_CONFIG).exists() and (ckpt / tinyvla.ACTION_STATS).exists()
    if lora:  # only the language model's projections carry adapters
        cfg = json.loads((out / "final/adapter_config.json").read_text())
        assert cfg["target_modules"] == tinyvla.LORA_TARGETS
        obs, tasks = observations(2), [tiny.TASKS[0]] * 2
        policy = tinyvla.Policy(out / "final", "cpu")
        expected = policy(obs, tasks)
        # the policy computes what training did, the adapter's product added to the base's: merged into the weights
        # (bf16 on a GPU), an update below half a weight's precision step would round away
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText
        trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model), out / "final")
        inputs = policy.collator.prompts([{"images": tinyvla.prepare_images(o, policy.d), "task": t}
                                          for o, t in zip(obs, tasks)])
        with torch.no_grad():
            assert torch.equal(policy.model(**inputs).logits, trained(**inputs).logits)
        # served elsewhere: the base model it names (a path of the training machine) is not there; --model_id is
        cfg["base_model_name_or_path"] = "/cluster/models/qwen"
        (out / "final/adapter_config.json").write_text(json.dumps(cfg))
        m = tinyvla.parse_args(["--serve", str(out / "final")])[0]
        assert (m.model_id, m.dtype) == ("/cluster/models/qwen", "float32")  # the checkpoint's
        with pytest.raises(tinyvla.TinyVLAError, match="cannot load model '/cluster/models/qwen'.*check --model_id"):
            tinyvla.Policy(out / "final", "cpu", m=m)
        m = tinyvla.parse_args(["--serve", str(out / "final"), "--model_id", str(tiny_model), "--dtype", "bfloat16"])[0]
        assert (m.model_id, m.dtype) == (str(tiny_model), "bfloat16")
        assert np.array_equal(tinyvla.Policy(out / "final", "cpu", m=m)(obs, tasks), expected)


def test_lora_targets_language_model_only(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=tinyvla.LORA_TARGETS))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 2 * 7 and all(".language_model." in n for n in wrapped)


def weights(path):
    """Every saved tensor of a checkpoint: the model, or the LoRA adapter."""
    from safetensors.torch import load_file
    return load_file(next(f for f in (path / "model.safetensors", path / "adapter_model.safetensors") if f.exists()))


@pytest.mark.parametrize("lora", [False, True])
def test_resume_restores_the_saved_weights(lora, tiny_model, dataset_v2, tmp_path):
    """A resumed run continues from the checkpoint's weights, not from the base model (transformers#43701)."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    args = ("--use_lora", lora, "--save_strategy", "steps", "--save_steps", 2, "--eval_strategy", "no")
    run_cli(*train_args(tiny_model, dataset_v2, first, *args))
    if not lora:  # the same command again: refused in one line, nothing overwritten
        before = (first / "final/model.safetensors").stat().st_mtime_ns
        again = [sys.executable, str(ROOT / "tinyvla.py"), *train_args(tiny_model, dataset_v2, first, *args)]
        r = subprocess.run(again, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "already holds a run" in r.stderr.splitlines()[-1]
        assert (first / "final/model.safetensors").stat().st_mtime_ns == before
    if lora:  # the adapter's settings are the run's: another alpha would rescale what it learned
        other = [sys.executable, str(ROOT / "tinyvla.py"), *train_args(
            tiny_model, dataset_v2, resumed, *args, "--resume_from_checkpoint", first / "checkpoint-4", "--lora_alpha",
            128)]
        r = subprocess.run(other, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "lora_alpha 64 (now 128)" in r.stderr.splitlines()[-1] and not resumed.exists()
    # the linear schedule ended at lr 0, and the optimizer state restores it: the one more step (max_steps 5) changes
    # nothing, so final/ must be exactly checkpoint-4
    run_cli(*train_args(tiny_model, dataset_v2, resumed, *args, "--resume_from_checkpoint", first / "checkpoint-4",
                        "--max_steps", 5))
    saved, final, base = weights(first / "checkpoint-4"), weights(resumed / "final"), weights(tiny_model)
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[k], final[k]) for k in saved)
    if not lora:
        assert any(not torch.equal(saved[k], base[k]) for k in saved)  # training did move the weights


@pytest.mark.parametrize("lora, stop", [(False, 7), (True, 5)])
def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(lora, stop, tiny_model, tmp_path):
    """Preempted (mid-epoch, or at an epoch's end) and resumed, augmentation on (crops, jitter, masks; LoRA: dropout
    too), with another number of DataLoader workers: the same final weights, bit for bit, as the run never stopped."""
    data = tiny.make_dataset(tmp_path / "data", episodes=3, length=(5, 5))  # 2 train episodes: 5 steps an epoch
    args = ("--use_lora", lora, "--max_steps", 12, "--save_strategy", "steps", "--save_steps", stop, "--eval_strategy",
            "no")
    trainer = tinyvla.train(*tinyvla.parse_args(train_args(tiny_model, data, tmp_path / "whole", *args)))
    assert next(c for c in trainer.callback_handler.callbacks if isinstance(c, tinyvla.VLADataset)).epoch == 2
    run_cli(*train_args(tiny_model, data, tmp_path / "resumed", *args, "--dataloader_num_workers", 2,
                        "--resume_from_checkpoint", tmp_path / f"whole/checkpoint-{stop}"))  # in epoch 1, or before it
    whole, resumed = weights(tmp_path / "whole/final"), weights(tmp_path / "resumed/final")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_best_model_reload_restores_the_saved_weights(trained_run):
    """load_best_model_at_end goes through the same loading as a resume."""
    out, trainer = trained_run
    trainer.state.best_model_checkpoint = str(out / "checkpoint-2")
    trainer._load_best_model()
    from transformers import AutoModelForImageTextToText
    saved = AutoModelForImageTextToText.from_pretrained(out / "checkpoint-2").state_dict()
    assert saved.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in saved.items())
    assert not torch.equal(weights(out / "checkpoint-2")["model.norm.weight"],
                           weights(out / "checkpoint-4")["model.norm.weight"])


def test_load_best_model_at_end_with_sparse_epoch_checkpoints(tiny_model, tmp_path):
    """save_every_epochs 2 skips odd epochs' checkpoints, but never the best one, which load_best_model_at_end loads
    into final/. The best is pinned to epoch 1, neither saved by the rule nor the last: greater_is_better on a val loss
    that falls (the lowest, in best/, is the last epoch's)."""
    data, out = tiny.make_dataset(tmp_path / "data", episodes=3, length=(6, 8)), tmp_path / "run"
    r = run_cli(*train_args(tiny_model, data, out, "--max_steps", -1, "--num_train_epochs", 3, "--save_every_epochs",
                            2, "--load_best_model_at_end", "true", "--gen_eval_every", 0, "--learning_rate", 1e-3,
                            "--greater_is_better", "true"))
    losses = [float(x) for x in re.findall(r"'eval_loss': '([0-9.e+-]+)'", r.stdout + r.stderr)]
    assert len(losses) == 3 and losses == sorted(losses, reverse=True), losses  # falling: epoch 1 is the "best"
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda c: int(c.name[11:]))
    epochs = [json.loads((c / "trainer_state.json").read_text())["epoch"] for c in ckpts]
    assert epochs == [1, 2, 3], epochs  # epoch 1: the best; 2: the rule; 3: the last
    final, first, last = weights(out / "final"), weights(ckpts[0]), weights(ckpts[-1])
    assert all(torch.equal(v, first[k]) for k, v in final.items())
    assert not all(torch.equal(v, last[k]) for k, v in final.items())


def test_finishing_a_run_killed_while_saving_final_loads_the_best_model(tiny_model, dataset_v2, tmp_path):
    """load_best_model_at_end: final/ is the best checkpoint, also when a resume only has final/ left to save."""
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy",
                      "steps", "--save_steps", 2, "--load_best_model_at_end", "true", "--gen_eval_every", 0)
    run_cli(*args)
    state_file = out / "checkpoint-4/trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = str(out / "checkpoint-2")  # as if step 2 had the lower val loss
    state_file.write_text(json.dumps(state))
    (out / "final" / tinyvla.ACTION_STATS).unlink()  # killed while saving final/ (the stats go last)
    run_cli(*args, "--resume_from_checkpoint", "last")
    final, best, last = weights(out / "final"), weights(out / "checkpoint-2"), weights(out / "checkpoint-4")
    assert all(torch.equal(v, best[k]) for k, v in final.items()) and any(
        not torch.equal(v, last[k]) for k, v in final.items())


def test_sparse_epoch_checkpoints_keep_the_last_one_a_killed_final_save_resumes_from(tiny_model, tmp_path):
    """save_every_epochs 2 of 3 epochs: the end is saved too, so a run killed while saving final/ is finished by the
    same command without training its last epoch again."""
    data, out = tiny.make_dataset(tmp_path / "data", episodes=3, length=(6, 8)), tmp_path / "run"
    args = train_args(tiny_model, data, out, "--max_steps", -1, "--num_train_epochs", 3, "--save_every_epochs", 2,
                      "--eval_strategy", "no")
    run_cli(*args)
    last = max(out.glob("checkpoint-*"), key=lambda c: int(c.name[11:]))
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 3
    (out / "final" / tinyvla.ACTION_STATS).unlink()  # killed while saving final/ (the stats go last)
    r = run_cli(*args, "--resume_from_checkpoint", "last")
    assert "'loss'" not in r.stdout + r.stderr  # no step trained again
    assert all(torch.equal(v, weights(last)[k]) for k, v in weights(out / "final").items())


def test_a_run_that_dies_rewriting_the_best_model_leaves_the_previous_one_whole(tiny_model, dataset_v2, tmp_path):
    """best/ is rewritten whenever val loss improves: a run that dies doing it (killed, a full disk) keeps the last."""
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--max_steps", 2, "--eval_strategy", "steps", "--eval_steps", 1,
                      "--save_strategy", "steps", "--save_steps", 2, "--gen_eval_every", 0, "--learning_rate", 1e-3)
    run_cli(*args)
    before = weights(out / "best")
    (out / "best.saving").write_text("")  # the next best cannot be written: the run dies saving it
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *args, "--resume_from_checkpoint", "last",
                        "--max_steps", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stderr[-2000:]
    policy = tinyvla.Policy(out / "best", device="cpu")  # still a checkpoint, the one it was
    assert all(torch.equal(v, before[k]) for k, v in weights(out / "best").items()) and policy.d.horizon == 8


@pytest.mark.parametrize("killed_at", [1, 2])
def test_a_run_killed_while_replacing_the_best_model_keeps_a_whole_one(killed_at, trained_run, tmp_path, monkeypatch):
    """A lower val loss replaces best/, which means deleting the last one (gigabytes: a while): a run killed at any
    deletion of it still has a whole best model, the last one or the new one."""
    out, trainer = trained_run
    shutil.copytree(out / "best", tmp_path / "best")
    shutil.copytree(out / "best", tmp_path / "best.old")  # left by an earlier kill: deleted first
    before, rmtree, deletions = weights(tmp_path / "best"), shutil.rmtree, []
    monkeypatch.setattr(trainer.args, "output_dir", str(tmp_path))
    monkeypatch.setattr(trainer.state, "log_history", [{"eval_loss": math.inf}])  # the next val loss is the best yet

    def killed_deleting(path, ignore_errors=False):
        deletions.append(path)
        if Path(path).name.startswith("best") and len(deletions) == killed_at:
            next(Path(path).glob("*.safetensors")).unlink()  # part way through
            raise KeyboardInterrupt  # stands for the kill
        rmtree(path, ignore_errors=ignore_errors)
    monkeypatch.setattr(shutil, "rmtree", killed_deleting)
    trainer.save_model(str(tmp_path / "new"))  # what the new best/ holds
    with pytest.raises(KeyboardInterrupt):
        trainer.evaluate()
    assert tinyvla.Policy(tmp_path / "best", device="cpu").d.horizon == 8
    best, want = weights(tmp_path / "best"), before if killed_at == 1 else weights(tmp_path / "new")
    assert best.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in best.items())


def test_a_second_run_into_a_training_run_dir_is_one_line(tiny_model, dataset_v2, tmp_path):
    """A requeued job whose old run still trains (a killed launcher's workers live on): it stops, it does not train
    into the same dir beside it."""
    out = tmp_path / "run"
    flags = train_args(tiny_model, dataset_v2, out, "--max_steps", 100000, "--eval_strategy", "no", "--save_strategy",
                       "no", "--resume_from_checkpoint", "last")
    args = [sys.executable, str(ROOT / "tinyvla.py"), *flags]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert any("'loss'" in line for line in first.stdout), "the first run never trained"  # so it holds the
        # lock; with its output no longer read it soon blocks writing, still holding it
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
            f"tinyvla: error: another run is training into {out}: wait for it, or stop it (a killed launcher's "
            "workers may live on)"), r.stderr[-2000:]
    finally:
        first.kill()
        first.wait()


def test_a_longer_run_that_dies_saving_final_is_finished_by_resuming(tiny_model, dataset_v2, tmp_path):
    """final/ of the shorter run is rewritten in place: until the new one is whole it must not count as saved."""
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
                      "--eval_strategy", "no")
    run_cli(*args)
    blocker = out / "final/model.safetensors"
    blocker.unlink()
    blocker.mkdir()  # the weights cannot be written: the longer run dies saving final/, as if killed there
    longer = [sys.executable, str(ROOT / "tinyvla.py"), *args, "--resume_from_checkpoint", "last", "--max_steps", "4"]
    assert subprocess.run(longer, capture_output=True, text=True, timeout=300).returncode != 0
    blocker.rmdir()
    run_cli(*longer[2:])  # the same command again: final/ saved from checkpoint-4, not refused as finished
    assert all(torch.equal(v, weights(out / "checkpoint-4")[k]) for k, v in weights(out / "final").items())


def test_kill_during_save_resumes_from_the_last_complete_checkpoint(tiny_model, dataset_v2, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--max_steps", 500, "--save_strategy", "steps", "--save_steps", 1,
                      "--eval_strategy", "no")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tinyvla.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, partial = time.time() + 300, None
    while partial is None and time.time() < deadline and proc.poll() is None:  # a checkpoint being written
        time.sleep(0.001)
        partial = next((c for c in out.glob("checkpoint-*") if int(c.name[11:]) >= 4 and
                        not (c / "trainer_state.json").exists()), None)
        if partial:
            proc.send_signal(signal.SIGSTOP)  # frozen: is it still being written?
            partial = None if (partial / "trainer_state.json").exists() else partial
            proc.send_signal(signal.SIGKILL if partial else signal.SIGCONT)
    proc.wait()
    assert partial is not None and tinyvla.trained_steps(partial) is None
    complete = max((c for c in out.glob("checkpoint-*") if tinyvla.trained_steps(c)), key=lambda c: int(c.name[11:]))
    step = int(complete.name[11:])
    assert step == int(partial.name[11:]) - 1
    for extra, message in [((), "already holds a run: continue it (--resume_from_checkpoint last)"),
                           (("--resume_from_checkpoint", partial), "is not a complete checkpoint")]:
        r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *args, *extra], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0 and message in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
    assert tinyvla.resume_point(out, "last", 500, 3) == str(complete)
    # killed while saving final/ at max_steps: the same command again finishes the run by saving it, once
    final_again = [*args, "--resume_from_checkpoint", "last", "--max_steps", str(step)]
    run_cli(*final_again)
    assert weights(out / "final").keys() == weights(complete).keys()
    assert all(torch.equal(v, weights(complete)[k]) for k, v in weights(out / "final").items())
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *final_again], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and f"{out / 'final'} is saved and the run has reached max_steps {step}: nothing left" \
        in r.stderr.splitlines()[-1]
    # one more step: final/ is one step from `complete`, and `step` + 1 from the base model
    r = run_cli(*args, "--resume_from_checkpoint", "last", "--max_steps", step + 1)
    assert f"{partial} is incomplete" in r.stderr
    final, saved, base = weights(out / "final"), weights(complete), weights(tiny_model)
    dist = lambda a, b: sum(float((a[k] - b[k]).norm()) for k in a)
    assert dist(final, saved) < 0.5 * dist(final, base)


def test_a_single_episode_trains_without_validation(tiny_model, tmp_path):
    """A first try on one's own robot: one recorded episode. Nothing to hold out: it trains, and says so."""
    out = tmp_path / "run"
    r = run_cli(*train_args(tiny_model, tiny.make_dataset(tmp_path / "one", episodes=1), out, "--max_steps", 2))
    assert "has a single episode: none is held out" in r.stderr and (out / "final/model.safetensors").exists()


def test_dataloader_workers_whatever_pythons_start_method(tiny_model, dataset_v2, tmp_path):
    """Python 3.14 starts processes by forkserver by default, which would pickle the dataset: workers are forked."""
    out = tmp_path / "run"
    args = train_args(tiny_model, dataset_v2, out, "--dataloader_num_workers", 2, "--max_steps", 2,
                      "--eval_strategy", "no")
    script = f"import multiprocessing as mp, tinyvla; mp.set_start_method('forkserver'); tinyvla.main({args!r})"
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (out / "final/model.safetensors").exists(), r.stderr[-3000:]


def test_only_the_writer_rank_writes_the_run_info(tiny_model, dataset_v2, tmp_path, monkeypatch):
    """transformers calls _save on every rank; the run config and action stats are rank 0's to write."""
    trainer = tinyvla.make_trainer(*tinyvla.parse_args(train_args(tiny_model, dataset_v2, tmp_path / "run")))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda args: False))  # another rank
    trainer.save_model(str(tmp_path / "other"))
    assert not (tmp_path / "other" / tinyvla.RUN_CONFIG).exists()
    monkeypatch.undo()
    trainer.save_model(str(tmp_path / "writer"))
    assert (tmp_path / "writer" / tinyvla.RUN_CONFIG).exists() and (tmp_path / "writer" / tinyvla.ACTION_STATS).exists()


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


@pytest.mark.parametrize("lora", [False, True])
def test_two_process_cpu_run(lora, tiny_model, dataset_v2, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tinyvla.py"), *train_args(tiny_model, dataset_v2, out, "--eval_strategy", "no", "--use_lora",
                                                 lora, "--resume_from_checkpoint", "last", "--save_steps", 4)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("UserWarning: no complete checkpoint") == 1  # said once, not once a process
    assert "find_unused_parameters" not in r.stderr  # DDP is told every trained weight gets a gradient (it does)
    # both ranks consumed data: an epoch is ceil(n / (2 per device x 2 processes)) steps, of which 4 were taken
    epochs = [float(x) for x in re.findall(r"'epoch': '([0-9.]+)'", r.stdout + r.stderr)]
    n_train = len(tinyvla.build_datasets(tinyvla.DataArgs(repo_id=str(dataset_v2)), seed=42)[0])
    assert epochs and abs(epochs[-1] - 4 / -(-n_train // 4)) < 1e-3, (epochs, n_train)
    assert (out / "final" / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    assert (out / "final" / tinyvla.ACTION_STATS).exists()


def test_resume_on_other_data_or_settings_is_one_line(tiny_model, tmp_path):
    """A resumed run goes on with the task its checkpoint learned: not with a grown dataset (new action bounds; or the
    same bounds and tasks but other val episodes), another --seed (another split) nor another horizon; a moved copy
    of the same data is fine."""
    make = lambda name, n, same: tiny.make_dataset(tmp_path / name, episodes=n, length=(6, 8), task_actions=same)
    data, out = make("data", 8, True), tmp_path / "run"  # every task in train: the bounds are the tasks' actions
    args = train_args(tiny_model, data, out, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
                      "--eval_strategy", "no")
    run_cli(*args)
    grown, same_bounds = make("grown", 10, False), make("same_bounds", 12, True)
    d = lambda repo, seed=42: tinyvla.build_datasets(tinyvla.DataArgs(repo_id=str(repo)), seed)[2]
    assert {k: v for k, v in d(same_bounds).items() if k != "val_episodes"} == {
        k: v for k, v in d(data).items() if k != "val_episodes"}  # so only the held-out episodes tell them apart
    assert d(data, seed=7)["val_episodes"] != d(data)["val_episodes"]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    changed = "the action bounds, tasks or val episodes (new data or --seed)"
    for extra, message in [(["--horizon", 4], "horizon 8 (now 4)"), (["--use_lora", "true"], "use_lora False"),
                           (["--per_device_train_batch_size", 1], "global batch 2 (now 1: per-device batch x GPUs x "
                            "accumulation; set --gradient_accumulation_steps to keep it)"),
                           (["--repo_id", grown], changed),
                           (["--repo_id", same_bounds], changed), (["--seed", 7], changed)]:
        r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *args, "--resume_from_checkpoint", "last",
                            "--max_steps", "4", *map(str, extra)], capture_output=True, text=True, timeout=300)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and last.startswith(f"tinyvla: error: {out / 'checkpoint-2'} was trained on other "
                                                     "data or settings: ") and message in last, last
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing written
    moved = shutil.copytree(data, tmp_path / "moved")
    run_cli(*args, "--resume_from_checkpoint", "last", "--max_steps", 4, "--repo_id", moved,  # the same batch of 2,
            "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 2)  # as on fewer GPUs
    assert (out / "checkpoint-4").exists()


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


def test_mixed_precision_over_float32_weights_decodes_the_generation_metrics(tiny_model, dataset_v2, tmp_path):
    """--bf16 over float32 weights (the Trainer's autocast): each eval still decodes its samples. The decoder's static
    KV cache takes the weights' dtype, which autocast's bf16 keys and values do not fit: the first eval crashed."""
    r = run_cli(*train_args(tiny_model, dataset_v2, tmp_path / "run", "--bf16", "true", "--max_steps", 2,
                            "--eval_strategy", "steps", "--eval_steps", 2, "--eval_max_batches", 1, "--save_strategy",
                            "no"))
    assert "| val parse rate / mae / mse (last generation eval) | 1 / " in r.stdout


def test_qwen3_vl_trains_and_decodes_as_generate(dataset_v2, tmp_path):
    """Another base model, as a user swaps it in: a Qwen3-VL (interleaved M-RoPE, DeepStack vision, 16 px patches)
    trains through the real CLI, and on it every decoder gives generate()'s actions, row for row."""
    out = tmp_path / "run"
    run_cli(*train_args(tiny.make_model_dir(tmp_path / "qwen3", qwen3=True), dataset_v2, out, "--eval_strategy", "no"))
    policy = tinyvla.Policy(out / "final", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: each row decodes differently, so a mix-up of rows shows
        for p in policy.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    images = [tinyvla.prepare_images(o, policy.d) for o in observations(3, seed=5)]
    args = (policy.model, policy.collator, policy.stats, images, tiny.TASKS[:3])
    plain, ok, _ = tinyvla.predict(*args, "generate")
    assert ok.all() and len({tuple(row) for row in plain.reshape(3, -1)}) == 3
    for decoder, drafts, width in (("speculative", None, 8), ("speculative", [tinyvla.draft(c, 1) for c in plain], 16),
                                   ("static", None, 8)):
        assert np.array_equal(tinyvla.predict(*args, decoder, drafts, width)[0], plain), (decoder, width)


def test_training_learns_each_tasks_actions(tiny_model, tmp_path):
    """Through the real CLI, the tiny model learns each task's own actions, and the final policy acts on them far
    better than the best task-blind guess (the mean action). Fails with labels shifted by a token, the answer
    masked out of the loss, or wrong bounds at decode time."""
    data = tiny.make_dataset(tmp_path / "data", task_actions=True)
    out = tmp_path / "run"
    run_cli(*train_args(tiny_model, data, out, "--max_steps", 120, "--learning_rate", 3e-3, "--lr_scheduler_type",
                        "constant", "--per_device_train_batch_size", 8, "--horizon", 2, "--img_size", 28,
                        "--color_jitter", "false", "--action_mask_aug_pct", 0, "--val_ratio", 0, "--save_strategy",
                        "no"))
    policy = tinyvla.Policy(out / "final", device="cpu")
    frames = np.random.default_rng(1).integers(0, 255, (len(tiny.TASKS), 2, 64, 64, 3), dtype=np.uint8)
    chunks = policy(list(frames), tiny.TASKS)  # unseen frames: only the instruction tells the task
    err = np.abs(chunks - tiny.TASK_ACTIONS[:, None]).mean()
    blind = np.abs(tiny.TASK_ACTIONS.mean(0) - tiny.TASK_ACTIONS).mean()
    assert chunks.shape == (4, 2, 7) and err < 0.25 * blind, (err, blind)  # seen: 0.045 vs 0.49; broken: 0.6
