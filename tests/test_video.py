"""Video-encoded LeRobot datasets: the frame of row t is frame t (both layouts, both codecs, two cameras with their
own file offsets), loud failures for anything else, and an own-robot dataset (D = 6, 30 fps, one 640x480 camera)
trained end to end through the CLI."""
import gc
import json
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from test_config import snapshot
from test_train import run_cli

import tiny
import tinyvla
from conftest import ROOT, train_args

V3_KEYS = dict(image_keys=["observation.images.image", "observation.images.image2"], action_key="action")


@pytest.fixture(scope="module")
def video_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    return {(layout, codec): tiny.make_dataset(root / f"{layout}_{codec}", layout, video=codec, seed=1)
            for layout in ("v2.1", "v3.0") for codec in ("h264", "av1")}


def data_args(repo, layout, **kw):
    return tinyvla.DataArgs(repo_id=str(repo), **{"val_ratio": 0.25, **(V3_KEYS if layout == "v3.0" else {}), **kw})


@pytest.mark.parametrize("layout", ["v2.1", "v3.0"])
@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_each_row_gets_its_own_frame_from_each_camera(layout, codec, video_datasets):
    """Every frame carries its dataset index: a wrong file, offset or timestamp rounding shows as another index.
    v3.0 packs 3 (camera 1) and 2 (camera 2) episodes per video file, so each camera has its own offsets."""
    d = data_args(video_datasets[layout, codec], layout)
    train, val, _ = tinyvla.build_datasets(d, seed=0)
    for ds in (train, val):
        for i in np.random.default_rng(0).permutation(len(ds)):  # random access, as a shuffled DataLoader reads
            row = int(ds.rows[i])  # the rows are sorted by (episode, frame): row r is dataset index r
            assert [tiny.read_frame_index(f) for f in ds.frames(row)] == [(row, 0), (row, 1)]
    sample = val[0]
    assert tuple(sample["images"][0].shape) == (3, 224, 448) and len(sample["answer"].split()) == 56


def test_a_video_whose_timestamps_do_not_match_fails_loudly(video_datasets, tmp_path):
    """Episode 0's wrist video re-encoded at 5 fps (the dataset says 10): frame 1 is not there, and its neighbour
    must not be returned instead. (4 s of video: as long as the episode, so the check at load passes.)"""
    data = shutil.copytree(video_datasets["v2.1", "h264"], tmp_path / "data")
    frames = [tiny.frame_pixels(i, 1, 64, 64, np.random.default_rng(0)) for i in range(0, 40, 2)]
    tiny.write_video(data / "videos/chunk-000/wrist_image/episode_000000.mp4", frames, 5, "h264")
    train, val, _ = tinyvla.build_datasets(data_args(data, "v2.1", val_ratio=0.0), seed=0)
    assert tiny.read_frame_index(train.frames(2, ["wrist_image"])[0]) == (2, 1)  # frame 2 exists at 0.2 s
    with pytest.raises(tinyvla.TinyVLAError, match=r"episode_000000.mp4 has no frame at 0.100s \(frame 1, the next "
                                                   r"is at 0.200s\): it does not match the dataset's timestamps"):
        train.frames(1, ["wrist_image"])


def test_dataloader_workers_read_many_videos_in_random_order(tmp_path):
    """80 video files (more than a worker keeps open) read by a DataLoader worker forked after the main process had
    opened and decoded some: every frame is right, and nothing hangs (a forked worker freeing an inherited decoder
    that owns threads would)."""
    import torch
    data = tiny.make_dataset(tmp_path / "many", episodes=40, length=(6, 8), video="h264")
    train, _, _ = tinyvla.build_datasets(data_args(data, "v2.1", val_ratio=0.0), seed=0)  # decodes row 0 here

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            if i % 16 == 0:  # what happens sooner or later anyway: containers evicted from the cache are freed
                gc.collect()
            return int(train.rows[i]), [tiny.read_frame_index(f) for f in train.frames(train.rows[i])]

    loader = torch.utils.data.DataLoader(Indices(), batch_size=None, shuffle=True, num_workers=1, timeout=120,
                                         generator=torch.Generator().manual_seed(0))  # hangs: timeout error
    seen = [(row, frames) for row, frames in loader]
    assert len(seen) == len(train) and all(list(map(tuple, f)) == [(row, 0), (row, 1)] for row, f in seen)
    # and here, with no garbage collection in between: a file leaving the cache is closed, not left open
    open_files = lambda: len(os.listdir("/proc/self/fd"))
    gc.collect()
    gc.disable()
    try:
        before = open_files()
        for row in train.rows:
            train.frames(row)
        assert open_files() - before <= tinyvla.MAX_OPEN_VIDEOS  # of 80 files read ("Too many open files", later)
    finally:
        gc.enable()


def test_a_bad_frame_met_in_a_dataloader_worker_is_one_line(video_datasets, tiny_model, tmp_path):
    data = shutil.copytree(video_datasets["v2.1", "h264"], tmp_path / "data")
    for ep in range(8):  # every wrist video at 5 fps: frame 0 is there (the load check passes), odd frames are not
        frames = [tiny.frame_pixels(i, 1, 64, 64, np.random.default_rng(0)) for i in range(0, 24, 2)]
        tiny.write_video(data / f"videos/chunk-000/wrist_image/episode_{ep:06d}.mp4", frames, 5, "h264")
    r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *train_args(
        tiny_model, data, tmp_path / "run", "--dataloader_num_workers", 1, "--max_steps", 8, "--eval_strategy", "no",
        "--save_strategy", "no")], capture_output=True, text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.fullmatch(r"tinyvla: error: \S+wrist_image/episode_\d+\.mp4 has no frame at \d\.\d{3}s \(frame \d+, the "
                        r"next is at \d\.\d{3}s\): it does not match the dataset's timestamps", last), last


