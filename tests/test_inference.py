"""Constrained decoding, the batched policy, action ensembling and generation metrics."""
import logging
import math

import numpy as np
import pytest
import torch
from conftest import QWEN_DIR, needs_shared, observations

import tinyvla

END = "<|im_end|>"


def reference_allowed(text, n, max_value):
    """Slow, obviously-correct grammar: the characters that may follow `text`."""
    if text.endswith(END):
        return {END}
    parts = text.split(" ")
    current, allowed = parts[-1], set()
    for digit in "0123456789":
        candidate = current + digit
        if (len(candidate) == 1 or candidate[0] != "0") and int(candidate) <= max_value:
            allowed.add(digit)
    if current:
        allowed.add(" " if len(parts) - 1 < n - 1 else END)
    return allowed


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("seed, batch, n, max_value", [(0, 1, 56, 1000), (1, 7, 14, 1000), (2, 16, 5, 1000),
                                                       (3, 4, 9, 7), (4, 3, 3, 99999)])
def test_grammar_matches_reference_on_random_logits(tokenizer, seed, batch, n, max_value):
    g = torch.Generator().manual_seed(seed)
    proc = tinyvla.ActionGrammar(tokenizer, n, max_value)
    vocab = len(tokenizer)
    ids = torch.randint(0, vocab, (batch, 5), generator=g)  # a fake prompt
    texts = [""] * batch
    for _ in range(tinyvla.TOKENS_PER_NUMBER * n if max_value <= 1000 else 6 * n):
        scores = torch.randn(batch, vocab, generator=g) * 5
        scores[:, tokenizer.convert_tokens_to_ids(END)] -= 3  # let some rows run long
        out = proc(ids, scores)
        for b in range(batch):
            allowed = {tokenizer.decode([i]) for i in torch.nonzero(out[b] > -torch.inf).flatten().tolist()}
            assert allowed == reference_allowed(texts[b], n, max_value), texts[b]
        # sample among the allowed tokens, so every branch of the grammar gets exercised
        nxt = torch.multinomial(torch.softmax(out, -1), 1, generator=g)
        texts = [t if t.endswith(END) else t + tokenizer.decode(i) for t, i in zip(texts, nxt.flatten().tolist())]
        ids = torch.cat([ids, nxt], 1)
        if all(t.endswith(END) for t in texts):
            break
    for t in texts:
        assert t.endswith(END)
        values = t[: -len(END)].split(" ")
        assert len(values) == n and all(v.isdigit() and 0 <= int(v) <= max_value for v in values)
        assert all(v == "0" or not v.startswith("0") for v in values)


def test_answer_token_bound_is_tight():
    worst = " ".join(["1000"] * 56)
    assert tinyvla.TOKENS_PER_NUMBER * 56 == len(worst) + 1 == 280


@needs_shared
def test_real_vocab_allowed_sets():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    proc = tinyvla.ActionGrammar(tok, 56, 1000)
    assert proc.ids.tolist() == list(range(15, 25)) + [220, 151645]
    out = proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 151936))
    assert torch.nonzero(out[0] > -torch.inf).flatten().tolist() == list(range(15, 25))  # a number starts


