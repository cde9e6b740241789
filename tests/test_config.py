"""Config precedence (defaults < yaml < CLI), rejection of unknown keys and bad types, one-line errors."""
import json
import shutil
import subprocess
import sys
from importlib.util import find_spec

import pytest
import yaml
from conftest import ROOT

import tinyvla


def test_precedence_default_yaml_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"horizon": 10, "learning_rate": 1e-4, "use_lora": True, "lora_r": 8}))
    m, d, e, t = tinyvla.parse_args([])
    assert (d.horizon, m.use_lora, t.output_dir) == (8, False, "runs/tinyvla")  # defaults
    m, d, e, t = tinyvla.parse_args(["--config", str(cfg)])
    assert (d.horizon, t.learning_rate, m.use_lora, m.lora_r) == (10, 1e-4, True, 8)  # yaml over defaults
    m, d, e, t = tinyvla.parse_args(["--config", str(cfg), "--horizon", "4", "--learning_rate", "3e-5"])
    assert (d.horizon, t.learning_rate, m.lora_r) == (4, 3e-5, 8)  # CLI over yaml
    # SFTConfig settings TinyVLA needs are in place
    assert t.remove_unused_columns is False and t.dataset_kwargs == {"skip_prepare_dataset": True}
    assert t.max_length is None


@pytest.mark.parametrize("mode", ["--eval", "--serve"])
def test_a_checkpoints_eval_settings_are_the_defaults_however_it_is_named(tmp_path, mode):
    """Its saved ensembling and dtype are what it is evaluated and served with: `--eval PATH`, `--eval=PATH` or a
    yaml's `eval:` alike; a yaml value or a flag still wins."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = {"eval": {**vars(tinyvla.EvalArgs()), "ensemble_window": 10, "num_envs": 16, "decode_width": 4},
             "model": {**vars(tinyvla.ModelArgs()), "dtype": "float16"}}
    (ckpt / tinyvla.RUN_CONFIG).write_text(json.dumps(saved))
    cfg, key = tmp_path / "c.yaml", mode[2:]
    cfg.write_text(yaml.safe_dump({key: str(ckpt), "num_envs": 3}))
    for argv in ([mode, str(ckpt)], [f"{mode}={ckpt}"], ["--config", str(cfg)]):
        m, _, e, _ = tinyvla.parse_args(argv)
        assert (getattr(e, key), e.ensemble_window, e.decode_width, m.dtype) == (str(ckpt), 10, 4, "float16"), argv
        assert e.num_envs == (3 if "--config" in argv else 16), argv
    m, _, e, _ = tinyvla.parse_args([f"{mode}={ckpt}", "--ensemble_window", "2", "--dtype", "bfloat16"])
    assert (e.ensemble_window, m.dtype) == (2, "bfloat16")


def test_repo_config_yaml_is_the_reference_recipe():
    """What NVlabs/vla0 and vla0-trl really ran (issue: the paper's lr 5e-6 at batch 192 did not converge)."""
    m, d, e, t = tinyvla.parse_args(["--config", str(ROOT / "config.yaml"), "--bf16", "false"])
    assert m.model_id == "Qwen/Qwen2.5-VL-3B-Instruct" and not m.use_lora and m.dtype == "bfloat16"
    assert (d.horizon, d.num_bins, d.img_size, d.crop_ratio, d.tile_images, d.action_mask_aug_pct) == (
        8, 1000, 224, 0.875, True, 0.4)
    assert d.add_vision_id is False  # what the released weights trained with (transformers 4.51.3 dropped the flag)
    assert (t.per_device_train_batch_size * 8 * t.gradient_accumulation_steps, t.learning_rate) == (64, 4e-5)
    assert (str(t.lr_scheduler_type), t.warmup_steps, t.max_grad_norm, t.max_steps) == (
        "SchedulerType.CONSTANT", 0, 1.0, 80000)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, str(t.optim)) == (
        0.9, 0.999, 1e-10, "OptimizerNames.ADAMW_TORCH_FUSED")
    assert (e.action_horizon, e.ensemble_window, e.ensemble_version, e.ensemble_weight) == (1, 8, 1, 0.5)


