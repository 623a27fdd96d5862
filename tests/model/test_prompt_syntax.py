"""A1111 prompt syntax (batchsd/model/prompt_syntax.py, text_conditioning.py) and clip skip.

- The parser: AUTOMATIC1111's own doctest cases for parse_prompt_attention (modules/prompt_parser.py),
  with the outputs it documents, and its schedule parser's cases for what batchsd refuses.
- The chunking: 75-token chunks with start/end tokens, BREAK, the comma backtrack (sd_hijack_clip.py).
- The conditioning against an independent reference written here from A1111's code structure on
  transformers' CLIPTextModel (random weights): hidden states of each 77-id chunk, clip skip as
  hidden_states[-N] through the final norm, multipliers then the original-mean restore.
- clip skip against diffusers' `clip_skip` (A1111's N is diffusers' N - 1).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from batchsd import GenerationRow, Pipeline
from batchsd.errors import InputError
from batchsd.model.clip import CLIPTextModel
from batchsd.model.config import TINY
from batchsd.model.family import SD1, pad_after_end
from batchsd.model.prompt_syntax import (BOS_ID, EOS_ID, chunk_prompt, fragment_tokenizer, looks_like_a1111,
                                         parse_attention, unsupported_a1111)
from batchsd.model.text_conditioning import encode_prompts

from ref_checkpoint import TOKENIZER_DATA
from ref_clip import build_reference_clip, reference_clip_state_dict_original

LONG = "a photo of a cat, " * 30   # 151 tokens


# ----------------------------------------------------------------------------- parser (A1111's doctests)

@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_attention_is_a1111s(text, expected):
    assert parse_attention(text) == expected


def test_break_and_edge_cases():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_attention("") == [("", 1.0)]
    assert parse_attention("[a]") == [("a", 1 / 1.1)]
    assert parse_attention("(a:0)") == [("a", 0.0)]
    # A1111's current pattern (":\s*([+-]?[.\d]+)\s*\)") takes spaces around the weight
    assert parse_attention("(house: 1.3)") == [("house", 1.3)]
    assert parse_attention("(house :1.3 )") == [("house ", 1.3)]


@pytest.mark.parametrize("text", ["a [b:3]", "a [b: 3]", "a [b : c : 1] d", "a [b:.5] c", "[a|(b:1.1)]",
                                  "a [cat|dog] in a hat", "[(a:2):3]",
                                  "(a cat:1.2.3)", "(a:.)"])   # weights A1111 itself fails on (float())
def test_prompt_editing_and_alternation_are_refused(text):
    assert unsupported_a1111(text)


@pytest.mark.parametrize("text", ["a (b:1.2) c", "[a]", "a \\[b:3\\]", "a \\[cat|dog\\]", "[a:b]", "plain"])
def test_emphasis_and_escapes_are_not_refused(text):
    assert unsupported_a1111(text) is None


def test_looks_like_a1111():
    assert looks_like_a1111("a (cat:1.2)") and looks_like_a1111("a BREAK b") and looks_like_a1111("[dog]")
    assert looks_like_a1111("a cat <lora:style:0.8>")    # plain text does not apply the tag: warned
    assert not looks_like_a1111("a photo of a cat, 4k") and not looks_like_a1111("a (cat")


# ----------------------------------------------------------------------------- chunking

def test_chunks_of_75_tokens_with_start_and_end():
    tokenize = fragment_tokenizer()
    chunks = chunk_prompt(LONG, tokenize)
    assert len(chunks) == 3 and all(len(c.ids) == 77 == len(c.weights) for c in chunks)
    assert all(c.ids[0] == BOS_ID and c.ids[-1] == EOS_ID for c in chunks)
    body = [t for c in chunks for t in c.ids[1:-1] if t != EOS_ID]
    assert body == tokenize([LONG])[0]                     # every token kept, in order
    # comma backtrack: each full chunk ends right after a comma (", " every 6 tokens here)
    assert all(c.ids[c.ids.index(EOS_ID) - 1] == 267 for c in chunks[:2])
    assert chunk_prompt("", tokenize)[0].ids == (BOS_ID,) + (EOS_ID,) * 76
    short = chunk_prompt("a cat", tokenize)
    assert len(short) == 1 and short[0].ids[:4] == (BOS_ID, 320, 2368, EOS_ID)
    broken = chunk_prompt("a cat BREAK a dog", tokenize)
    assert [c.ids[:4] for c in broken] == [(BOS_ID, 320, 2368, EOS_ID), (BOS_ID, 320, 1929, EOS_ID)]
    weighted = chunk_prompt("a (cat:1.5)", tokenize)[0]
    assert weighted.weights[:4] == (1.0, 1.0, 1.5, 1.0)


def test_short_plain_prompt_is_the_same_bits_in_both_syntaxes():
    pipe = Pipeline.load("tiny", device="cpu", dtype="fp32")
    plain = encode_prompts(SD1, pipe.model, ["a photo of a cat"], pipe.device, "plain")[0]
    a1111 = encode_prompts(SD1, pipe.model, ["a photo of a cat"], pipe.device, "a1111")[0]
    assert torch.equal(plain.context, a1111.context)


# ----------------------------------------------------------------------------- conditioning

def a1111_reference(text_model: transformers.CLIPTextModel, tokenizer, prompt: str, clip_skip: int) -> torch.Tensor:
    """A1111's FrozenCLIPEmbedderWithCustomWords for one prompt, written from its code (chunks built
    from parse_attention's runs; no comma backtrack: the test prompts have no full chunk)."""
    runs = parse_attention(prompt)
    pieces = tokenizer([t for t, _ in runs], truncation=False, add_special_tokens=False)["input_ids"]
    chunks, tokens, mults = [], [], []
    for ids, (text, weight) in zip(pieces, runs):
        if text == "BREAK" and weight == -1:
            chunks.append((tokens, mults))
            tokens, mults = [], []
            continue
        tokens += ids
        mults += [weight] * len(ids)
    chunks.append((tokens, mults))
    zs = []
    for tokens, mults in chunks:
        pad = 75 - len(tokens)
        ids = torch.tensor([[BOS_ID] + tokens + [EOS_ID] * pad + [EOS_ID]])
        m = torch.tensor([[1.0] + mults + [1.0] * pad + [1.0]])
        out = text_model(ids, output_hidden_states=True)
        final_norm = getattr(text_model, "text_model", text_model).final_layer_norm
        z = final_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 \
            else out.last_hidden_state
        original_mean = z.mean()
        z = z * m.reshape(m.shape + (1,)).expand(z.shape)
        zs.append(z * (original_mean / z.mean()))
    return torch.hstack(zs)[0]


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_conditioning_matches_an_a1111_reference(clip_skip):
    ref = build_reference_clip(TINY.clip, seed=3)
    ours = CLIPTextModel(TINY.clip)
    ours.load_state_dict(reference_clip_state_dict_original(ref))
    model = type("M", (), {"text_encoder": ours})()
    tokenizer = transformers.CLIPTokenizer(str(TOKENIZER_DATA / "vocab.json"), str(TOKENIZER_DATA / "merges.txt"))
    prompts = ["a (red:1.4) cube on a [table]", "((masterpiece)), a (((house:1.3)) [on] a (hill:0.5)",
               "a cat BREAK (a dog:0.7)", ""]
    encoded = encode_prompts(SD1, model, prompts, torch.device("cpu"), "a1111", skip=clip_skip - 1)
    for prompt, e in zip(prompts, encoded):
        expected = a1111_reference(ref, tokenizer, prompt, clip_skip)
        assert e.context.shape == expected.shape
        assert (e.context - expected).abs().max().item() <= 1e-5, prompt
    # weights matter: the same prompt read plain differs
    plain = encode_prompts(SD1, model, prompts[:1], torch.device("cpu"), "plain", skip=clip_skip - 1)[0]
    assert (plain.context - encoded[0].context).abs().max() > 1e-2


