"""Unit tests: action text, digit masking, images, dataset layouts, splits, suite filtering, collator labels."""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import QWEN_DIR, needs_shared

import tiny
import tinyvla


def data_args(repo, **kw):
    d = tinyvla.DataArgs(repo_id=str(repo), **kw)
    if repo is not None and "v3" in str(repo) and "image_keys" not in kw:
        d.image_keys, d.action_key = ["observation.images.image", "observation.images.image2"], "action"
    return d


def test_action_text_round_trip_within_half_a_bin():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-1.0] * 6 + [-1.0]), np.array([1.0] * 6 + [1.0])
    lo[3:6], hi[3:6] = -0.3, 0.4
    actions = rng.uniform(lo, hi, (8, 7))
    text = tinyvla.actions_to_text(actions, lo, hi, 1000)
    assert len(text.split()) == 56 and all(0 <= int(v) <= 1000 for v in text.split())
    back = tinyvla.text_to_actions(text, lo, hi, 1000, 8)
    assert np.all(np.abs(back - actions) <= (hi - lo) / 1000 / 2 + 1e-12)
    # out-of-range actions clip to the ends; malformed text does not parse
    assert tinyvla.actions_to_text(np.array([[5.0] * 7]), lo, hi, 1000) == " ".join(["1000"] * 7)
    assert tinyvla.text_to_actions("1 2 x", lo, hi, 1000, 1) is None
    assert tinyvla.text_to_actions(" ".join(["5"] * 55), lo, hi, 1000, 8) is None
    assert tinyvla.text_to_actions(" ".join(["1001"] * 56), lo, hi, 1000, 8) is None


def test_digit_masking_touches_only_digits():
    text = "512 0 1000 77 3 999 12"
    rng, n_unmasked, fractions = random.Random(0), 0, []
    for _ in range(500):
        masked = tinyvla.mask_digits(text, 0.4, rng)
        assert len(masked) == len(text)
        assert [i for i, c in enumerate(masked) if c == " "] == [i for i, c in enumerate(text) if c == " "]
        assert all(m == t or (m == "?" and t.isdigit()) for m, t in zip(masked, text))
        n_unmasked += masked == text
        fractions.append(masked.count("?") / sum(c.isdigit() for c in text))
    assert max(fractions) <= 0.4 and max(fractions) > 0.2  # U(0, pct) of the digits
    assert 0.05 < n_unmasked / 500 < 0.3  # 10% never masked, plus draws that round down to zero digits
    assert tinyvla.mask_digits(text, 0.0, rng) == text


@pytest.mark.parametrize("tile", [True, False])
def test_image_shapes(tile):
    d = tinyvla.DataArgs(tile_images=tile)
    frames = [np.random.randint(0, 255, (256, 256, 3), np.uint8) for _ in range(2)]
    for train in (True, False):
        out = tinyvla.prepare_images(frames, d, random.Random(0) if train else None)
        assert [tuple(x.shape) for x in out] == ([(3, 224, 448)] if tile else [(3, 224, 224)] * 2)
        assert out[0].dtype == torch.uint8
    # eval: the centre crop (224 of 256 at 0.875: from 16), no jitter; the left half of the tile is the agent view
    a, img = tinyvla.prepare_images(frames, d), torch.from_numpy(frames[0]).permute(2, 0, 1)
    assert torch.equal(a[0][:, :, :224], F.resized_crop(img, 16, 16, 224, 224, [224, 224], antialias=True))
    single = tinyvla.prepare_images(frames[:1], tinyvla.DataArgs(tile_images=False))[0]
    assert torch.equal(a[0][:, :, :224], single)
    # training jitter is drawn once for all cameras (VLA-0 jitters its stacked images): same frame in, same out
    full = tinyvla.DataArgs(crop_ratio=1.0, tile_images=tile)
    same = tinyvla.prepare_images([frames[0]] * 2, full, random.Random(0))
    halves = torch.chunk(same[0], 2, dim=2) if tile else same
    plain = tinyvla.prepare_images([frames[0]], full)[0][:, :, :224]
    assert torch.equal(halves[0], halves[1]) and not torch.equal(halves[0], plain)  # jittered, alike


