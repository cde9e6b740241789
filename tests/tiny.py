"""Tiny local artifacts for offline tests and the smoke run: a random Qwen2.5-VL with a Qwen-like tokenizer, and
small LIBERO-like datasets in the LeRobot v2.1 and v3.0 layouts.

    python tests/tiny.py /tmp/tiny      # writes /tmp/tiny/model, /tmp/tiny/libero, /tmp/tiny/libero_v3
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Real LIBERO task strings (two libero_object, two libero_spatial) so that suite filtering can be tested.
TASKS = [
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
]
TASK_ACTIONS = np.array([[0.9, -0.5, 0.2, 0.1, -0.3, 0.0, 1], [-0.8, 0.6, -0.4, -0.2, 0.3, 0.25, -1],
                         [0.1, 0.9, 0.8, -0.25, -0.1, -0.3, 1], [-0.4, -0.9, -0.7, 0.3, 0.2, 0.1, -1]], np.float32)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer pattern: every digit is its own piece, a space before a digit is its own piece.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "{% if add_vision_id %}Picture {{ loop.index }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    """Byte-level BPE without merges: one token per byte, split like Qwen2 (digits and spaces are single tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})


def make_model_dir(out, tokenizer=None, chat_template=CHAT_TEMPLATE, vocab_size=None):
    """Save a random 2-layer Qwen2.5-VL (text hidden 64) and its processor to `out`; return the path."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = tokenizer or make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Like the real checkpoint: sampling with a repetition penalty, which TinyVLA must override at inference.
    model.generation_config.update(do_sample=True, repetition_penalty=1.05, eos_token_id=ids["<|im_end|>"],
                                   pad_token_id=ids["<|endoftext|>"])
    out = Path(out)
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=chat_template)
    processor.save_pretrained(out)
    return out


def _png(rng, size=64):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(out, layout="v2.1", episodes=8, length=(12, 20), size=64, seed=0, task_actions=False):
    """Write a LIBERO-like LeRobot dataset (images, state, actions, indices) in the v2.1 or v3.0 layout.
    task_actions: every frame of a task repeats that task's own action (learnable from the instruction alone)."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    rng, out = np.random.default_rng(seed), Path(out)
    v3 = layout == "v3.0"
    keys = (["observation.images.image", "observation.images.image2", "observation.state", "action"] if v3
            else ["image", "wrist_image", "state", "actions"])
    features = Features({keys[0]: ImageFeature(), keys[1]: ImageFeature(),
                         keys[2]: Sequence(Value("float32"), length=8), keys[3]: Sequence(Value("float32"), length=7),
                         "timestamp": Value("float32"), "frame_index": Value("int64"),
                         "episode_index": Value("int64"), "index": Value("int64"), "task_index": Value("int64")})
    episode_tables, index, lengths = [], 0, []
    for ep in range(episodes):
        n = int(rng.integers(length[0], length[1] + 1))
        lengths.append(n)
        scale = np.array([1, 1, 1, 0.3, 0.3, 0.3, 1], np.float32)
        actions = (rng.uniform(-1, 1, (n, 7)) * scale).astype(np.float32)
        actions[:, 6] = np.sign(actions[:, 6]) + (actions[:, 6] == 0)
        if task_actions:
            actions[:] = TASK_ACTIONS[ep % len(TASKS)]
        episode_tables.append({
            keys[0]: [{"bytes": _png(rng, size), "path": None} for _ in range(n)],
            keys[1]: [{"bytes": _png(rng, size), "path": None} for _ in range(n)],
            keys[2]: rng.normal(size=(n, 8)).astype(np.float32).tolist(), keys[3]: actions.tolist(),
            "timestamp": (np.arange(n) / 10).astype(np.float32).tolist(), "frame_index": list(range(n)),
            "episode_index": [ep] * n, "index": list(range(index, index + n)), "task_index": [ep % len(TASKS)] * n})
        index += n
    (out / "meta").mkdir(parents=True, exist_ok=True)
    info = {"codebase_version": layout, "robot_type": "panda", "total_episodes": episodes, "total_frames": index,
            "total_tasks": len(TASKS), "chunks_size": 1000, "fps": 10,
            "features": {k: {"dtype": str(v)} for k, v in features.items()}}
    if v3:
        merged = {k: sum((t[k] for t in episode_tables), []) for k in features}
        (out / "data/chunk-000").mkdir(parents=True, exist_ok=True)
        half = sum(lengths[: episodes // 2])  # two files, split at an episode boundary
        ds = Dataset.from_dict(merged, features=features)
        ds.select(range(half)).to_parquet(str(out / "data/chunk-000/file-000.parquet"))
        ds.select(range(half, index)).to_parquet(str(out / "data/chunk-000/file-001.parquet"))
        import pandas as pd
        pd.DataFrame({"task_index": range(len(TASKS))}, index=pd.Index(TASKS, name="task")).to_parquet(
            out / "meta/tasks.parquet")
        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    else:
        for ep, table in enumerate(episode_tables):
            path = out / f"data/chunk-000/episode_{ep:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(table, features=features).to_parquet(str(path))
        with open(out / "meta/tasks.jsonl", "w") as f:
            f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    (out / "meta/info.json").write_text(json.dumps(info, indent=2))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tinyvla-tiny")
    print(make_model_dir(root / "model"), make_dataset(root / "libero"), make_dataset(root / "libero_v3", "v3.0"))
