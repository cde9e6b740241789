"""The real LIBERO simulator on CPU (EGL): batched eval with the tiny policy, results, videos, resume."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT


pytest.importorskip("libero", reason="LIBERO not installed (pip install -e '.[dev]')")


def eval_cmd(ckpt, out, *extra):  # out None: the default results dir
    return [sys.executable, str(ROOT / "tinyvla.py"), "--eval", str(ckpt), "--suite", "libero_object", "--task_ids",
            "0", "--episodes_per_task", "2", "--episode_max_steps", "4", *(["--eval_dir", str(out)] if out else []),
            *map(str, extra)]


def results(out):
    path = out / "results_shard0of1.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_eval_writes_results_table_videos_and_skips_finished(trained_run, tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run(eval_cmd(trained_run[0] / "final", out, "--num_envs", 2), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = results(out)
    assert sorted(x["episode"] for x in rows) == [0, 1] and all(x["steps"] == 4 for x in rows)
    assert {x["init_state"] for x in rows} == {0, 1} and rows[0]["task"].startswith("pick up the alphabet soup")
    assert all(not x["success"] for x in rows)  # a random tiny policy in 4 steps
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert videos == ["libero_object_task0_ep0_failure.mp4", "libero_object_task0_ep1_failure.mp4"]
    import imageio.v3 as iio
    frames = iio.imread(out / videos[0])
    assert frames.shape == (4, 256, 512, 3)  # agent view and wrist side by side, one frame per step
    table = (out / "results.md").read_text()
    assert "| libero_object | 0: pick up the alphabet soup" in table and "0.0%" in table
    final = json.loads((out / "results.json").read_text())
    assert final["per_suite"] == {"libero_object": 0.0} and final["not_standard"] == [
        "task_ids [0]", "episodes_per_task 2", "episode_max_steps 4"]
    assert "8 env steps, 8 policy queries in" in r.stdout and "policy queries/s" in r.stdout
    assert re.search(r"[\d.]+ forward passes per policy call \(speculative decoder\)", r.stdout)
    # the same command again: nothing left to run, nothing counted twice
    r = subprocess.run(eval_cmd(trained_run[0] / "final", out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(results(out)) == 2 and all(x["setup"]["ensemble_window"] == 8 for x in results(out))
    # resumed as two shards (more GPUs): shard 1 finds its episode finished by the one-shard run, and its table
    # counts both episodes, each once
    r = subprocess.run(eval_cmd(trained_run[0] / "final", out, "--shard_id", 1, "--num_shards", 2),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 of 2 episodes finished" in r.stdout and "0 env steps" in r.stdout, r.stderr[-3000:]
    assert not (out / "results_shard1of2.jsonl").read_text()
    # other settings or other weights (best/ rewritten by a later epoch, say): these results are not theirs
    before = (out / "results_shard0of1.jsonl").read_text()
    for ckpt, extra, changed in [("final", ["--ensemble_window", 1], "(ensemble_window 8 (now 1)):"),
                                 ("checkpoint-2", [], "(weights ")]:
        r = subprocess.run(eval_cmd(trained_run[0] / ckpt, out, *extra), capture_output=True, text=True, timeout=600)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and last.startswith(f"tinyvla: error: {out} holds results of other settings") and \
            changed in last and "choose another --eval_dir" in last, last
    assert (out / "results_shard0of1.jsonl").read_text() == before


def test_killed_eval_resumes_to_exactly_all_episodes(trained_run, tmp_path):
    """kill -9 mid-eval, a second eval on the same results file meanwhile, duplicates and a torn line in the file:
    the rerun still counts each episode exactly once."""
    out = tmp_path / "eval"
    cmd = eval_cmd(trained_run[0] / "final", out, "--num_envs", 1, "--save_video", "false", "--episode_max_steps", 30)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "results_shard0of1.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the first eval holds the results file from here on
    os.killpg(proc.pid, signal.SIGSTOP)  # paused (its simulator too), holding it, while a second eval starts
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    while len(results(out)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-episode 1 (30 steps)
    proc.wait()
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("tinyvla: error: another eval is writing")
    assert len(results(out)) == 1
    with open(out / "results_shard0of1.jsonl", "a") as f:
        line = (out / "results_shard0of1.jsonl").read_text()
        f.write(line + line + '{"suite": "libero_obj')  # the same episode twice more, then a torn line
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(x["episode"] for x in results(out)) == [0, 1]  # the file itself is clean again
    assert "2 of 2 episodes finished" in r.stdout and "| 2 | 0.0% |" in (out / "results.md").read_text()


def test_dead_simulator_worker_is_one_line(trained_run, tmp_path):
    import psutil
    out = tmp_path / "eval"
    cmd = eval_cmd(trained_run[0] / "final", out, "--num_envs", 1, "--save_video", "false", "--episode_max_steps", 30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while len(results(out)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1 and len(results(out)) == 1
    workers[0].kill()  # mid-episode 1
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "tinyvla: error: the simulator failed in libero_object task 0 episode 1: its worker process died (exit code "
        "-9) (finished episodes are saved; rerun to resume)")
    # killed while the policy computes its chunk: the chunk is sent to a dead process, and the same one line follows
    argv = eval_cmd(trained_run[0] / "final", tmp_path / "eval2", "--num_envs", 1, "--save_video", "false")[2:]
    script = f"""