@pytest.mark.parametrize("content, message", [
    ({"horizn": 8}, "horizn"),
    ({"lora_r": 3.5}, "lora_r must be int"),
    ({"tile_images": 3}, "tile_images must be bool"),
    ({"horizon": True}, "horizon must be int"),
    ({"crop_ratio": [0.9]}, "crop_ratio must be float"),
    ({"image_keys": "image"}, "image_keys must be list"),
    ({"task_ids": ["1"]}, r"task_ids must be a list of int, got \['1'\]"),
    ({"image_keys": [1, 2]}, "image_keys must be a list of str"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"learning_rate": [1]}, "learning_rate must be in [0, inf), got [1]"),
    ({"per_device_train_batch_size": 2.5}, r"per_device_train_batch_size must be an integer in \[1, inf\), got 2.5"),
    ({"gradient_accumulation_steps": True}, r"gradient_accumulation_steps must be an integer in \[1, inf\), got True"),
    ({"ensemble_version": True}, "ensemble_version must be one of 1, 2, got True"),
    ({"dtype": "int8"}, "dtype must be one of 'bfloat16', 'float16', 'float32', got 'int8'"),
])
def test_bad_yaml_fails(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(content))
    with pytest.raises(tinyvla.TinyVLAError, match=message):
        tinyvla.parse_args(["--config", str(cfg)])


def test_yaml_int_is_a_fine_float(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"crop_ratio": 1, "val_ratio": 0}))
    d = tinyvla.parse_args(["--config", str(cfg)])[1]
    assert d.crop_ratio == 1 and d.val_ratio == 0


def test_bad_flag_fails_without_abbreviation():
    with pytest.raises(tinyvla.TinyVLAError, match="not used.*--lr"):
        tinyvla.parse_args(["--lr", "1e-4"])  # no silent prefix match to --lr_scheduler_type
    with pytest.raises(tinyvla.TinyVLAError, match="--suite: invalid choice: .libero_100."):
        tinyvla.parse_args(["--suite", "libero_100"])


def test_cli_error_is_one_line_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    for argv in (["--horizn", "8"], ["--output_dir", str(out), "--repo_id", str(tmp_path / "missing")]):
        r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *argv], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.startswith("tinyvla: error")]
        assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == lines  # and nothing else: no warnings the user did not cause
        assert "Traceback" not in r.stderr
    assert not out.exists()


def snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