def test_bad_video_datasets_are_one_line_before_anything_is_written(video_datasets, tiny_model, tmp_path):
    work = tmp_path / "work"
    source = video_datasets["v3.0", "h264"]
    cases = {}
    data = cases["missing"] = shutil.copytree(source, work / "missing")
    (data / "videos/observation.images.image2/chunk-000/file-001.mp4").unlink()
    data = cases["codec"] = shutil.copytree(source, work / "codec")
    for f in data.glob("videos/observation.images.image/*/*.mp4"):  # a codec no decoder knows: avc1 renamed
        f.write_bytes(f.read_bytes().replace(b"avc1", b"zzzz"))
    for name, start, keep in (("short", 0, slice(0, -1)), ("shifted", 2, slice(None))):  # its last frame lost; a
        data = cases[name] = shutil.copytree(source, work / name)  # copy with timestamps 2 frames late
        video = data / "videos/observation.images.image/chunk-000/file-000.mp4"
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        tiny.write_video(video, frames[keep], 10, "h264", start)
    data = cases["torn"] = shutil.copytree(source, work / "torn")  # an interrupted copy
    video = data / "videos/observation.images.image/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[:video.stat().st_size // 2])
    data = cases["camera"] = shutil.copytree(source, work / "camera")
    data = cases["nan"] = shutil.copytree(source, work / "nan")
    import pyarrow.parquet as pq
    path = data / "data/chunk-000/file-001.parquet"
    table = pq.read_table(path).to_pydict()
    table["action"][3][2] = float("inf")
    pq.write_table(pq.read_table(path).from_pydict(table, schema=pq.read_schema(path)), path)
    expected = {"missing": r"video files of observation.images.image2 are missing \(1, e.g. .*file-001.mp4\); download",
                "codec": r"cannot decode .*observation.images.image/chunk-000/file-000.mp4 .*re-encode the videos",
                "short": r"file-000.mp4 holds 0.000-\d\.\d{3}s of video, but the dataset reads it from 0 to "
                         r"\d\.\d{3}s: a cut or shifted file; download or re-encode it",
                "shifted": r"file-000.mp4 holds 0.200-\d\.\d{3}s of video, but the dataset reads it from 0 to",
                "torn": r"file-000.mp4 is not a readable video \(.+\); download it again",
                "camera": r"has no feature \['observation.images.wrist'\] \(it has \[.*'observation.images.image2'",
                "nan": r"action is NaN or inf in 1 frames, the first in episode 4 frame 3"}
    for name, message in expected.items():
        keys = ["observation.images.image", "observation.images.wrist" if name == "camera" else
                "observation.images.image2"]
        before = snapshot(work)
        with pytest.raises(SystemExit) as exit_:
            tinyvla.main(["--model_id", str(tiny_model), "--repo_id", str(cases[name]), "--output_dir",
                          str(work / "run"), "--action_key", "action", "--image_keys", *keys])
        line = str(exit_.value.code)
        assert line.startswith("tinyvla: error: ") and "\n" not in line, line
        assert re.search(message, line), line
        assert snapshot(work) == before


def test_own_robot_video_dataset_trains_end_to_end(tiny_model, tmp_path):
    """An SO-100-like recording: 6-dim actions, 30 fps, one 640x480 AV1 camera. Through the CLI the policy learns
    each task's action and answers with 6-dim chunks; the prompt says 6 dimensions."""
    data = tiny.make_dataset(tmp_path / "so100", "v3.0", video="av1", cameras=1, action_dim=6, fps=30,
                             size=(640, 480), length=(10, 14), task_actions=True)
    out = tmp_path / "run"
    run_cli(*train_args(tiny_model, data, out, "--image_keys", "observation.images.image", "--action_key", "action",
                        "--max_steps", 120, "--learning_rate", 3e-3, "--lr_scheduler_type", "constant",
                        "--per_device_train_batch_size", 8, "--horizon", 2, "--img_size", 28, "--color_jitter",
                        "false", "--action_mask_aug_pct", 0, "--val_ratio", 0, "--save_strategy", "no"))
    stats = json.loads((out / "final" / tinyvla.ACTION_STATS).read_text())
    assert len(stats["global"]["lo"]) == 6
    policy = tinyvla.Policy(out / "final", device="cpu")
    assert "Each action has 6 dimensions" in policy.collator.system
    frames = np.random.default_rng(1).integers(0, 255, (len(tiny.TASKS), 1, 480, 640, 3), dtype=np.uint8)
    chunks = policy(list(frames), tiny.TASKS)
    want = tiny.TASK_ACTIONS[:, 1:]
    err, blind = np.abs(chunks - want[:, None]).mean(), np.abs(want.mean(0) - want).mean()
    assert chunks.shape == (4, 2, 6) and err < 0.25 * blind, (err, blind)