def test_ensembling_by_hand():
    """VLA-0's ensemble_version 1 (newest 1, every older kept chunk 0.5) and 2 (weight**age), episode start,
    window, and action_horizon 2 (each step averages the chunks that cover it)."""
    a = np.arange(4)[:, None] * np.ones((4, 2))  # chunk from t=0: 0,1,2,3
    b = 10 + np.arange(4)[:, None] * np.ones((4, 2))  # chunk from t=1: 10,11,12,13
    c = 100 + np.arange(4)[:, None] * np.ones((4, 2))  # chunk from t=2
    v1 = tinyvla.ActionEnsembler(window=2)  # version 1, weight 0.5: the defaults
    v1.add(0, a)
    assert np.allclose(v1.act(0), 0)  # episode start: one chunk, used as it is
    v1.add(1, b)
    assert np.allclose(v1.act(1), (0.5 * 1 + 10) / 1.5)
    v1.add(2, c)  # window 2: chunk a is dropped
    assert np.allclose(v1.act(2), (0.5 * 11 + 100) / 1.5)
    eight = tinyvla.ActionEnsembler(window=8)  # the README's 8 chunks: newest 1/4.5, every other 0.5/4.5
    for t in range(8):
        eight.add(t, np.full((8, 1), float(t)))
    assert np.allclose(eight.act(7), (7 + 0.5 * sum(range(7))) / 4.5)
    v2 = tinyvla.ActionEnsembler(window=3, version=2, weight=0.5)
    for t, chunk in enumerate((a, b, c)):
        v2.add(t, chunk)
    assert np.allclose(v2.act(2), (0.25 * 2 + 0.5 * 11 + 100) / 1.75)
    uniform = tinyvla.ActionEnsembler(window=3, version=2, weight=1.0)
    uniform.add(0, a), uniform.add(1, b)
    assert np.allclose(uniform.act(1), (1 + 10) / 2)
    h2 = tinyvla.ActionEnsembler(window=8)  # action_horizon 2: queried at steps 0 and 2
    h2.add(0, a)
    assert [h2.act(t)[0] for t in (0, 1)] == [0, 1]
    h2.add(2, c)
    assert np.allclose([h2.act(t)[0] for t in (2, 3)], [(0.5 * 2 + 100) / 1.5, (0.5 * 3 + 101) / 1.5])
    h2.add(4, 1000 + a)  # chunk a covers no step from 4 on: c (weight 0.5) and the newest remain
    assert np.allclose(h2.act(5)[0], (0.5 * 103 + 1001) / 1.5)


def test_ensembling_with_action_horizon_equal_to_horizon():
    """Chunks never overlap: each step executes its own chunk's action, in order (no silent no-op)."""
    ens, executed = tinyvla.ActionEnsembler(window=10), []
    for t in range(8):
        if t % 4 == 0:
            ens.add(t, np.arange(t, t + 4)[:, None] * np.ones((4, 7)))
        executed.append(ens.act(t)[0])
    assert executed == list(range(8))
    for ens, t in ((tinyvla.ActionEnsembler(window=10), 0), (ens, 8)):  # nothing yet; past the last chunk
        with pytest.raises(ValueError, match=f"no kept chunk covers step {t}: query the policy at least every"):
            ens.act(t)


def test_results_table_of_no_episodes():  # a shard with nothing finished yet, and no other shard's results
    table, summary = tinyvla.results_table([])
    assert table.splitlines() == ["| suite | task | episodes | success |", "|---|---|---|---|"] and summary == {}


def test_protocol_helpers():
    assert tinyvla.binarize_gripper([0.1] * 6 + [0.3])[-1] == 1 and tinyvla.binarize_gripper([0] * 7)[-1] == -1
    assert tinyvla.binarize_gripper([0.5] * 6 + [-0.2]).tolist() == [0.5] * 6 + [-1]
    img = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    assert np.array_equal(tinyvla.flip(img), img[::-1, ::-1]) and tinyvla.flip(img)[0, 0, 0] == img[-1, -1, 0]
    assert tinyvla.SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                       "libero_10": 520, "libero_90": 400}
    assert tinyvla.WAIT_STEPS == 10 and tinyvla.WAIT_ACTION == [0] * 6 + [-1] and tinyvla.ENV_SEED == 7


def test_batched_and_single_predictions_agree(policy):
    import tiny
    obs, tasks = observations(3), tiny.TASKS[:3]
    batched = policy(obs, tasks)
    single = np.concatenate([policy([o], [t]) for o, t in zip(obs, tasks)])
    assert batched.shape == (3, 8, 7) and np.allclose(batched, single, atol=1e-6)
    lo, hi = np.array(policy.stats["global"]["lo"]), np.array(policy.stats["global"]["hi"])
    assert np.all(batched >= lo - 1e-9) and np.all(batched <= hi + 1e-9) and policy.parse_failures == 0


def test_a_camera_more_or_less_is_refused(policy):
    """Each observation holds the checkpoint's cameras: a frame less was stretched to the tile's size, one more
    dropped, and either way the policy answered."""
    import tiny
    obs = observations(2)
    for bad, got in (([obs[0][:1], obs[1]], 1), ([obs[0] + obs[0][:1]], 3)):
        message = rf"takes 2 camera frames per observation \(image, wrist_image\), got {got}$"
        with pytest.raises(ValueError, match=message):
            policy(bad, tiny.TASKS[:len(bad)])