import time, psutil, tinyvla
e = tinyvla.parse_args({[str(a) for a in argv]!r})[2]
policy = tinyvla.Policy(e.eval, "cpu")
forward = policy.model.model.forward  # every decoding pass runs the language and vision model
killed = []
def killing(*args, **kwargs):  # the model (transformers'), at the start of the policy's second call
    if policy.calls == 1 and not killed:
        killed.extend(w for w in psutil.Process().children() if "spawn_main" in " ".join(w.cmdline()))
        for worker in killed:
            worker.kill()
            while worker.status() != psutil.STATUS_ZOMBIE:  # dead, its pipe closed; not reaped: the eval reads its
                time.sleep(0.01)  # exit code
    return forward(*args, **kwargs)
policy.model.model.forward = killing
try:
    tinyvla.evaluate_libero(e.eval, e, policy)
except tinyvla.TinyVLAError as err:
    print(err)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == (
        "the simulator failed in libero_object task 0 episode 0: its worker process died (exit code -9) (finished "
        "episodes are saved; rerun to resume)")


def test_a_policy_error_ends_the_eval_with_that_error(trained_run, tmp_path):
    """Whatever the policy raises (an IndexError from an embedding, an OSError) is raised as it is, not taken for
    the end of the episodes (a hang) or for a dead simulator."""
    argv = eval_cmd(trained_run[0] / "final", tmp_path / "eval", "--num_envs", 1, "--save_video", "false")[2:]
    for error in ("IndexError('index out of range in self')", "OSError('disk full')"):
        script = f"""
import tinyvla
e = tinyvla.parse_args({[str(a) for a in argv]!r})[2]
policy = tinyvla.Policy(e.eval, "cpu")
forward = policy.model.model.forward  # every decoding pass runs the language and vision model
def failing(*args, **kwargs):  # the model (transformers'), failing in the policy's third call
    if policy.calls == 2:
        raise {error}
    return forward(*args, **kwargs)
policy.model.model.forward = failing
tinyvla.evaluate_libero(e.eval, e, policy)
"""
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and last == error.replace("('", ": ").replace("')", ""), r.stderr[-2000:]