def test_pad_after_end_is_openclip_padding():
    ids = torch.tensor([[BOS_ID, 320, EOS_ID, EOS_ID, EOS_ID], [BOS_ID, 320, 2368, 1929, EOS_ID]])
    assert pad_after_end(ids).tolist() == [[BOS_ID, 320, EOS_ID, 0, 0], [BOS_ID, 320, 2368, 1929, EOS_ID]]


# ----------------------------------------------------------------------------- the pipeline

def test_long_a1111_rows_generate_and_batch_by_chunk_count():
    pipe = Pipeline.load("tiny", device="cpu", dtype="fp32")
    rows = [GenerationRow(LONG, seed=1, steps=2, width=64, height=64, prompt_syntax="a1111"),
            GenerationRow("a dog", negative_prompt=LONG, seed=2, steps=2, width=64, height=64, prompt_syntax="a1111")]
    out = pipe.generate(rows)
    alone = pipe.generate(rows[:1])
    assert out.prompt_truncated == [False, False]
    assert torch.allclose(out.latents[:1], alone.latents, atol=1e-4)
    with pytest.raises(InputError, match="split them with Pipeline.batch_key"):
        pipe.generate([rows[0], GenerationRow("a dog", seed=2, steps=2, width=64, height=64, prompt_syntax="a1111")])
    with pytest.raises(InputError, match="row 0, prompt: prompt editing"):
        pipe.generate([GenerationRow("a [cat:dog:0.5]", steps=1, width=64, height=64, prompt_syntax="a1111")])


def test_clip_skip_matches_diffusers_and_is_refused_where_fixed(tmp_path):
    pytest.importorskip("diffusers")
    from test_pipeline_parity import build_models, diffusers_run, reference_scheduler

    models = build_models(tmp_path)
    if not hasattr(models["clip"], "text_model"):
        # diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm, a level transformers 5's
        # CLIPTextModel no longer has: alias it (not registered as a submodule)
        object.__setattr__(models["clip"], "text_model", models["clip"])
    parts = dict(vae=models["vae"], text_encoder=models["clip"], tokenizer=models["tokenizer"], unet=models["unet"],
                 scheduler=reference_scheduler("euler"), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    pipe = models["ours"]
    # cfg 1: diffusers applies clip_skip to the prompt only, never to the negative prompt (A1111 and
    # batchsd apply it to both), so the comparison runs without the unconditional side
    row = GenerationRow("a red cube", negative_prompt="blurry", seed=3, steps=3, sampler="euler", width=64, height=64,
                        clip_skip=2, cfg_scale=1.0)
    image_ref, latents_ref = diffusers_run(parts, row, clip_skip=1)
    out = pipe.generate([row])
    rel = ((out.latents - latents_ref).abs().max() / latents_ref.abs().max()).item()
    assert rel <= 2e-3
    plain = pipe.generate([GenerationRow("a red cube", negative_prompt="blurry", seed=3, steps=3, sampler="euler",
                                         width=64, height=64, cfg_scale=1.0)])
    assert ((plain.latents - latents_ref).abs().max() / latents_ref.abs().max()).item() > 20 * 2e-3
    from dataclasses import replace

    from batchsd.model.family import SD2_EPS
    pipe.family = replace(SD1, clip_skip=False)
    try:
        with pytest.raises(InputError, match="clip_skip 2: .*fixed text encoder layer"):
            pipe.generate([row])
    finally:
        pipe.family = SD1
    assert not SD2_EPS.clip_skip
