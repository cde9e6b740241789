"""Tiny local artifacts for offline tests and the smoke run: a random Qwen2.5-VL with a Qwen-like tokenizer, and
small LIBERO-like datasets in the LeRobot v2.1 and v3.0 layouts.

    python tests/tiny.py /tmp/tiny      # writes /tmp/tiny/model, /tmp/tiny/libero, /tmp/tiny/libero_v3
"""

import io
import json
import os
import sys
from fractions import Fraction
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


def make_model_dir(out, tokenizer=None, chat_template=CHAT_TEMPLATE, vocab_size=None, qwen3=False):
    """Save a random 2-layer Qwen2.5-VL (text hidden 64) and its processor to `out`; return the path. qwen3: a
    Qwen3-VL instead (interleaved M-RoPE, DeepStack, 16 px patches, as Qwen3-VL-2B-Instruct's processor config)."""
    import torch
    import transformers as tf

    tokenizer = tokenizer or make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    patch = 16 if qwen3 else 14
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2, **(
                      dict(num_position_embeddings=256, deepstack_visual_indexes=[0, 1]) if qwen3 else
                      dict(window_size=112, fullatt_block_indexes=[1])))
    config = (tf.Qwen3VLConfig if qwen3 else tf.Qwen2_5_VLConfig)(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=2048, rope_parameters=dict(
                             rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                             **({"mrope_interleaved": True} if qwen3 else {})),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],  # no pad id: the real
                         tie_word_embeddings=True),  # config has none (the Trainer sets the tokenizer's, and says so)
        vision_config=vision, tie_word_embeddings=True,  # Qwen3-VL reads it here (2B and 4B tie theirs)
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = (tf.Qwen3VLForConditionalGeneration if qwen3 else tf.Qwen2_5_VLForConditionalGeneration)(config)
    # Like the real checkpoint: sampling with a repetition penalty, which TinyVLA must override at inference.
    model.generation_config.update(do_sample=True, repetition_penalty=1.05, temperature=1e-6, bos_token_id=ids[
        "<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"])
    out = Path(out)
    model.save_pretrained(out)
    image_processor = tf.Qwen2VLImageProcessor(patch_size=patch, size={"shortest_edge": (4 * patch) ** 2,
                                                                       "longest_edge": (2 * patch) ** 2 * 1280})
    processor = (tf.Qwen3VLProcessor if qwen3 else tf.Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
        video_processor=tf.Qwen3VLVideoProcessor() if qwen3 else tf.Qwen2VLVideoProcessor())
    processor.save_pretrained(out)
    return out