def test_generate_is_plain_constrained_greedy(policy, caplog, monkeypatch):
    """generate() equals a hand-written greedy loop over the same grammar: the checkpoint's sampling, temperature and
    repetition penalty (1.05 in the saved generation_config) are not applied, nor warned about."""
    import json
    import tiny
    saved = json.loads((tinyvla.Path(policy.m.model_id) / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.05 and saved["do_sample"]
    # whatever the loaded generation_config says (a large penalty makes any leak visible), predict ignores it
    policy.model.generation_config.update(repetition_penalty=50.0, do_sample=True, temperature=5.0, top_k=1,
                                          top_p=0.001)  # top_k, top_p: as Qwen2.5-VL-7B's
    obs = [tinyvla.prepare_images(o, policy.d) for o in observations(1, seed=3)]
    model, col = policy.model, policy.collator
    inputs = col.prompts([{"images": obs[0], "task": tiny.TASKS[0]}])
    n = 8 * 7
    grammar, ids, generated = tinyvla.ActionGrammar(col.processor.tokenizer, n, 1000), inputs["input_ids"], []
    with torch.no_grad():
        full = dict(inputs)
        for _ in range(tinyvla.TOKENS_PER_NUMBER * n):
            logits = model(**full).logits[:, -1]
            nxt = grammar(ids, logits).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            generated.append(int(nxt))
            if generated[-1] == col.end_id:
                break
            full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(generated),
                                                                                          dtype=torch.long)], 1)}
    text = col.processor.tokenizer.decode(generated, skip_special_tokens=True)
    lo, hi = tinyvla.action_bounds(policy.stats)
    manual = tinyvla.text_to_actions(text, lo, hi, 1000, 8)
    caplog.clear()
    logging.Logger.warning_once.cache_clear()  # transformers' once per process: said by an earlier test, not now
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # to caplog (transformers: only if CI)
    pred, ok, _ = tinyvla.predict(model, col, policy.stats, obs, [tiny.TASKS[0]], "generate")
    assert ok.all() and np.allclose(pred[0], manual)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # Qwen's temperature: no flag
    # of the user's (transformers warned that it is not valid for greedy decoding)


def test_generation_metrics_logged(trained_run):
    _, trainer = trained_run
    logs = [h for h in trainer.state.log_history if "val/parse_rate" in h]
    assert logs, trainer.state.log_history
    keys = {"val/mse", "val/mae", "val/parse_rate", *(f"val/dim{i}_mae" for i in range(7))}
    assert keys <= set(logs[-1]) and logs[-1]["val/parse_rate"] == 1.0
    assert logs[-1]["val/mae"] == pytest.approx(np.mean([logs[-1][f"val/dim{i}_mae"] for i in range(7)]))
    out = trained_run[0]
    assert (out / "best" / tinyvla.ACTION_STATS).exists() and (out / "checkpoint-2" / tinyvla.RUN_CONFIG).exists()


@pytest.fixture(scope="module")
def noisy(tiny_model):
    """The tiny model with large random weights, so that each row decodes differently (numbers of 1 to 4 digits): a
    mix-up of rows, positions or cache slots shows. -> (model, collator, stats, 5 observations' images, tasks)"""
    import tiny
    d = tinyvla.DataArgs()
    m = tinyvla.ModelArgs(dtype="float32")
    m.attn_implementation = tinyvla.PACKED_SDPA  # the policy's attention, as Policy sets it
    model, processor = tinyvla.load_model(str(tiny_model), m, d, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    stats = {"global": {"lo": [0.0] * 7, "hi": [1.0] * 7}}
    images = [tinyvla.prepare_images(o, d) for o in observations(5, seed=5)]
    return model.eval(), tinyvla.Collator(processor, d, 7), stats, images, [tiny.TASKS[i % 4] for i in range(5)]


def test_packed_attention_is_sdpa_without_copying_kv_heads():
    """The policy's attention: a grouped-query layer's query heads folded into the query length give sdpa's output
    (keys and values copied to every query head) for every head and query row; a wrong fold would pair a query with
    another head's keys or another row's mask. Bool and float masks, passes of 5 tokens and of 1; without a mask (a
    prefill with no padding) it is sdpa itself."""
    from types import SimpleNamespace
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    gen = torch.Generator().manual_seed(0)
    b, kv, groups, length, dim = 3, 2, 4, 11, 16
    layer = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    key, value = (torch.randn(b, kv, length, dim, generator=gen) for _ in range(2))
    for q in (5, 1):
        query = torch.randn(b, kv * groups, q, dim, generator=gen)
        mask = torch.rand(b, 1, q, length, generator=gen) > 0.4
        mask[..., 0] = True  # every query row sees a key
        for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, -math.inf), None):
            want, _ = sdpa_attention_forward(layer, query, key, value, m, scaling=0.3)
            got, _ = tinyvla.packed_gqa_sdpa(layer, query, key, value, m, scaling=0.3)
            assert got.shape == (b, q, kv * groups, dim)
            torch.testing.assert_close(got, want)


