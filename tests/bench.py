"""Benchmarks (run by hand, not collected by pytest). Prints numbers; asserts nothing.

    python tests/bench.py data              # data pipeline: samples/s for one DataLoader worker (CPU)
    python tests/bench.py generate          # constrained vs free decoding; each decoder's forward passes per chunk
                                            # and time per observation at batch 1/8/32
    python tests/bench.py train [--real]    # training step: samples/s, tokens/s, peak memory, MFU estimate
    python tests/bench.py serve             # policy server: round trip over a direct Policy call, requests/s with
                                            # 1, 4 and 16 concurrent clients (tiny model, CPU)
    python tests/bench.py libero            # LIBERO eval with num_envs 1, 2, 4: env steps/s, policy queries/s
    python tests/bench.py sim               # one simulator alone: steps/s with and without camera rendering, and
                                            # the env steps a full 4-suite eval takes (needs ../shared libero-meta)
    python tests/bench.py lora_params       # LoRA trainable parameters on the real 3B config (meta device)
    python tests/bench.py ops               # a training step's dispatched operations per layer, vision attention
                                            # per window vs batched (real 3B architecture cut down; needs ../shared)
    python tests/bench.py tokens            # a training sample's tokens on LIBERO's instructions (real processor):
                                            # vision, supervised, padding at batch 8/32 (needs ../shared)
    python tests/bench.py gpu               # every GPU figure in one run (train and a profiled step, the 24 GB preset,
                                            # decoding, the eval projection, Liger, torch.compile), then `data` on
                                            # the host's CPU; --sections
                                            # generate,data: those alone. tests/gpu_setup.sh prepares the host
--real uses the real Qwen2.5-VL-3B architecture from ../shared/assets, or $TINYVLA_ASSETS (random weights, bf16;
for a GPU). `gpu --cpu` runs the same sequence on the tiny model, to check the script itself.
"""
import gc
import os
import re
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import numpy as np  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402
import tinyvla  # noqa: E402

TMP = Path(tempfile.mkdtemp(prefix="tinyvla-bench-"))
ASSETS = Path(os.environ.get("TINYVLA_ASSETS", Path(__file__).resolve().parents[2] / "shared/assets"))
REAL = ASSETS / "qwen2.5-vl-3b-instruct"
START = time.time()


def over_budget(what):  # gpu: a row starts only within TINYVLA_BENCH_BUDGET_S (420 s: a device call is killed at
    budget = float(os.environ.get("TINYVLA_BENCH_BUDGET_S", "inf"))  # 600 s, a row takes 1.5 min at most); the rest
    if time.time() - START > budget:
        print(f"  {what}: skipped, the {budget:.0f} s budget is spent (TINYVLA_BENCH_BUDGET_S; gpu --sections)")
        return True
    return False


@lru_cache(maxsize=None)  # one model dir per run: the gpu command saves the random 3B weights once
def model_dir(real):
    if not real:
        return tiny.make_model_dir(TMP / "model")
    import shutil
    from transformers import AutoConfig, AutoModelForImageTextToText
    out = TMP / "qwen3b"
    shutil.copytree(REAL, out, copy_function=shutil.copyfile)  # files writable, whatever the assets' modes
    out.chmod(0o755)  # and the dir: the weights go in next
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def bench_data(n=300):
    """Samples/s for one DataLoader worker: the same 256x256 frames (index cells, a moving ramp, noise) stored as PNG
    in the parquet files, or as AV1 / h264 video; then the raw decoders alone on one random frame."""
    from transformers import AutoProcessor
    print(f"data pipeline, 1 worker, two 256x256 cameras -> crop/resize/jitter/tile -> answer text -> tokens ({n} "
          "samples in random order, median of 3 rounds)")
    print("  storage          | sample (decode+augment+text) /s | collate (processor+labels) /s | end to end /s")
    for video, jitter in ((None, True), ("av1", True), ("h264", True), ("av1", False)):
        data = tiny.make_dataset(TMP / f"data256{video}", "v3.0", episodes=6, length=(60, 60), size=256, video=video)
        d = tinyvla.DataArgs(repo_id=str(data), image_keys=["observation.images.image", "observation.images.image2"],
                             action_key="action", val_ratio=0, color_jitter=jitter)
        train, _, stats = tinyvla.build_datasets(d, seed=0)
        processor = AutoProcessor.from_pretrained(tiny.make_model_dir(TMP / "m"), size={
            "shortest_edge": tinyvla.image_pixels(d), "longest_edge": tinyvla.image_pixels(d)})
        collate = tinyvla.Collator(processor, d, 7)
        orders = np.random.default_rng(0).integers(0, len(train), (3, n))
        for i in orders[0, :10]:
            train[i]  # warm up
        times = []
        for order in orders:  # the median of three rounds: this shared machine varies by about 7 % run to run
            t = time.perf_counter()
            samples = [train[i] for i in order]
            times.append(time.perf_counter() - t)
        t_sample = float(np.median(times))
        t = time.perf_counter()
        for i in range(0, n, 8):
            collate(samples[i:i + 8])
        t_collate = time.perf_counter() - t
        label = (video or "PNG in parquet") + ("" if jitter else ", no jitter")
        print(f"  {label:16s} | {n / t_sample:31.1f} | {n / t_collate:29.1f} | "
              f"{n / (t_sample + t_collate):13.1f}")
    for codec in ("av1", "h264"):
        video = next((TMP / f"data256{codec}").glob("videos/observation.images.image/*/*.mp4"))
        times = np.random.default_rng(1).integers(0, 150, 200) / 10
        t = time.perf_counter()
        for s in times:
            tinyvla.video_frame(str(video), s, 10)
        line = f"  one random frame, {codec}: PyAV (container kept open) {1e3 * (time.perf_counter() - t) / 200:.2f} ms"
        try:
            from torchcodec.decoders import VideoDecoder
            dec = VideoDecoder(str(video), seek_mode="exact")
            t = time.perf_counter()
            for s in times:
                dec.get_frame_played_at(float(s))
            line += f", torchcodec {1e3 * (time.perf_counter() - t) / 200:.2f} ms"
        except Exception as err:  # torchcodec needs a system FFmpeg; not a dependency
            line += f", torchcodec not available ({type(err).__name__})"
        print(line)