def _png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def frame_pixels(index, camera, width, height, rng):
    """A frame that carries its own dataset index and camera as a 4x4 grid of dark/bright cells (survives lossy video
    codecs), over moving waves and noise: at 256x256 in AV1 about 3.5 KB a frame, as lerobot/libero's videos
    (1.9 GB for 2 x 273,465 frames)."""
    bits = ((index << 1 | camera) >> np.arange(16) & 1).reshape(4, 4) * 160
    cells = np.kron(bits, np.ones((-(-height // 4), -(-width // 4))))[:height, :width]
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    waves = 40 + 40 * np.sin((x + 2 * y + 4 * index) / 24)  # at most 160 + 80 + 11: no uint8 overflow
    return np.repeat((cells + waves + rng.integers(0, 12, (height, width)))[..., None], 3, 2).astype(np.uint8)


def read_frame_index(img):
    """(dataset index, camera) written by frame_pixels, read back from a decoded HWC frame of any size."""
    h, w = img.shape[:2]
    cells = img[..., 0].astype(float)[: h // 4 * 4, : w // 4 * 4].reshape(4, h // 4, 4, w // 4).mean((1, 3))
    bits = int(((cells.reshape(-1) > 128) << np.arange(16)).sum())
    return bits >> 1, bits & 1


def write_video(path, frames, fps, codec, start=0):
    """Encode HWC uint8 frames as lerobot does (yuv420p, a keyframe every 2 frames for AV1), timestamps i / fps
    (start: (start + i) / fps, a shifted copy)."""
    import av
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder prints its settings (20 lines per file) unless told so
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        options = {"g": "2", "crf": "30", "preset": "11"} if codec == "av1" else {
            "g": "12", "crf": "23"}  # h264: a longer group of pictures, so a seek decodes forward to the frame
        stream = container.add_stream("libsvtav1" if codec == "av1" else "h264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = start + i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def make_dataset(out, layout="v2.1", episodes=8, length=(12, 20), size=64, seed=0, task_actions=False, video=None,
                 cameras=2, action_dim=7, fps=10):
    """Write a LIBERO-like LeRobot dataset (cameras, state, actions, indices) in the v2.1 or v3.0 layout.
    size: side, or (width, height). video: None (PNG images in the parquet files), "h264" or "av1" (mp4 files; v3.0
    packs 3 episodes per file for the first camera and 2 for the second, so each camera has its own offsets).
    Every frame carries its dataset index (read_frame_index). task_actions: every frame of a task repeats that task's
    own action (learnable from the instruction alone)."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    rng, out = np.random.default_rng(seed), Path(out)
    width, height = (size, size) if isinstance(size, int) else size
    v3 = layout == "v3.0"
    keys = (["observation.images.image", "observation.images.image2", "observation.state", "action"] if v3
            else ["image", "wrist_image", "state", "actions"])
    cams, keys = keys[:cameras], keys[2:]
    features = Features({**({} if video else {c: ImageFeature() for c in cams}),
                         keys[0]: Sequence(Value("float32"), length=8),
                         keys[1]: Sequence(Value("float32"), length=action_dim), "timestamp": Value("float32"),
                         "frame_index": Value("int64"), "episode_index": Value("int64"), "index": Value("int64"),
                         "task_index": Value("int64")})
    episode_tables, index, lengths, pixels = [], 0, [], []
    for ep in range(episodes):
        n = int(rng.integers(length[0], length[1] + 1))
        lengths.append(n)
        scale = np.resize(np.array([1, 1, 1, 0.3, 0.3, 0.3], np.float32), action_dim)
        actions = (rng.uniform(-1, 1, (n, action_dim)) * scale).astype(np.float32)
        actions[:, -1] = np.sign(actions[:, -1]) + (actions[:, -1] == 0)  # a gripper: -1 or 1
        if task_actions:
            actions[:] = TASK_ACTIONS[ep % len(TASKS)][-action_dim:]
        pixels.append([[frame_pixels(index + i, c, width, height, rng) for i in range(n)] for c in range(cameras)])
        episode_tables.append({
            **({} if video else {cam: [{"bytes": _png(img), "path": None} for img in imgs]
                                 for cam, imgs in zip(cams, pixels[-1])}),
            keys[0]: rng.normal(size=(n, 8)).astype(np.float32).tolist(), keys[1]: actions.tolist(),
            "timestamp": (np.arange(n) / fps).astype(np.float32).tolist(), "frame_index": list(range(n)),
            "episode_index": [ep] * n, "index": list(range(index, index + n)), "task_index": [ep % len(TASKS)] * n})
        index += n
    (out / "meta").mkdir(parents=True, exist_ok=True)
    info = {"codebase_version": layout, "robot_type": "panda", "total_episodes": episodes, "total_frames": index,
            "total_tasks": len(TASKS), "chunks_size": 1000, "fps": fps,
            "features": {k: {"dtype": "image", "shape": [height, width, 3]} if isinstance(v, ImageFeature) else
                         {"dtype": getattr(v, "feature", v).dtype, "shape": [getattr(v, "length", 1)]}
                         for k, v in features.items()}}  # as lerobot writes them: image, float32, int64, video
    for cam in cams if video else ():
        info["features"][cam] = {"dtype": "video", "shape": [height, width, 3], "info": {"video.codec": video}}
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
        info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        episodes_meta = {"episode_index": list(range(episodes)), "length": lengths,
                         "data/chunk_index": [0] * episodes, "data/file_index": [int(ep >= episodes // 2)
                                                                                 for ep in range(episodes)]}
        for c, cam in enumerate(cams if video else ()):
            per_file = 3 - c  # the cameras' files roll over at different episodes
            for f in range(-(-episodes // per_file)):
                eps = range(f * per_file, min((f + 1) * per_file, episodes))
                write_video(out / info["video_path"].format(video_key=cam, chunk_index=0, file_index=f),
                            [img for ep in eps for img in pixels[ep][c]], fps, video)
            starts = [sum(lengths[ep - ep % per_file: ep]) / fps for ep in range(episodes)]
            episodes_meta.update({f"videos/{cam}/chunk_index": [0] * episodes,
                                  f"videos/{cam}/file_index": [ep // per_file for ep in range(episodes)],
                                  f"videos/{cam}/from_timestamp": starts})
        (out / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(episodes_meta).to_parquet(out / "meta/episodes/chunk-000/file-000.parquet")
    else:
        for ep, table in enumerate(episode_tables):
            path = out / f"data/chunk-000/episode_{ep:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(table, features=features).to_parquet(str(path))
            for c, cam in enumerate(cams if video else ()):
                write_video(out / f"videos/chunk-000/{cam}/episode_{ep:06d}.mp4", pixels[ep][c], fps, video)
        with open(out / "meta/tasks.jsonl", "w") as f:
            f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        info["video_path"] = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    (out / "meta/info.json").write_text(json.dumps(info, indent=2))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tinyvla-tiny")
    print(make_model_dir(root / "model"), make_dataset(root / "libero"), make_dataset(root / "libero_v3", "v3.0"))