def test_vision_windows_attend_in_few_calls_as_in_one_each(tiny_model, monkeypatch):
    """The vision tower's attention: its windows (and images, in its full-attention layers) attend in one sdpa call per
    size instead of one each, and the model computes what it does on transformers' sdpa: the same loss, logits and
    gradients. LIBERO's 448x224 tiles alone (every window alike: no gathers), and with a 96x256 image, whose edge
    windows are smaller (its 14x38 patches: windows of 64, 48 and 36 patches, interleaved), so that a window or a token
    mixed up shows."""
    import tiny
    d = tinyvla.DataArgs()
    model, processor = tinyvla.load_model(str(tiny_model), tinyvla.ModelArgs(dtype="float32"), d, "cpu")
    assert model.config.vision_config._attn_implementation == tinyvla.CHUNKED_SDPA
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # the tiny model's init is near zero: every window would attend alike
    obs, text_layers = observations(2), model.config.text_config.num_hidden_layers
    tiles = [{"images": tinyvla.prepare_images(o, d), "task": tiny.TASKS[i], "answer": "1 2 3 4 5 6 7"}
             for i, o in enumerate(obs)]
    odd = {"images": [torch.from_numpy(obs[1][0][:96]).permute(2, 0, 1)], "task": tiny.TASKS[1], "answer": "7 6 5"}
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    # sdpa calls in a forward pass, transformers' and ours: 8 windows per tile and the 96x256 image's 10 in the
    # windowed layer, then an image each in the full-attention one; ours a call per size; the text layers' alike
    for samples, want in (([*tiles], (16 + 2, 1 + 1)), (([tiles[0], odd]), (18 + 2, 3 + 2))):
        batch, got = tinyvla.Collator(processor, d, 7)(samples), {}
        for impl in ("sdpa", tinyvla.CHUNKED_SDPA):
            model.config.vision_config._attn_implementation = impl
            model.zero_grad()
            calls.clear()
            out = model(**batch)
            out.loss.backward()
            got[impl] = (out.loss, out.logits, [p.grad.clone() for p in model.model.visual.parameters()], len(calls))
        for a, b in zip(got[tinyvla.CHUNKED_SDPA][:2], got["sdpa"][:2]):
            torch.testing.assert_close(a, b)
        for a, b in zip(got[tinyvla.CHUNKED_SDPA][2], got["sdpa"][2]):
            torch.testing.assert_close(a, b)
        assert (got["sdpa"][3], got[tinyvla.CHUNKED_SDPA][3]) == tuple(n + text_layers for n in want)


def test_policy_attention_decodes_what_sdpa_decodes(noisy):
    """The whole model on the policy's attention (padded prompts, cached passes of several tokens) answers as on
    transformers' sdpa: the same actions from generate() and from the static decoder."""
    model, col, stats, obs, tasks = noisy
    answers = {}
    try:
        for attn in ("sdpa", tinyvla.PACKED_SDPA):
            model.set_attn_implementation(attn)  # every sub-model's: the vision tower's back to the policy's
            model.config.vision_config._attn_implementation = tinyvla.CHUNKED_SDPA
            answers[attn] = [tinyvla.predict(model, col, stats, obs[:3], tasks[:3], decoder)[0]
                             for decoder in ("generate", "static")]
    finally:
        model.set_attn_implementation(tinyvla.PACKED_SDPA)
        model.config.vision_config._attn_implementation = tinyvla.CHUNKED_SDPA
    assert len({tuple(row) for row in answers["sdpa"][0].reshape(3, -1)}) == 3  # rows that differ: a mix-up shows
    for got, want in zip(answers[tinyvla.PACKED_SDPA], answers["sdpa"]):
        assert np.array_equal(got, want)