def bench_generate(real=False, batches=(1, 8, 32), exact=False):
    """Each decoder's forward passes per chunk and time per observation, with the policy's attention (PACKED_SDPA);
    on a GPU (real) the rows that matter there: batch 1 and 64, and static with transformers' sdpa for comparison.
    exact: the decoders' actions against generate()'s in float32 (bf16 moves plain greedy itself: a random-weights
    model's near-tied digits flip with the batch's padding and kernels), at batch 4."""
    device = "cuda" if real else "cpu"
    mdir = model_dir(real)
    d = tinyvla.DataArgs()
    m = tinyvla.ModelArgs(model_id=str(mdir), dtype="bfloat16" if real and not exact else "float32")
    m.attn_implementation = tinyvla.PACKED_SDPA  # as Policy loads it
    model, processor = tinyvla.load_model(str(mdir), m, d, device)
    model.eval()
    stats = {"global": {"lo": [-1.0] * 7, "hi": [1.0] * 7}}
    col = tinyvla.Collator(processor, d, 7)
    rng = np.random.default_rng(0)
    obs = lambda b: [tinyvla.prepare_images([rng.integers(0, 255, (256, 256, 3), np.uint8)] * 2, d) for _ in range(b)]
    tasks = lambda b: [tiny.TASKS[i % 4] for i in range(b)]
    sync = torch.cuda.synchronize if real else (lambda: None)

    def timed(fn, reps, warm=True):
        if warm:
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps

    if not real and not exact:  # the grammar's cost (H100: -7.3 %, within noise, 2026-11-23): the same number of
        inputs = col.prompts([{"images": o, "task": t} for o, t in zip(obs(1), tasks(1))])  # new tokens both ways,
        from transformers import GenerationConfig  # the constrained answer's length forced on free decoding
        grammar = lambda: [tinyvla.ActionGrammar(processor.tokenizer, 56, d.num_bins)]
        con = GenerationConfig(max_new_tokens=tinyvla.TOKENS_PER_NUMBER * 56, eos_token_id=col.end_id,
                               pad_token_id=col.pad_id, **tinyvla.GREEDY)
        n_tok = model.generate(**inputs, generation_config=con, logits_processor=grammar()).shape[1] - \
            inputs["input_ids"].shape[1]
        free = GenerationConfig(max_new_tokens=n_tok, min_new_tokens=n_tok, eos_token_id=col.end_id,
                                pad_token_id=col.pad_id, **tinyvla.GREEDY)
        t_free = min(timed(lambda: model.generate(**inputs, generation_config=free), 3) for _ in range(3))
        t_con = min(timed(lambda: model.generate(**inputs, generation_config=con, logits_processor=grammar()), 3)
                    for _ in range(3))
        print(f"tiny model (CPU): {n_tok} new tokens at batch 1")
        print(f"  unconstrained {t_free * 1e3:8.1f} ms   constrained {t_con * 1e3:8.1f} ms   "
              f"overhead {100 * (t_con / t_free - 1):+.1f}%")
        for vocab in (len(processor.tokenizer), 151936):  # the grammar alone, per step
            proc, scores = grammar()[0], torch.randn(1, vocab)
            proc(inputs["input_ids"], scores)
            ids = torch.cat([inputs["input_ids"], proc.ids[1:2][None]], 1)
            t = timed(lambda: proc(ids, scores), 2000)
            print(f"  grammar alone at vocab {vocab}: {t * 1e6:.1f} us per step")
    if real and not exact:
        batch32 = [{"images": o, "task": t} for o, t in zip(obs(32), tasks(32))]
        for dev in ("cpu", device):  # predict runs the processor on the model's device
            print(f"  processor (chat template + images -> tensors) at batch 32 on {dev}: "
                  f"{1e3 * timed(lambda: col.prompts(batch32, device=dev), 3):.1f} ms")
    print(f"{'real 3B (' + m.dtype + ', ' + device + ')' if real else 'tiny model (CPU)'}: full predict (preprocess + "
          "decode + parse). generate: transformers' generate(), a pass per token;")
    print("  speculative: ours in fixed shapes over a static KV cache, forced tokens folded into a pass (width 2),")
    print("  and with the exact answer as draft (width 16: the most a draft saves); static: that compiled on GPU")
    print("  (CUDA graphs; the first call of each batch and width compiles). attention: the policy's (packed: a")
    print("  grouped-query layer's heads folded into the query length) or transformers' sdpa (KV heads copied)")
    print("  decoder     | width | draft | batch | attention | passes | first call s | s per call | ms per pass | "
          "ms per obs. | obs./s | rows = generate's")
    packed, sdpa = tinyvla.PACKED_SDPA, "sdpa"
    if exact:  # rows: (decoder, width, exact answer as draft, batch, attention)
        rows = [("generate", 1, False, 4, packed), ("speculative", 2, False, 4, packed),
                ("speculative", 16, True, 4, packed), ("static", 2, False, 4, packed)]
    elif real:  # the static rows first: the figures the budget must not skip, each compiled afresh (a fair pair)
        rows = [("static", 2, False, 64, packed), ("static", 2, False, 64, sdpa), ("static", 2, False, 1, packed),
                *[(dec, w, False, b, packed) for dec, w in (("generate", 1), ("speculative", 2)) for b in (1, 64)],
                ("speculative", 16, True, 1, packed)]
    else:
        rows = [*[(dec, w, False, b, packed) for dec, w in (("generate", 1), ("speculative", 2), ("static", 2))
                  for b in batches], ("speculative", 16, True, 1, packed), ("static", 16, True, 1, packed),
                ("static", 2, False, batches[-1], sdpa)]
    from torch._dynamo.utils import counters
    best, plain, batch_of = 0.0, {}, {}
    try:
        for decoder, width, drafted, b, attn in rows:
            if over_budget(f"{decoder} width {width} batch {b} ({attn})") or (drafted and b not in plain):
                continue  # drafted: generate's answer is the draft
            if decoder == "static" or attn != model.config._attn_implementation:  # a static row compiles afresh
                vars(model).pop("static_caches", None)  # (its compiled graphs hold them)
                torch._dynamo.reset()
                counters.clear()
                model.set_attn_implementation(attn)  # every sub-model's: the vision tower's back to the policy's
                model.config.vision_config._attn_implementation = tinyvla.CHUNKED_SDPA
            if b not in batch_of:  # every row of a batch size decodes the same observations
                batch_of[b] = obs(b), tasks(b)
            o, tk = batch_of[b]
            call = lambda: tinyvla.predict(model, col, stats, o, tk, decoder, plain[b] if drafted else None, width)
            try:
                t = time.perf_counter()
                actions, _, passes = call()
                sync()
                first, t = time.perf_counter() - t, timed(call, 1 if real else 2, not real)  # real: warm now
            except Exception as err:  # out of memory, or a compile failing: the other rows still run
                print(f"  {decoder:11s} | {width:5d} | {'exact' if drafted else '-':5s} | {b:5d} | " + (
                    "out of memory" if isinstance(err, torch.OutOfMemoryError) else
                    f"failed: {type(err).__name__}: {str(err)[:300]}"))
                if real:
                    torch.cuda.empty_cache()
                continue
            if decoder == "generate":  # plain greedy: what every other path must equal
                plain[b] = list(actions)
            same = f"{sum(np.array_equal(a, e) for a, e in zip(actions, plain[b]))}/{b}" if b in plain else "-"
            print(f"  {decoder:11s} | {width:5d} | {'exact' if drafted else '-':5s} | {b:5d} | "
                  f"{'packed' if attn == packed else attn:9s} | {passes:6d} | {first:12.2f} | "
                  f"{t:10.3f} | {1e3 * t / passes:11.2f} | {1e3 * t / b:11.1f} | {b / t:6.1f} | {same}")
            if real and decoder == "static":  # compiled once for its shape, and run as CUDA graphs? (tests/
                print(f"              compiled step: {counters['stats']['unique_graphs']} graph(s), graph breaks: "
                      f"{dict(counters['graph_break']) or 'none'}, CUDA graphs skipped: "  # test_inference.py checks
                      f"{counters['inductor'].get('cudagraph_skips', 0)} (0: every step replays one)")  # the compile)
                # does the host wait for the GPU? set_sync_debug_mode warns at each implicit wait:
                with warnings.catch_warnings(record=True) as waits:  # a few per call (the prompt's pass, copies of
                    warnings.simplefilter("always")  # the grammar's tables, the answers' read), not one per pass (a
                    torch.cuda.set_sync_debug_mode("warn")  # pass's end is read a pass late, by an event: not counted)
                    try:
                        call()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                print(f"              host waits for the GPU in one call: {len(waits)} ({passes} passes)")
            if not drafted and attn == packed:  # a real draft saves less; and the policy's attention only
                best = max(best, b / t)
        if real and not exact:
            print("  (bf16: rows differ from generate's where a near-tied digit flips, generate's own at another "
                  "batch size too; `gpu --sections exact` checks the decoders in float32)")
    finally:
        vars(model).pop("static_caches", None)  # the training figures measure memory next
        torch._dynamo.reset()  # and the compiled graphs (CUDA graph memory pools)
    return best