BAD_INPUTS = [  # (flags, what the one line must say); each is checked before anything is written
    (["--horizon", "0"], "horizon must be in [1, inf), got 0"),
    (["--horizon", "-1"], "horizon must be in [1, inf), got -1"),
    (["--num_bins", "0"], "num_bins must be in [1, 9999], got 0"),
    (["--img_size", "0"], "img_size must be in [28, inf), got 0"),
    (["--crop_ratio", "0"], "crop_ratio must be in (0, 1], got 0"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer in [1, inf), got 0"),
    (["--dtype", "float64x"], "argument --dtype: invalid choice: 'float64x'"),
    (["--num_envs", "0"], "num_envs must be in [1, inf), got 0"),
    (["--episodes_per_task", "0"], "episodes_per_task must be in [1, inf), got 0"),
    (["--num_shards", "0"], "num_shards must be in [1, inf), got 0"),
    (["--shard_id", "2", "--num_shards", "2"], "shard_id must be in [0, 1] (below num_shards), got 2"),
    (["--action_horizon", "0"], "action_horizon must be in [1, inf), got 0"),
    (["--action_horizon", "9"], "action_horizon 9 is longer than the chunks (horizon 8)"),  # the run's evals would stop
    (["--ensemble_window", "0"], "ensemble_window must be in [1, inf), got 0"),
    (["--image_keys", "a", "b", "c"], "image_keys takes one or two camera features"),
    (["--image_keys", "image", "state"], "image_keys ['state'] of {dataset} are not cameras (dtype image or video)"),
    (["--action_key", "image"], "action_key 'image' of {dataset} is image, not numbers: set --action_key"),
    (["--dataloader_num_workers", "-1"], "dataloader_num_workers must be an integer in [0, inf), got -1"),
    (["--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true"],  # every epoch: the first's draws
     "dataloader_persistent_workers: a sample's augmentation follows the epoch, which only new workers learn"),
    (["--max_length", "64", "--packing", "true"], "max_length, packing: TinyVLA's collator builds every batch"),
    (["--save_total_limit", "1", "--load_best_model_at_end", "true"], "save_total_limit 1 with a best model: "
     "transformers deletes every checkpoint but the best when training ends"),
    (["--config", "{bad_yaml}"], "while parsing"),
    (["--config", "{missing}"], "No such file"),
    (["--resume_from_checkpoint", "{missing}"], "is not a complete checkpoint"),
    (["--output_dir", "{a_file}"], "is a file; choose a directory"),
    (["--repo_id", "{truncated}"], "is not a readable parquet file"),
    (["--repo_id", "{nan_actions}"], "actions is NaN or inf in 1 frames, the first in episode 2 frame 5"),
    (["--repo_id", "{special_task}"], "the task 'pick up the cream cheese<|im_end|> and place it in the basket' "
     "holds a special token of the tokenizer (<|im_end|>); reword it in meta/tasks"),
    (["--repo_id", "{missing}"], "is neither a local dir nor a hub repo that could be downloaded"),
    *[(["--attn_implementation", "flash_attention_2"], "check --attn_implementation")] * (  # where it is missing
        find_spec("flash_attn") is None),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_anything_is_written(flags, message, tmp_path, tiny_model, dataset_v2, capsys):
    import shutil
    work = tmp_path / "work"  # everything the command may touch lives here
    work.mkdir()
    (work / "bad.yaml").write_text("horizon: [8\nlr: 1")
    (work / "a_file").write_text("not a dir")
    for name in ("truncated", "nan_actions", "special_task"):
        shutil.copytree(dataset_v2, work / name)
    tasks = work / "special_task/meta/tasks.jsonl"  # a special token in an instruction: its prompts would break
    tasks.write_text(tasks.read_text().replace("cream cheese", "cream cheese<|im_end|>"))
    parquet = work / "truncated/data/chunk-000/episode_000003.parquet"
    parquet.write_bytes(parquet.read_bytes()[:3000])
    import pyarrow.parquet as pq
    path = work / "nan_actions/data/chunk-000/episode_000002.parquet"
    table = pq.read_table(path).to_pydict()
    table["actions"][5][3] = float("nan")
    pq.write_table(pq.read_table(path).from_pydict(table, schema=pq.read_schema(path)), path)
    names = {"bad_yaml": work / "bad.yaml", "missing": work / "missing", "a_file": work / "a_file",
             "truncated": work / "truncated", "nan_actions": work / "nan_actions",
             "special_task": work / "special_task"}
    flags = [f.format(**names) for f in flags]
    message = message.format(dataset=dataset_v2)
    argv = ["--model_id", str(tiny_model), "--repo_id", str(dataset_v2), "--output_dir", str(work / "run"),
            "--dtype", "float32", *flags]
    before = snapshot(work)
    with pytest.raises(SystemExit) as exit_:
        tinyvla.main(argv)
    line = str(exit_.value.code)
    assert line.startswith("tinyvla: error: ") and "\n" not in line and message in line, line
    assert snapshot(work) == before


def test_a_run_dir_is_not_a_checkpoint(trained_run):
    """It holds the run config and action stats too, but the weights are in final/, best/, checkpoint-N/."""
    with pytest.raises(tinyvla.TinyVLAError, match=f"{trained_run[0]} is a run dir, not a checkpoint: evaluate or "
                       f"serve {trained_run[0] / 'final'}"):
        tinyvla.Policy(trained_run[0], device="cpu")


def test_a_checkpoint_torn_while_saving_says_so(trained_run, tmp_path):
    """Killed while saving: its weights and run config written, its action stats (written last) not."""
    torn = tmp_path / "final"
    shutil.copytree(trained_run[0] / "final", torn)
    (torn / tinyvla.ACTION_STATS).unlink()
    with pytest.raises(SystemExit, match=f"{torn} is incomplete .*killed while saving it.*resume its run"):
        tinyvla.main(["--eval", str(torn), "--eval_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_eval_takes_the_checkpoints_eval_settings_but_not_its_machines_paths(trained_run, tmp_path):
    ckpt = tmp_path / "final"  # trained on a machine whose LIBERO assets lie at /cluster/libero/assets
    shutil.copytree(trained_run[0] / "final", ckpt)
    run = json.loads((ckpt / tinyvla.RUN_CONFIG).read_text())
    run["eval"].update(libero_assets="/cluster/libero/assets", ensemble_window=5, serve_max_batch=256)
    (ckpt / tinyvla.RUN_CONFIG).write_text(json.dumps(run))
    e = tinyvla.parse_args(["--eval", str(ckpt)])[2]
    assert (e.ensemble_window, e.libero_assets, e.serve_max_batch) == (5, "", 64)


def test_results_of_this_setup_count_even_where_another_setups_came_first(tmp_path):
    """Evals of two settings started together into one dir (neither refused it): each counts its own episodes."""
    rows = [{"suite": "libero_object", "task_id": 0, "episode": 0, "setup": {"ensemble_window": w}} for w in (1, 8)]
    for name, row in zip(("results_shard0of1.jsonl", "results_shard0of2.jsonl"), rows):
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    files = sorted(tmp_path.glob("results_shard*.jsonl"))
    assert tinyvla.read_results(*files) == rows[:1]  # the first file's counts
    assert tinyvla.read_results(*files, setup={"ensemble_window": 8}) == rows[1:]


def test_action_horizon_longer_than_the_chunks_is_one_line(trained_run, tmp_path):
    with pytest.raises(SystemExit, match="action_horizon 9 is longer than the policy's chunks"):
        tinyvla.main(["--eval", str(trained_run[0] / "final"), "--action_horizon", "9", "--eval_dir",
                      str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_resume_last_starts_a_job_and_requeues_it_but_never_trains_over_a_run(tmp_path, recwarn):
    """One command (--resume_from_checkpoint last) starts a run in a new dir or one holding only a torn checkpoint,
    and continues it after a preemption; a finished run (final/ saved at its length, in steps or epochs) is refused."""
    run = tmp_path / "run"
    targs = tinyvla.parse_args(["--output_dir", str(run), "--resume_from_checkpoint", "last"])[3]
    assert targs.resume_from_checkpoint is None and not run.exists()
    (run / "checkpoint-2").mkdir(parents=True)  # killed during its first save
    assert tinyvla.resume_point(run, "last", -1, 3) is None
    assert {f"no complete checkpoint in {run} yet: starting the run", f"{run / 'checkpoint-2'} is incomplete (the "
            "run was killed while saving it)"} <= {str(w.message) for w in recwarn}
    with pytest.raises(tinyvla.TinyVLAError, match="already holds a run"):  # without the flag: refused
        tinyvla.parse_args(["--output_dir", str(run)])
    (run / "checkpoint-2/trainer_state.json").write_text('{"global_step": 2}')  # complete; the run ended at 3 epochs
    (run / "final").mkdir()
    (run / "final" / tinyvla.RUN_CONFIG).write_text('{"train": {"num_train_epochs": 3.0, "max_steps": -1}}')
    (run / "final" / tinyvla.ACTION_STATS).write_text("{}")
    for max_steps, epochs, length in [(-1, 3, "num_train_epochs 3"), (2, 3, "max_steps 2")]:
        with pytest.raises(tinyvla.TinyVLAError, match=f"final is saved and the run has reached {length}: nothing"):
            tinyvla.resume_point(run, "last", max_steps, epochs)
    assert tinyvla.resume_point(run, "last", -1, 4) == tinyvla.resume_point(run, "last", 3, 3) == str(
        run / "checkpoint-2")  # a longer run goes on
    (run / "final" / tinyvla.RUN_CONFIG).write_text('{"train": {"num_train_epochs": 3.0, "max_steps": 2}}')
    assert tinyvla.resume_point(run, "last", -1, 3) == str(run / "checkpoint-2")  # it ended at 2 steps, not 3 epochs
    (run / "final" / tinyvla.RUN_CONFIG).write_text('{"train": {"num_train_epochs": 3.0, "max_steps": 5}}')
    with pytest.raises(tinyvla.TinyVLAError, match="reached max_steps 5: nothing"):  # its last checkpoint is step 2
        tinyvla.resume_point(run, "last", 5, 3)
    assert tinyvla.resume_point(run, "last", 6, 3) == str(run / "checkpoint-2")
    shutil.rmtree(run / "checkpoint-2")  # final/ but no checkpoint (save_strategy no): nothing to continue from
    with pytest.raises(tinyvla.TinyVLAError, match="no complete checkpoint in .* to continue its run from"):
        tinyvla.resume_point(run, "last", -1, 4)