def test_static_decoder_is_plain_greedy_in_fixed_shapes(noisy):
    """--decoder static: the speculative loop over a static KV cache, the batch padded to a power of two, the prompt to
    PROMPT_BUCKET tokens and every pass decode_width slots wide, so that a GPU compiles (CUDA graphs) each shape once:
    generate's actions, row for row, with or without a draft, in the speculative decoder's forward passes, none of
    them through the whole LM head (the grammar's 12 rows of it: a tenth of the 3B's weights not read a pass)."""
    model, col, stats, obs, tasks = noisy
    plain, _, _ = tinyvla.predict(model, col, stats, obs[:3], tasks[:3], "generate")
    assert len({tuple(row) for row in plain.reshape(3, -1)}) == 3
    for width, drafts in ((2, None), (8, [tinyvla.draft(c, 1) for c in plain])):
        _, _, passes = tinyvla.predict(model, col, stats, obs[:3], tasks[:3], "speculative", drafts, width)
        shapes = []  # per forward pass: (input_ids shape, attention_mask shape, cache type)
        hook = model.model.register_forward_pre_hook(lambda _, args, kw: shapes.append((
            *kw["input_ids"].shape, kw["attention_mask"].shape[1], type(kw["past_key_values"]).__name__)),
            with_kwargs=True)
        heads = model.lm_head.register_forward_hook(lambda *_: shapes.append("the whole LM head"))  # 12 rows do
        try:
            static, ok, static_passes = tinyvla.predict(model, col, stats, obs[:3], tasks[:3], "static", drafts, width)
        finally:
            hook.remove(), heads.remove()
        assert ok.all() and np.array_equal(plain, static) and static_passes == passes == len(shapes)
        (batch, prompt, _, cache), steps = shapes[0], set(shapes[1:])
        assert batch == 4 and prompt % tinyvla.PROMPT_BUCKET == 0 and cache == "StaticCache"
        assert len(steps) == 1 and next(iter(steps))[:2] == (4, width)  # one shape: compiled once
        caches = dict(model.static_caches)
        again, _, _ = tinyvla.predict(model, col, stats, obs[:3], tasks[:3], "static", drafts, width)
        assert np.array_equal(again, plain) and model.static_caches == caches  # the same cache reused, emptied


def test_static_caches_go_with_their_model(tiny_model):
    """A sweep loads checkpoint after checkpoint: the static decoder's caches must not keep the earlier ones alive."""
    import gc
    import weakref
    import tiny
    d = tinyvla.DataArgs()
    model, processor = tinyvla.load_model(str(tiny_model), tinyvla.ModelArgs(dtype="float32"), d, "cpu")
    images = [tinyvla.prepare_images(o, d) for o in observations(1)]
    tinyvla.predict(model.eval(), tinyvla.Collator(processor, d, 7), {"global": {"lo": [0.0] * 7, "hi": [1.0] * 7}},
                    images, [tiny.TASKS[0]], "static")
    assert model.static_caches
    freed = weakref.ref(model)
    del model
    gc.collect()
    assert freed() is None


def test_compiled_static_decoder_is_one_graph_and_plain_greedy(noisy):
    """What a GPU runs of --decoder static: its decode step compiled (torch.compile; CUDA graphs on a GPU, the CPU's
    inductor here). One graph, no graph break, compiled once for every call of a shape (a compile per call would cost
    more than it saves), and the uncompiled decoder's answers token for token (those are generate()'s, above)."""
    from torch._dynamo.utils import counters
    model, col, stats, obs, tasks = noisy
    inputs = col.prompts([{"images": o, "task": t} for o, t in zip(obs[:4], tasks[:4])], tinyvla.PROMPT_BUCKET)
    decode = lambda compiled: tinyvla.speculative_decode(model, inputs, tinyvla.ActionGrammar(
        col.processor.tokenizer, 56, 1000), col.pad_id, [[]] * 4, 2, static=True, compiled=compiled)
    plain = decode(False)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert decode(True) == plain and decode(True) == plain
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    finally:  # the compiled graph holds the static cache's tensors
        del model.static_caches
        torch._dynamo.reset()