def bench_train(real=False, steps=5, batches=None, preset=False, liger=False, compiled=False):
    """Training steps per variant; liger: Liger's kernels alone (they patch transformers' Qwen2.5-VL classes for the
    rest of the process, so the gpu command runs them last, after decoding); compiled: torch.compile's variants
    alone (--torch_compile: the whole model, or each repeated block apart, accelerate's regional compilation). The
    first variant's first batch is also profiled for one step more: how long the GPU is busy in it, and launching
    how many kernels (a step bound by the host launching them leaves the GPU idle)."""
    device = "cuda" if real else "cpu"
    mdir = model_dir(real)
    data = tiny.make_dataset(TMP / "data", episodes=6, length=(60, 60), size=256)
    print(f"{'real Qwen2.5-VL-3B, bf16, ' + device if real else 'tiny model, fp32, CPU (ratios only)'}")
    from trl import SFTConfig
    ckpt = "--activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else \
        "--gradient_checkpointing"  # transformers < 5.23 (the GPU host has 5.17) knows only the old name
    variants = [("full", []), ("full+ckpt", [ckpt, "true"]), ("LoRA", ["--use_lora", "true"]),
                ("LoRA+ckpt", ["--use_lora", "true", ckpt, "true"])]
    if real and find_spec("flash_attn"):
        variants.append(("full+flash", ["--attn_implementation", "flash_attention_2"]))
    if preset:  # the 24 GB preset as configured, gradient accumulation 1 (the same memory per micro-batch)
        optim = [] if find_spec("bitsandbytes") else ["--optim", "adamw_torch"]  # 8-bit AdamW where it imports
        variants.append(("24GB preset" + (" (adamw_torch)" if optim else ""), [
            "--config", str(Path(__file__).resolve().parents[1] / "config_lora_24gb.yaml"),
            "--gradient_accumulation_steps", "1", "--report_to", "none", "--num_train_epochs", "1", *optim]))
    if liger:  # no DataLoader workers: gpu runs this after decoding, and a fork beside inductor's threads can hang
        variants = [("full+liger", ["--use_liger_kernel", "true", "--dataloader_num_workers", "0"])]  # (the step
        if not find_spec("liger_kernel"):  # clock excludes loading a batch)
            return print("  full+liger: liger-kernel is not installed (tests/gpu_setup.sh carries it)")
    if compiled:  # the same: inductor's threads start with the first compile
        variants = [(label, ["--torch_compile", "true", "--dataloader_num_workers", "0"]) for label in (
            "full+regional", "full+compile")]  # the first compiles a block per class, the second the whole model
    print("  variant       | batch | samples/s | tokens/s | peak mem GiB | MFU    | steps 1, 2 s (compiling)")
    profiled = False
    for label, extra in variants:
        sizes = batches or ((8, 16, 32) if real else (4,))
        ckpt = (2 * sizes[-1],) if real else sizes[-1:]  # checkpointing: for a batch that fits only with it
        for batch in (4,) if "preset" in label else ckpt if "ckpt" in label else sizes[:1] if label == \
                "full+compile" else sizes:  # the whole model compiled: long, so at one batch size
            if over_budget(f"{label} batch {batch}"):
                continue
            profile = not profiled  # the first row that trains (a row out of memory passes it on)
            if compiled:  # each compiled row from scratch: the Trainer compiles with dynamic=None, so a row after
                torch._dynamo.reset()  # another batch size would get a dynamic-shape graph
            os.environ.pop("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", None)  # read when the Trainer makes its
            if "regional" in label:  # Accelerator
                os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
            argv = ["--model_id", str(mdir), "--repo_id", str(data), "--output_dir", str(TMP / f"run{label}{batch}"),
                    "--dtype", "bfloat16" if real else "float32", "--max_steps",
                    str(steps + 2 + profile), "--per_device_train_batch_size", str(batch), "--eval_strategy", "no",
                    "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_num_workers", "4" if real else "0",
                    "--bf16", str(real), "--use_cpu", str(not real), *extra]
            times = []
            from transformers import TrainerCallback

            class Clock(TrainerCallback):  # profile: the step after the timed ones
                def on_step_begin(self, args, state, control, **k):
                    if real:
                        torch.cuda.synchronize()
                    if profile and state.global_step == steps + 2:
                        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + [
                            torch.profiler.ProfilerActivity.CUDA] * real)
                        self.prof.__enter__()
                    self.t = time.perf_counter()

                def on_step_end(self, args, state, control, **k):
                    if real:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - self.t)
                    if profile and state.global_step == steps + 3:
                        self.prof.__exit__(None, None, None)

            gc.collect()  # the previous variant's model (TRL's fused head makes a reference cycle of it) and
            if real:  # optimizer states: gone before this one loads and its peak memory counts
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer, failed, clock = None, None, None
            try:
                trainer = tinyvla.make_trainer(*tinyvla.parse_args(argv))
                trainer.add_callback(clock := Clock())
                trainer.train()
            except Exception as err:  # out of memory: the largest batch that fits is the answer. Either way (a kernel
                # library failing, say) the next variants still run: device time is scarce
                failed = "out of memory" if isinstance(err, torch.OutOfMemoryError) else \
                    f"failed: {type(err).__name__}: {str(err)[:300]}"  # err (and its frames) goes with the block
                if getattr(clock, "prof", None) and len(times) < steps + 3:  # failed in the profiled step: the
                    clock.prof.__exit__(None, None, None)  # profiler must not run on through the next rows
            if failed:
                print(f"  {label:13s} | {batch:5d} | {failed}")
                trainer = None
                continue
            step = float(np.median(times[2:steps + 2]))
            n_tok = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])["input_ids"].numel()
            params = sum(p.numel() for p in trainer.model.parameters())
            # MFU: 6 * params * tokens per step (forward 2, backward 4: all weights incl. ViT over its patch tokens,
            # approximated by the sequence tokens; LoRA 4: no gradients of the frozen weights; activation
            # checkpointing's recomputed forward not counted) / step time / peak bf16 FLOP/s (790 TFLOP/s, H100/H200)
            flop = (4 if "LoRA" in label or "preset" in label else 6) * params * n_tok
            mfu = f"{flop / step / 790e12:.1%}" if real else "-"
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:12.1f}" if real else f"{'-':>12s}"
            print(f"  {label:13s} | {batch:5d} | {batch / step:9.2f} | {n_tok / step:8.0f} | "
                  f"{mem} | {mfu:6s} | {times[0]:.1f}, {times[1]:.1f}")
            if profile:  # the GPU's time in kernels (as torch's profiler table sums it: its rows for the ops that
                profiled = True  # launched them count them again) against the median step (the profiler slows
                kernels = [e for e in clock.prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                           and not getattr(e, "is_user_annotation", False)]  # the host: not that step's time)
                busy = sum(e.self_device_time_total for e in kernels) / 1e3
                print(f"    profiled step ({label}, batch {batch}): the GPU busy {busy:.0f} ms of the median step's "
                      f"{1e3 * step:.0f} ms ({busy / 1e3 / step:.0%}), {sum(e.count for e in kernels):,} kernels run "
                      f"(profiled step {1e3 * times[-1]:.0f} ms); the top five kernels:")
                for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:5]:
                    print(f"      {e.self_device_time_total / 1e3:8.1f} ms  {e.count:6d} x  {e.key[:90]}")
            trainer = None