def test_a_training_samples_draws_follow_from_seed_epoch_and_index(dataset_v2):
    """Crops, jitter and masks are the same for the same sample again, new in another epoch or with another seed, and
    leave torch's and Python's generators as they were (the Trainer saves and restores them; dropout uses them)."""
    train, val, _ = tinyvla.build_datasets(data_args(dataset_v2), seed=42)
    before = torch.get_rng_state(), random.getstate()

    def draw(epoch, seed=42, i=5):
        train.epoch, train.seed = epoch, seed
        return train[i]
    a = draw(0)
    assert torch.equal(a["images"][0], draw(0)["images"][0]) and a["answer"] == draw(0)["answer"]
    for other in (draw(1), draw(0, seed=43)):
        assert not torch.equal(a["images"][0], other["images"][0])
    frames = train.frames
    train.frames = lambda r: frames(train.rows[5])  # every sample the same frames: their draws differ by index
    assert torch.equal(a["images"][0], draw(0)["images"][0])
    assert not torch.equal(a["images"][0], draw(0, i=6)["images"][0])
    assert len({draw(epoch)["answer"] for epoch in range(10)}) > 5  # masks: 10 % of draws none, else a new set
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    val.epoch, val.seed = 3, 7  # val: no draws, whatever the epoch and seed (the centre crop, no masks)
    assert "?" not in val[0]["answer"] and torch.equal(val[0]["images"][0], tinyvla.prepare_images(
        val.frames(val.rows[0]), val.d)[0])


def test_jitter_is_the_same_whatever_the_thread_count():
    """A DataLoader worker jitters on one thread, the main process (no workers) on many: one camera's contrast mean
    would round differently there (18 of 200 images, unpinned), and a resume with another worker count would differ."""
    d, rng = tinyvla.DataArgs(image_keys=["image"], tile_images=False), np.random.default_rng(0)
    frames = [rng.integers(0, 255, (256, 256, 3), np.uint8) for _ in range(200)]
    draws = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        draws.append([tinyvla.prepare_images([f], d, random.Random(i))[0] for i, f in enumerate(frames)])
        assert torch.get_num_threads() == threads  # and it is set back
    assert all(torch.equal(a, b) for a, b in zip(*draws))


@pytest.mark.parametrize("layout", ["v2", "v3"])
def test_dataset_layouts_split_and_chunks(layout, dataset_v2, dataset_v3):
    repo = dataset_v2 if layout == "v2" else dataset_v3
    d = data_args(repo, horizon=8, val_ratio=0.25)
    train, val, stats = tinyvla.build_datasets(d, seed=0)
    # whole episodes: no episode in both splits; every frame is in exactly one split
    ep_of = lambda ds: {int(ds.ep_end[r]) for r in ds.rows}
    assert not ep_of(train) & ep_of(val)
    assert len(train) + len(val) == len(train.actions)
    assert len(ep_of(val)) == 2  # 0.25 of 8 episodes
    # the chunk is the next H actions, the last one repeated past the episode's end
    last = train.rows[np.argmax(train.ep_end[train.rows])]  # some row; find the final frame of its episode
    end_row = train.ep_end[last] - 1
    i = int(np.flatnonzero(train.rows == end_row)[0])
    assert np.allclose(train.chunk(i), np.repeat(train.actions[end_row][None], 8, 0))
    i = int(np.flatnonzero(train.rows == end_row - 2)[0])
    assert np.allclose(train.chunk(i)[:3], train.actions[end_row - 2:end_row + 1])
    assert np.allclose(train.chunk(i)[3:], train.actions[end_row])
    # bounds come from the train split only (the val split holds actions beyond them: the check can tell)
    lo, hi = train.actions[train.rows].min(0), train.actions[train.rows].max(0)
    assert np.allclose(stats["global"]["lo"], lo) and np.allclose(stats["global"]["hi"], hi)
    assert (train.actions[val.rows] < lo).any() or (train.actions[val.rows] > hi).any()
    sample = val[0]
    assert set(sample) == {"images", "task", "answer"} and sample["task"] in tiny.TASKS
    assert "?" not in sample["answer"] and len(sample["answer"].split()) == 56
    assert tuple(sample["images"][0].shape) == (3, 224, 448)