def test_a_host_that_learns_the_end_a_pass_late_decodes_the_same(noisy):
    """A GPU's host reads whether every row has ended one pass late, so that it never waits for a pass (here, on the
    CPU, forced on): the same answers, in one pass more (all rows ended, its slots empty); with drafts too."""
    model, col, stats, obs, tasks = noisy
    inputs = col.prompts([{"images": o, "task": t} for o, t in zip(obs[:3], tasks[:3])])
    plain, _, _ = tinyvla.predict(model, col, stats, obs[:3], tasks[:3], "generate")
    lo, hi = tinyvla.action_bounds(stats)
    shifted = [tinyvla.actions_to_text(tinyvla.draft(c, 1), lo, hi, 1000).split() for c in plain]
    for width, drafts in ((2, [[]] * 3), (8, shifted)):
        (now, now_passes), (late, late_passes) = (tinyvla.speculative_decode(model, inputs, tinyvla.ActionGrammar(
            col.processor.tokenizer, 56, 1000), col.pad_id, drafts, width, lag=lag) for lag in (False, True))
        assert late == now and late_passes == now_passes + 1
        assert np.array_equal([tinyvla.text_to_actions(t, lo, hi, 1000, 8) for t in late], plain)


@pytest.mark.parametrize("batch", [1, 5])
def test_speculative_decoding_is_plain_greedy_in_fewer_passes(noisy, batch):
    """The speculative decoder returns generate()'s greedy actions whatever it is fed: one token per pass (width 1),
    the grammar's forced tokens folded in, an exact draft, the previous-chunk guess, a wrong draft; and it saves the
    forward passes it should. Printed: the passes per chunk of each path (pytest -s)."""
    model, col, stats, obs, tasks = noisy
    obs, tasks = obs[:batch], tasks[:batch]
    plain, _, generate_passes = tinyvla.predict(model, col, stats, obs, tasks, "generate")
    runs = {"width 1": (1, None), "forced tokens, width 2": (2, None), "forced tokens, width 8": (8, None),
            "exact draft": (16, list(plain)), "previous-chunk draft": (16, [tinyvla.draft(c, 1) for c in plain]),
            "wrong draft": (16, [1 - c for c in plain]), "the actions array as draft": (16, plain),
            "unusable drafts (NaN, 6 dims)": (16, [np.full((8, 7), np.nan), np.zeros((8, 6)), *plain[2:]][:batch]),
            "drafts of 4 and 9 steps": (16, [plain[0][:4], np.concatenate([plain[1 % batch], plain[1 % batch][-1:]]),
                                             *plain[2:]][:batch])}
    passes = {"generate": generate_passes}
    for name, (width, drafts) in runs.items():
        actions, ok, passes[name] = tinyvla.predict(model, col, stats, obs, tasks, "speculative", drafts, width)
        assert ok.all() and np.array_equal(actions, plain), name
    print(f"forward passes per chunk at batch {batch}:", passes)
    assert passes["width 1"] == generate_passes  # the prompt, then one per token but the end
    # 56 numbers: every one that cannot grow (here most: 3 digits over 100, or 0) saves its separator's pass
    assert passes["forced tokens, width 2"] == passes["forced tokens, width 8"] < 0.85 * generate_passes
    assert passes["exact draft"] <= 1 + math.ceil(8 * 7 * tinyvla.TOKENS_PER_NUMBER / 16) + 1
    assert passes["wrong draft"] <= passes["forced tokens, width 8"]


def reference_run(root, model, stats):
    """A run laid out as VLA-0's reference code saves it: model_last/ (save_pretrained), dataset_stats.pkl (the
    LeRobot stats of the action feature, numpy arrays, pickled) and its yacs config.yaml."""
    import pickle
    import shutil
    import yaml
    shutil.copytree(model, root / "model_last")
    (root / "dataset_stats.pkl").write_bytes(pickle.dumps(stats))
    (root / "config.yaml").write_text(yaml.safe_dump({"MODEL": {"QWEN": {
        "horizon": 4, "num_bins_actions": 1000, "add_vision_id": True, "tiled_rgb_imgs": True}}}))
    return root