def bench_libero(steps=100):
    ckpt = tiny_checkpoint()
    policy = tinyvla.Policy(ckpt)
    for n in (1, 2, 4):
        e = tinyvla.parse_args(["--suite", "libero_object", "--task_ids", "0", "--episodes_per_task", str(2 * n),
                                "--episode_max_steps", str(steps), "--num_envs", str(n), "--save_video", "false",
                                "--eval_dir", str(TMP / f"eval{n}")])[2]
        print(f"--- num_envs {n}: {2 * n} episodes x {steps} steps (timed from the first env step)")
        tinyvla.evaluate_libero(ckpt, e, policy)


def tiny_checkpoint():
    out = TMP / "run"
    if not (out / "final").exists():
        argv = ["--model_id", str(model_dir(False)), "--repo_id", str(tiny.make_dataset(TMP / "d")), "--output_dir",
                str(out), "--dtype", "float32", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]
        tinyvla.train(*tinyvla.parse_args(argv))
    return out / "final"


def bench_serve(n=30):
    """The server's round trip over a direct Policy call at batch 1, then requests/s with concurrent clients, each
    sending requests back to back (openpi's msgpack-numpy over websockets, as its client does)."""
    import socket
    import subprocess
    import threading
    import msgpack
    from websockets.sync.client import connect
    ckpt, rng = tiny_checkpoint(), np.random.default_rng(0)
    images = [rng.integers(0, 255, (224, 224, 3), np.uint8) for _ in range(2)]
    policy = tinyvla.Policy(ckpt)
    policy([images], [tiny.TASKS[0]])  # warm up
    direct = np.median([timed(lambda: policy([images], [tiny.TASKS[0]])) for _ in range(n)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(Path(tinyvla.__file__)), "--serve", str(ckpt), "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    while "serving" not in server.stdout.readline():
        pass
    threading.Thread(target=lambda: server.stdout.read(), daemon=True).start()  # the per-request log
    request = msgpack.packb({"observation/image": images[0], "observation/wrist_image": images[1],
                             "prompt": tiny.TASKS[0]}, default=tinyvla.to_wire)

    def client(count, replies):  # replies: (reply, seconds from send to reply)
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            ws.recv()  # the metadata
            for _ in range(count):
                start = time.perf_counter()
                ws.send(request)
                replies.append((msgpack.unpackb(ws.recv(), object_hook=tinyvla.from_wire), time.perf_counter() - start))

    replies = []
    client(n + 3, replies)
    wire = np.median([t - r["server_timing"]["model_ms"] / 1e3 for r, t in replies[3:]])
    round_trip = np.median([t for _, t in replies[3:]])
    print(f"batch 1 (tiny model, CPU, {n} requests on one connection, medians): a direct Policy call "
          f"{1e3 * direct:.1f} ms; a request through the server {1e3 * round_trip:.1f} ms "
          f"(+{1e3 * (round_trip - direct):.1f} ms), of which {1e3 * wire:.1f} ms outside the server's policy call "
          "(packing, websocket, checks, batcher)")
    print("  clients | requests/s | mean batch | mean round trip ms")
    for clients in (1, 4, 16):
        replies, per_client = [], max(2 * n // clients, 4)
        threads = [threading.Thread(target=client, args=(per_client, replies)) for _ in range(clients)]
        start = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        rate = len(replies) / (time.perf_counter() - start)
        batch = np.mean([r["server_timing"]["batch"] for r, _ in replies])
        print(f"  {clients:7d} | {rate:10.1f} | {batch:10.1f} | {1e3 * np.mean([t for _, t in replies]):18.1f}")
    server.terminate()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_sim(steps=60):
    import json
    tinyvla.setup_libero()
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    bench = benchmark.get_benchmark_dict()["libero_spatial"]()
    task = bench.get_task(0)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    print(f"one LIBERO env (libero_spatial task 0), MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {steps} steps")
    for render in (True, False):
        t = time.perf_counter()
        env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=tinyvla.CAMERA_RES,
                                 camera_widths=tinyvla.CAMERA_RES, has_offscreen_renderer=render, use_camera_obs=render)
        env.seed(tinyvla.ENV_SEED)
        env.reset()
        env.set_init_state(bench.get_task_init_states(0)[0])
        build = time.perf_counter() - t
        for _ in range(tinyvla.WAIT_STEPS):
            env.step(tinyvla.WAIT_ACTION)
        t, frames = time.perf_counter(), []
        for _ in range(steps):
            obs, _, _, _ = env.step([0.1, 0, 0, 0, 0, 0, -1])
            if render:
                frames.append(np.concatenate([obs["agentview_image"], obs["robot0_eye_in_hand_image"]], axis=1))
        what = "physics + 2 cameras rendered" if render else "physics only (no rendering)"
        print(f"  {what:30s}: {steps / (time.perf_counter() - t):6.1f} steps/s  (scene build {build:.1f} s)")
        env.close()
        if render:  # what an episode's mp4 costs (agent view | wrist, as the eval writes it)
            import imageio
            t = time.perf_counter()
            imageio.mimsave(TMP / "episode.mp4", frames, fps=20)
            print(f"  mp4 encoding (256x512 frames): {1e3 * (time.perf_counter() - t) / steps:.1f} ms per frame")
    meta = REAL.parent / "libero-meta/episodes.jsonl"
    if not meta.exists():
        return print(f"  ({meta} missing: no episode-length projection)")
    lengths = [json.loads(line) for line in meta.read_text().splitlines()]
    demo, limit = 0, 0
    print("  suite          | demo episodes | mean demo length | step limit")
    for suite in tinyvla.STANDARD_SUITES:
        bddl = Path(find_spec("libero").submodule_search_locations[0]) / "libero/bddl_files" / suite
        tasks = {re.sub(r"^.*SCENE\d+_", "", f.stem).replace("_", " ") for f in bddl.glob("*.bddl")}  # task strings
        n = np.array([e["length"] for e in lengths if e["tasks"][0] in tasks])
        print(f"  {suite:14s} | {len(n):13d} | {n.mean():16.1f} | {tinyvla.SUITE_MAX_STEPS[suite]:10d}")
        demo += 500 * (n.mean() + tinyvla.WAIT_STEPS)
        limit += 500 * (tinyvla.SUITE_MAX_STEPS[suite] + tinyvla.WAIT_STEPS)
    print(f"  2,000 episodes (50 per task): {demo:,.0f} env steps at demo pace, {limit:,.0f} if every episode "
          f"runs to its limit (each incl. {tinyvla.WAIT_STEPS} settle steps)")


def bench_tokens(n=2000, batches=(8, 32)):
    """What a training sample is made of, on LIBERO's real instructions (a sample per frame) with the real processor:
    tokens, vision tokens, supervised tokens (all the loss scores), and padding at batch 8/32 (all that padding-free
    packing could save). Actions: Gaussians of LIBERO's per-dimension mean and std, in its clip range, gripper +-1."""
    import json
    from transformers import AutoProcessor
    meta, d = ASSETS / "libero-meta", tinyvla.DataArgs()
    tasks = [e["tasks"][0] for e in map(json.loads, (meta / "episodes.jsonl").read_text().splitlines())
             for _ in range(e["length"])]
    a = json.loads((meta / "norm_stats.json").read_text())["norm_stats"]["actions"]
    hi = np.array([0.9375] * 3 + [0.375] * 3 + [1.0])
    processor = AutoProcessor.from_pretrained(REAL, size={"shortest_edge": tinyvla.image_pixels(d),
                                                          "longest_edge": tinyvla.image_pixels(d)})
    col, rng, rows = tinyvla.Collator(processor, d, 7), np.random.default_rng(0), []
    image = [torch.zeros(3, d.img_size, 2 * d.img_size, dtype=torch.uint8)]
    for i in rng.choice(len(tasks), n):  # random frames, as the sampler draws them
        acts = np.clip(rng.normal(a["mean"], a["std"], (d.horizon, 7)), -hi, hi)
        acts[:, -1] = np.where(acts[:, -1] > 0, 1.0, -1.0)
        batch = col([{"images": image, "task": tasks[i], "answer": tinyvla.actions_to_text(acts, -hi, hi, 1000)}])
        rows.append((batch["input_ids"].shape[1], int((batch["labels"] >= 0).sum()),
                     int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())))
    total, supervised, vision = np.array(rows).T
    print(f"{n} LIBERO samples, real processor: tokens per sample {total.mean():.1f} (min {total.min()}, max "
          f"{total.max()}), vision {vision.mean():.0f}, supervised {supervised.mean():.1f} "
          f"({supervised.sum() / total.sum():.1%} of the positions the loss head would score without masking)")
    for b in batches:
        groups = total[: len(total) // b * b].reshape(-1, b)
        print(f"  batch {b:2d}: padding {1 - groups.sum() / (groups.max(1) * b).sum():.1%} of the tokens a step "
              "computes (what padding-free packing would save at most)")


def bench_lora_params():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    cfg = AutoConfig.from_pretrained(REAL)
    plain = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, targets in [("ours: language model only", tinyvla.LORA_TARGETS), ("plain names", plain)]:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
            total = sum(p.numel() for p in model.parameters())
            model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets))
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name}: {n / 1e6:.1f}M trainable of {total / 1e6:.1f}M ({100 * n / total:.2f}%)")