def test_images_without_image_metadata_and_a_one_dim_action(tmp_path):
    """Older lerobot v3.0 writers stored images as plain {bytes, path} structs, without the parquet metadata that
    makes `datasets` decode them; a 1-dim action is stored as a scalar. Both read as the same frames and actions."""
    import datasets
    import pyarrow.parquet as pq
    src = tiny.make_dataset(tmp_path / "v3", "v3.0", episodes=3, length=(6, 8), action_dim=1)
    import shutil
    old = shutil.copytree(src, tmp_path / "v3_old_writer")
    for f in sorted(old.glob("data/*/*.parquet")):
        df = pq.read_table(f).to_pandas()  # images as {bytes, path} dicts
        df["action"] = df["action"].map(lambda a: float(a[0]))
        datasets.Dataset.from_dict(df.to_dict(orient="list")).to_parquet(str(f))
    assert "image" not in str(datasets.Dataset.from_parquet(str(f)).features["observation.images.image"]).lower()
    new, ref = (tinyvla.build_datasets(data_args(r, val_ratio=0), seed=0)[0] for r in (old, src))
    assert len(new) == len(ref) and new.actions.shape == ref.actions.shape == (len(ref), 1)
    assert np.array_equal(new.actions, ref.actions) and new.chunk(3).shape == (8, 1)
    for r in (0, 5, len(ref) - 1):
        assert all(np.array_equal(a, b) for a, b in zip(new.frames(r), ref.frames(r)))
        assert tiny.read_frame_index(new.frames(r)[0]) == tiny.read_frame_index(ref.frames(r)[0])


def test_missing_feature_or_dataset_is_one_clear_error(dataset_v2, tmp_path):
    with pytest.raises(tinyvla.TinyVLAError, match=r"no feature \['nope'\].*it has .*wrist_image.*--image_keys"):
        tinyvla.build_datasets(data_args(dataset_v2, image_keys=["image", "nope"]), 0)
    with pytest.raises(tinyvla.TinyVLAError, match="not a LeRobot dataset"):
        tinyvla.build_datasets(data_args(tmp_path), 0)


# ----------------------------------------------------------------------------- collator
def _collate(processor, d, samples, side):
    return tinyvla.Collator(processor, d, 7, padding_side=side)(samples)


@pytest.mark.parametrize("side", ["left", "right"])
def test_supervised_tokens_are_exactly_the_answer_and_the_turns_end(side, tiny_model):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_model)
    d = tinyvla.DataArgs(horizon=2)
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    answers = ["1 20 300 1000 0 5 6 7 8 9 10 11 12 13", "999 0 0 0 1 2 3 4 5 6 7 8 9 100"]
    tasks = ["pick up the alphabet soup and place it in the basket", "open it"]  # different prompt lengths
    samples = [{"images": tinyvla.prepare_images(frames, d), "task": t, "answer": a} for t, a in zip(tasks, answers)]
    batch = _collate(processor, d, samples, side)
    tok = processor.tokenizer
    for i, answer in enumerate(answers):
        labels = batch["labels"][i]
        assert tok.decode(labels[labels != -100]) == answer + "<|im_end|>\n"
        # supervised positions hold the same ids as the input, and every one is attended to
        sup = labels != -100
        assert torch.equal(batch["input_ids"][i][sup], labels[sup]) and batch["attention_mask"][i][sup].all()
    pad_col = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_col] == 0).any()  # one row is padded, on the chosen side
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ((batch["input_ids"] == image_id).sum(1) == 128).all()  # tiled 448x224 at 224*224*2 pixels
    assert batch["pixel_values"].shape[0] == 2 * 512 and batch["image_grid_thw"].tolist() == [[1, 16, 32]] * 2