def test_reference_vla0_checkpoint_loads_as_a_policy(tiny_model, tmp_path):
    lo, hi = np.linspace(-1, 0, 7, dtype=np.float32), np.linspace(0.5, 2, 7, dtype=np.float32)
    run = reference_run(tmp_path / "vla0", tiny_model, {"out_ori_act": {"min": lo, "max": hi, "count": np.array([9])}})
    frame = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    for path in (run, run / "model_last", tmp_path):  # the run dir, the model dir in it, a download holding vla0/
        policy = tinyvla.Policy(path, device="cpu")
        assert policy.d.horizon == 4 and policy.d.num_bins == 1000 and not policy.d.add_vision_id
        chunks = policy([[frame, frame]], ["open the drawer"])
        assert chunks.shape == (1, 4, 7) and (chunks >= lo - 1e-6).all() and (chunks <= hi + 1e-6).all()


def test_reference_stats_pickle_protocol_5(tiny_model, tmp_path):
    import pickle
    run = reference_run(tmp_path, tiny_model, {})
    stats = {"out_ori_act": {"min": np.zeros(7), "max": np.ones(7)}}
    (run / "dataset_stats.pkl").write_bytes(pickle.dumps(stats, protocol=5))  # numpy's _frombuffer path
    assert tinyvla.Policy(run, device="cpu").stats["global"]["hi"] == [1.0] * 7


def test_reference_stats_pickle_runs_no_code(tiny_model, tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    run = reference_run(tmp_path, tiny_model, {"out_ori_act": {"min": Payload(), "max": np.zeros(7)}})
    with pytest.raises(tinyvla.TinyVLAError, match=r"is not VLA-0's action stats.*it asks for posix\.system"):
        tinyvla.Policy(run, device="cpu")
    assert not (tmp_path / "ran").exists()


def test_checkpoints_of_older_versions_still_load(trained_run, tmp_path):
    """A checkpoint saved before train_suite, action_norm and eval_after_train were dropped loads; one trained with
    per-task bounds is refused (its answers mean something else), in one line."""
    import json
    import shutil
    ckpt = shutil.copytree(trained_run[0] / "final", tmp_path / "old")
    run = json.loads((ckpt / tinyvla.RUN_CONFIG).read_text())
    run["data"].update(train_suite="", action_norm="global")
    run["eval"]["eval_after_train"] = 0
    (ckpt / tinyvla.RUN_CONFIG).write_text(json.dumps(run))
    _, m, d, stats = tinyvla.load_run_info(ckpt)
    assert d.horizon == 8 and len(stats["global"]["lo"]) == 7
    assert tinyvla.parse_args(["--eval", str(ckpt)])[2].eval == str(ckpt)
    run["data"]["action_norm"] = "per_task"
    (ckpt / tinyvla.RUN_CONFIG).write_text(json.dumps(run))
    with pytest.raises(tinyvla.TinyVLAError, match="per-task action bounds"):
        tinyvla.load_run_info(ckpt)


def test_a_checkpoint_trained_with_flash_attention_loads_without_it(trained_run, tmp_path):
    """Eval and serving decode with sdpa: the kernel a run trained with need not be installed where it is used."""
    import json
    import shutil

    import tiny
    ckpt = shutil.copytree(trained_run[0] / "final", tmp_path / "fa2")
    run = json.loads((ckpt / tinyvla.RUN_CONFIG).read_text())
    run["model"]["attn_implementation"] = "flash_attention_2"
    (ckpt / tinyvla.RUN_CONFIG).write_text(json.dumps(run))
    policy = tinyvla.Policy(ckpt, device="cpu")
    assert policy.model.config._attn_implementation == tinyvla.PACKED_SDPA
    assert policy(observations(1), [tiny.TASKS[0]]).shape == (1, 8, 7)


def test_weights_id_fingerprints_the_weights_only(tmp_path):
    """What the eval's results record: another .safetensors or .bin weights file is another id; the training args
    saved beside them (training_args.bin) are no weights."""
    (tmp_path / "model.safetensors").write_bytes(b"a" * 100_000)
    (tmp_path / "training_args.bin").write_bytes(b"x")
    first = tinyvla.weights_id(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"y")
    assert tinyvla.weights_id(tmp_path) == first
    (tmp_path / "model.safetensors").unlink()
    ids = set()
    for content in (b"a", b"b"):
        (tmp_path / "pytorch_model.bin").write_bytes(content * 100_000)
        ids.add(tinyvla.weights_id(tmp_path))
    assert len(ids) == 2