def test_envs_step_in_lockstep_one_policy_call_for_all(trained_run, tmp_path):
    """Two simulators, an episode of 30 steps each: once both are stepping, one batched policy call answers both (a
    call per observation would make about 60)."""
    r = subprocess.run(eval_cmd(trained_run[0] / "final", tmp_path / "eval", "--num_envs", 2, "--save_video", "false",
                                "--episode_max_steps", 30), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = int(re.search(r"60 env steps, 60 policy queries in (\d+) batched calls", r.stdout)[1])
    assert 30 <= calls <= 45, r.stdout[-2000:]  # 30 + the calls before the second simulator's first observation


def test_action_horizon_queries_every_nth_step(trained_run, tmp_path):
    """Also: by default the results go beside the checkpoints (`--eval .` from inside one too), where the Trainer's
    checkpoint rotation (save_total_limit) does not delete them with the checkpoint; a task named twice runs once; a
    one-camera policy is given one frame (the agent view)."""
    ckpt = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(trained_run[0] / "final", ckpt)
    config = json.loads((ckpt / "tinyvla_config.json").read_text())
    config["data"]["image_keys"] = ["image"]  # as trained with --image_keys image
    (ckpt / "tinyvla_config.json").write_text(json.dumps(config))
    r = subprocess.run(eval_cmd(".", None, "--episodes_per_task", 1, "--episode_max_steps", 3, "--num_envs", 1,
                                "--save_video", "false", "--action_horizon", 2, "--task_ids", 0, 0),
                       capture_output=True, text=True, timeout=900, cwd=ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "libero_eval" / "checkpoint-4"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in (trained_run[0] / "final").iterdir())
    rows = results(out)
    assert len(rows) == 1 and rows[0]["steps"] == 3 and "1 of 1 episodes finished" in r.stdout
    assert "3 env steps, 2 policy queries in" in r.stdout  # action_horizon 2: queried at steps 0 and 2


def test_unknown_checkpoint_or_suite_is_one_line(trained_run, tmp_path):
    r = subprocess.run(eval_cmd(tmp_path, tmp_path / "eval"), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("tinyvla: error:")
    assert "tinyvla_config.json" in r.stderr and not (tmp_path / "eval").exists()
    r = subprocess.run(eval_cmd(trained_run[0] / "final", tmp_path / "eval", "--suite", "libero_100"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        "tinyvla: error: argument --suite: invalid choice: 'libero_100'") and not (tmp_path / "eval").exists()


def test_bad_task_ids_and_assets_are_one_line(trained_run, tmp_path):
    ckpt, out = trained_run[0] / "final", tmp_path / "eval"
    r = subprocess.run(eval_cmd(ckpt, out, "--task_ids", 10), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("tinyvla: error: task_ids [10]")
    r = subprocess.run(eval_cmd(ckpt, out, "--episodes_per_task", 51), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == ("tinyvla: error: episodes_per_task 51: "
                                                                       "libero_object task 0 has 50 init states, one "
                                                                       "episode each")
    r = subprocess.run(eval_cmd(ckpt, out, "--libero_assets", tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "is not LIBERO's assets dir" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()
    # a dir that looks right but holds no meshes: the simulator fails in its worker, and the eval stops in one line
    (tmp_path / "assets/scenes").mkdir(parents=True)
    r = subprocess.run(eval_cmd(ckpt, out, "--libero_assets", tmp_path / "assets", "--num_envs", 1),
                       capture_output=True, text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("tinyvla: error: the simulator failed in libero_object task 0"), last
    assert results(out) == []


def test_shards_end_with_one_combined_table(trained_run, tmp_path):
    """Two shards of one eval in the same dir, at the same time: each writes its own results file, and the table of
    the last one to end covers both."""
    out = tmp_path / "eval"
    procs = [subprocess.Popen(eval_cmd(trained_run[0] / "final", out, "--num_envs", 1, "--save_video", "false",
                                       "--shard_id", shard_id, "--num_shards", 2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for shard_id in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for shard_id in (0, 1):
        rows = [json.loads(line) for line in (out / f"results_shard{shard_id}of2.jsonl").read_text().splitlines()]
        assert [x["episode"] for x in rows] == [shard_id]
    assert any("2 of 2 episodes finished" in stdout for stdout, _ in outputs)
    final = json.loads((out / "results.json").read_text())
    assert sorted(x["episode"] for x in final["episodes"]) == [0, 1] and final["finished"] == final["expected"] == 2
    assert (out / "results.md").read_text().startswith(  # a task's 2 episodes of 4 steps: no suite score
        "**Not LIBERO's standard protocol (task_ids [0], episodes_per_task 2, episode_max_steps 4): no suite score to "
        "compare**\n\n| suite | task | episodes | success |\n|---|---|---|---|\n"
        "| libero_object | 0: pick up the alphabet soup and place it in the basket | 2 | 0.0% |")


def test_shards_of_other_settings_are_never_one_table(trained_run, tmp_path):
    """Two shards started together with different settings: none of them finished an episode when the other started
    (so neither refuses the dir), and yet no table counts both; each says what it left out."""
    out = tmp_path / "eval"
    cmds = [eval_cmd(trained_run[0] / "final", out, "--num_envs", 1, "--save_video", "false", "--shard_id", shard_id,
                     "--num_shards", 2, "--ensemble_window", window) for shard_id, window in ((0, 8), (1, 1))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outputs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):  # one started after the other had finished its episode: refused instead
        assert sorted(p.returncode == 0 for p in procs) == [False, True], outputs
        assert any("holds results of other settings" in err for _, err in outputs), outputs
    else:
        assert all("1 of 2 episodes finished" in stdout for stdout, _ in outputs), outputs
        assert any("; 1 of other settings or weights left out" in stdout for stdout, _ in outputs), outputs
    final = json.loads((out / "results.json").read_text())
    assert final["finished"] == len(final["episodes"]) == 1 and final["expected"] == 2
    assert (out / "results.md").read_text().startswith("**Incomplete: 1 of 2 episodes finished")