def test_masked_digits_are_input_but_never_supervised(tiny_model):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_model)
    d = tinyvla.DataArgs(horizon=1, tile_images=False)
    sample = {"images": tinyvla.prepare_images([np.zeros((64, 64, 3), np.uint8)] * 2, d), "task": "go",
              "answer": "1?3 4?? 0 1000 ?7 8 ?"}
    batch = _collate(processor, d, [sample], "right")
    tok, labels, ids = processor.tokenizer, batch["labels"][0], batch["input_ids"][0]
    q = tok.convert_tokens_to_ids(tok.tokenize("?"))[0]
    assert (ids == q).sum() == 5 and not (labels == q).any()
    assert tok.decode(labels[labels != -100]) == "13 4 0 1000 7 8 <|im_end|>\n"
    # two untiled 224x224 images give 64 vision tokens each
    assert (ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 128


@needs_shared
def test_real_qwen_tokenizer_ids_and_sample_length():
    from transformers import AutoProcessor
    d = tinyvla.DataArgs()
    processor = AutoProcessor.from_pretrained(QWEN_DIR, size={"shortest_edge": tinyvla.image_pixels(d),
                                                              "longest_edge": tinyvla.image_pixels(d)})
    tok = processor.tokenizer
    assert [tinyvla.single_token_id(tok, str(i)) for i in range(10)] == list(range(15, 25))
    assert tinyvla.single_token_id(tok, " ") == 220 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    rng = np.random.default_rng(0)
    answer = " ".join(str(v) for v in rng.integers(0, 1001, 56))
    sample = {"images": tinyvla.prepare_images([rng.integers(0, 255, (256, 256, 3), np.uint8)] * 2, d),
              "task": "pick up the black bowl between the plate and the ramekin and place it on the plate",
              "answer": answer}
    batch = _collate(processor, d, [sample], "right")
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == answer + "<|im_end|>\n"
    assert (batch["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 128
    assert 400 <= batch["input_ids"].shape[1] <= 470  # about 433 tokens per sample


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=needs_shared)])
def test_a_sample_is_the_reference_conversation_supervised_from_the_answer_on(real, tiny_model):
    """The tokens NVlabs/vla0 trains on: the whole conversation through the chat template, the answer as the assistant's
    turn, supervised from the answer to the end of the text (its "<|im_end|>\\n" too)."""
    from transformers import AutoProcessor
    d = tinyvla.DataArgs()
    processor = AutoProcessor.from_pretrained(QWEN_DIR if real else tiny_model, size={
        "shortest_edge": tinyvla.image_pixels(d), "longest_edge": tinyvla.image_pixels(d)})
    collator = tinyvla.Collator(processor, d, 7)
    answer = " ".join(str(v) for v in np.random.default_rng(0).integers(0, 1001, 56))
    sample = {"images": tinyvla.prepare_images([np.full((256, 256, 3), 90, np.uint8)] * 2, d),
              "task": "put both the alphabet soup and the tomato sauce in the basket", "answer": answer}
    text = processor.apply_chat_template([
        {"role": "system", "content": [{"type": "text", "text": collator.system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["task"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    reference = processor(text=[text], images=[sample["images"]], return_tensors="pt")["input_ids"][0]
    batch, prompt = collator([sample]), len(collator.prompts([sample])["input_ids"][0])
    assert torch.equal(batch["input_ids"][0], reference)
    labels = batch["labels"][0]
    assert (labels[:prompt] == -100).all() and torch.equal(labels[prompt:], reference[prompt:])


@needs_shared
def test_add_vision_id_with_the_real_chat_template():
    """The reference's yaml sets add_vision_id: Qwen's template then writes 'Picture 1: ' before the image."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(QWEN_DIR)
    sample = {"images": [np.zeros((56, 112, 3), np.uint8)], "task": "open the drawer"}
    for flag, expected in ((False, "user\n<|vision_start|>"), (True, "user\nPicture 1: <|vision_start|>")):
        collator = tinyvla.Collator(processor, tinyvla.DataArgs(add_vision_id=flag), 7)
        text = processor.tokenizer.decode(collator.prompts([sample])["input_ids"][0])
        assert expected in text and text.count("Picture") == flag