def bench_ops():
    """The aten operations one training step dispatches (forward and backward; views included, which launch no GPU
    kernel) on the real Qwen2.5-VL-3B architecture (random weights, CPU, float32) cut to a layer or two, with the
    vision tower's attention as transformers' sdpa (a call per window) and as the policy's (CHUNKED_SDPA): per layer,
    then at full depth and batch 8 (counts grow linearly with the batch; 3 of the 4 full-attention vision layers
    counted as windowed ones)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n = getattr(self, "n", 0) + 1
            return func(*args, **(kwargs or {}))

    d = tinyvla.DataArgs()
    processor = AutoProcessor.from_pretrained(REAL, size={"shortest_edge": tinyvla.image_pixels(d),
                                                          "longest_edge": tinyvla.image_pixels(d)})
    col, full = tinyvla.Collator(processor, d, 7), AutoConfig.from_pretrained(REAL)
    sample = {"images": [torch.zeros(3, d.img_size, 2 * d.img_size, dtype=torch.uint8)], "task": "put the bowl on the "
              "plate", "answer": " ".join(["512"] * 56)}  # one tiled image: 8 windows in each windowed layer

    def ops(impl, batch, text_layers=1, vision_layers=2):  # the last vision layer attends over whole images
        cfg = AutoConfig.from_pretrained(REAL)
        cfg.text_config.num_hidden_layers, cfg.vision_config.depth = text_layers, vision_layers
        cfg.vision_config.fullatt_block_indexes = [vision_layers - 1]
        model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        model.config.vision_config._attn_implementation = impl
        with Count() as count:
            model(**col([sample] * batch)).loss.backward()
        return count.n
    text = ops("sdpa", 2, text_layers=2) - ops("sdpa", 2)
    print(f"a training step's operations (forward and backward), real 3B architecture cut down, CPU; per text layer "
          f"{text}")
    for name, impl in (("transformers' sdpa (a call per window)", "sdpa"), ("CHUNKED_SDPA", tinyvla.CHUNKED_SDPA)):
        base = {b: ops(impl, b) for b in (2, 4)}
        window = {b: ops(impl, b, vision_layers=3) - base[b] for b in (2, 4)}
        at8 = lambda x: x[2] + 3 * (x[4] - x[2])
        total = at8(base) + (full.text_config.num_hidden_layers - 1) * text + (full.vision_config.depth - 2) * at8(
            window)
        print(f"  vision attention {name:40s}: per windowed vision layer {window[2]} at batch 2, {window[4]} at 4, "
              f"{at8(window)} at 8; the whole step at batch 8 and full depth ≈ {total:,}")


def bench_gpu(real=True, sections=("train", "generate", "exact", "liger", "compile", "data")):
    """Every GPU figure of the speed issue in one run on an H100/H200: which GPU, training (full FT and LoRA at batch
    8 and 16, activation checkpointing at 32, the 24 GB preset), decoding (the three decoders at batch 1 and 64, the
    static one also with transformers' sdpa; after training, whose DataLoader forks before inductor starts its
    threads), the full-eval projection, Liger's kernels where they import, the decoders' exactness in float32,
    training compiled (torch.compile: each block apart, and the whole model), and the data pipeline on the host's
    CPU. A row that fails prints why and the next one runs; past the time budget the rows left print that they were
    skipped. The whole takes three device calls: `gpu --sections generate` (about 7 minutes on an H100), then
    `gpu --sections train,exact,liger,data` and `gpu --sections compile` (each call's sections in this order)."""
    import accelerate
    import transformers
    import trl
    os.environ.setdefault("TINYVLA_BENCH_BUDGET_S", "420" if real else "inf")
    transformers.utils.logging.disable_progress_bar()  # loading and saving bars: the device call returns 12k chars
    t0, best = time.time(), 0.0
    gpu = torch.cuda.get_device_name() if real else "none (--cpu: the tiny model, to check this script)"
    regional = "use_regional_compilation" in accelerate.utils.TorchDynamoPlugin.__dataclass_fields__  # no: whole
    print(f"GPU: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"accelerate {accelerate.__version__} (regional compilation: {'yes' if regional else 'no'}), "
          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}; sections {', '.join(sections)}")
    runs = {"train": lambda: bench_train(real, batches=(8, 16) if real else None, preset=True),
            "generate": lambda: bench_generate(real, (1, 8)), "exact": lambda: bench_generate(real, exact=True),
            "liger": lambda: bench_train(real, batches=(8, 16) if real else None, liger=True),
            "compile": lambda: bench_train(real, batches=(8, 16) if real else None, compiled=True),
            "data": bench_data}
    if unknown := set(sections) - set(runs):
        sys.exit(f"gpu --sections: no section {sorted(unknown)}; the sections are {', '.join(runs)}")
    for name in sections:
        if over_budget(f"section {name}"):
            continue
        try:
            best = runs[name]() or best
        except Exception as err:  # one section failing must not cost the others their device time
            print(f"  {name} failed: {type(err).__name__}: {err}")
        gc.collect()  # what the section held goes before the next one measures memory
        if real:
            torch.cuda.empty_cache()
        print(f"[{name} done after {time.time() - t0:.0f} s]", flush=True)
        if name == "generate" and not best:
            print("full 4-suite eval: no projection, as no decoding row was measured")
        elif name == "generate":  # one simulator's physics: BENCHMARKS.md's CPU figure unless measured here
            sim, queries, steps = float(os.environ.get("TINYVLA_SIM_STEPS_PER_S", 74.2)), 330_000, 350_000
            policy_h, sim_h = queries / best / 3600, steps / (os.cpu_count() * sim) / 3600
            print(f"full 4-suite eval (2,000 episodes, {steps:,} env steps, {queries:,} policy queries at "
                  f"action_horizon 1): policy {policy_h:.2f} h at {best:.1f} observations/s, simulators {sim_h:.2f} h "
                  f"({os.cpu_count()} x {sim:.0f} steps/s); projected {max(policy_h, sim_h):.2f} GPU-hours "
                  "(target <= 1)")


if __name__ == "__main__":
    what, real = sys.argv[1], "--real" in sys.argv
    {"data": bench_data, "generate": lambda: bench_generate(real),
     "train": lambda: (bench_train(real), bench_train(real, liger=True)), "tokens": bench_tokens,
     "libero": bench_libero, "serve": bench_serve, "sim": bench_sim, "lora_params": bench_lora_params, "ops": bench_ops,
     "gpu": lambda: bench_gpu("--cpu" not in sys.argv, *[sys.argv[i + 1].split(",") for i in range(
         len(sys.argv)) if sys.argv[i] == "--sections"])}[what]()
