"""Textual inversion (batchsd/model/embeddings.py) against diffusers' load_textual_inversion on random tiny
models: A1111 .pt / .safetensors and diffusers learned_embeds files, multi-vector, SD 1.x and SDXL (two
encoders). Text-encoder outputs within 1e-4 (the parity tests' module tolerance), and the embedding must
move them by far more.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from batchsd import Pipeline  # noqa: E402
from batchsd.errors import InputError  # noqa: E402
from batchsd.model.config import TINY  # noqa: E402
from batchsd.model.diffusers_layout import diffusers_to_original  # noqa: E402
from batchsd.model.embeddings import (PLACEHOLDER_ID, EmbeddingError, check_fits, embed_tokens,  # noqa: E402
                                      load_embedding, read_embedding, tokenize_prompts, tokenize_text)
from batchsd.job.embeddings import embedding_files  # noqa: E402
from batchsd.model.family import SD1  # noqa: E402
from batchsd.model.prompt_syntax import EmbeddingRef, chunk_prompt, embedding_pattern, fragment_tokenizer  # noqa: E402
from batchsd.model.request import GenerationRow, row_batch_key  # noqa: E402
from batchsd.model.text_conditioning import encode_prompts  # noqa: E402
from batchsd.model.tokenizer import SD2_PAD_TOKEN, tokenize  # noqa: E402

from ref_checkpoint import write_original_checkpoint  # noqa: E402
from ref_clip import build_reference_clip  # noqa: E402
from ref_sdxl import (SDXL_TEST, build_reference_sdxl, reference_scheduler, sdxl_run, sdxl_tokenizers,  # noqa: E402
                      write_sdxl_single_file)
from ref_unet import build_reference_unet  # noqa: E402
from ref_vae import build_reference_vae  # noqa: E402
from ref_sd2 import SD2_TEST, build_reference_sd2, write_sd2_single_file  # noqa: E402
from ref_sd2 import reference_scheduler as sd2_scheduler  # noqa: E402
from test_pipeline_parity import assert_close, diffusers_run  # noqa: E402
from test_pipeline_parity import reference_scheduler as sd1_scheduler  # noqa: E402

MODULE_TOL = 1e-4
PROMPTS = ["a photo of mystyle, a catdoll on a table in zz-texture style",
           "catdoll and catdoll again, (mystyle:1.2) mystyle2",
           "a plain prompt without any embedding"]
PART_OF_A_WORD = "catdolls and xmystyle are not names here"   # A1111's rule; diffusers matches substrings


pytestmark = pytest.mark.usefixtures("one_thread")


def write_sd1_embeddings(folder: Path, width: int) -> dict[str, Path]:
    """One file per layout: A1111 .pt (3 vectors), A1111 .safetensors (2), diffusers learned_embeds (1)."""
    gen = torch.Generator().manual_seed(7)
    vectors = lambda n: torch.randn(n, width, generator=gen)   # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    files = {"mystyle": folder / "mystyle.pt", "catdoll": folder / "catdoll.safetensors",
             "zz-texture": folder / "zz-texture.bin"}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors(3))},
                "name": "mystyle", "step": 1000, "sd_checkpoint": "4c86efd062", "sd_checkpoint_name": "tiny"},
               files["mystyle"])   # as A1111 saves them: the vectors a Parameter
    save_file({"emb_params": vectors(2)}, str(files["catdoll"]))
    torch.save({"<zz-texture>": vectors(1)[0]}, files["zz-texture"])
    return files


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti_sd1")
    clip, vae, unet = (build_reference_clip(TINY.clip, seed=11), build_reference_vae(TINY.vae, seed=12),
                       build_reference_unet(TINY.unet, seed=13))
    path = write_original_checkpoint(folder / "tiny.safetensors", diffusers_to_original("unet", unet.state_dict()),
                                     diffusers_to_original("vae", vae.state_dict()),
                                     diffusers_to_original("text_encoder", clip.state_dict()), dtype=torch.float32)
    files = write_sd1_embeddings(folder / "embeddings", TINY.clip.width)
    # diffusers adds tokens to the tokenizer it is given: its own copy, not batchsd's shared one
    tokenizer = sdxl_tokenizers()[0]      # SD 1.x's: CLIP's BPE, <|endoftext|> padding
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd1_scheduler("euler"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for name, file in files.items():
        pipe.load_textual_inversion(str(file), token=name)
    pipeline = Pipeline.load(path, device="cpu", dtype="fp32")
    return dict(ours=pipeline.model, pipeline=pipeline, pipe=pipe, folder=folder / "embeddings", files=files)


def for_model(folder: Path, names: list[str], model) -> dict:
    """{name: Embedding} of the named files in `folder`, each checked against `model`."""
    files = {name: paths[0] for name, paths in embedding_files(folder).items()}
    out = {}
    for name in names:
        embedding = load_embedding(files[name])
        check_fits(embedding, model)
        out[name] = embedding
    return out


def names_in(text: str, names) -> list[str]:
    pattern = embedding_pattern(names)
    by_lower = {n.lower(): n for n in names}
    return list(dict.fromkeys(by_lower[m.lower()] for m in pattern.findall(text)))


def test_every_layout_reads_and_names_are_found(sd1):
    files = embedding_files(sd1["folder"])
    assert sorted(files) == ["catdoll", "mystyle", "zz-texture"]
    assert [read_embedding(files[n][0]).vectors for n in ("mystyle", "catdoll", "zz-texture")] == [3, 2, 1]
    assert names_in(PROMPTS[0], files) == ["mystyle", "catdoll", "zz-texture"]
    assert names_in(PROMPTS[1], files) == ["catdoll", "mystyle"]              # "mystyle2" too
    assert names_in("MyStyle, CATDOLL", files) == ["mystyle", "catdoll"]   # case-insensitive, as CLIP's BPE
    assert names_in(PART_OF_A_WORD, files) == []


def test_placeholders_leave_the_other_tokens_as_the_tokenizer_makes_them(sd1):
    embeddings = for_model(sd1["folder"], ["mystyle", "catdoll", "zz-texture"], sd1["ours"])
    for pad in (None, SD2_PAD_TOKEN):
        ids, slots, truncated = tokenize_prompts(PROMPTS, embeddings, pad)
        plain, plain_truncated = tokenize(PROMPTS[2:], pad)
        assert torch.equal(ids[2:], plain) and truncated[2:] == plain_truncated
        assert [len(s) for s in slots] == [6, 10, 0]
        assert all(ids[row, s.position] == PLACEHOLDER_ID for row, rs in enumerate(slots) for s in rs)
    pieces = tokenize_text("red mystyle!", embeddings, SD2_PAD_TOKEN)   # SD 2.x splits "!" out of the text
    assert pieces.ids[1:4] == [PLACEHOLDER_ID] * 3 and pieces.ids[-1] == 0 and len(pieces.ids) == 5


def test_long_prompts_keep_the_first_75_positions(sd1):
    embeddings = for_model(sd1["folder"], ["mystyle"], sd1["ours"])
    prompt = "word " * 73 + "mystyle after"
    ids, slots, truncated = tokenize_prompts([prompt], embeddings)
    assert truncated == [True] and [s.position for s in slots[0]] == [74, 75]   # the third vector is cut
    assert ids[0, 76] == 49407


def test_sd1_text_encoder_matches_diffusers_load_textual_inversion(sd1):
    model, pipe = sd1["ours"], sd1["pipe"]
    embeddings = for_model(sd1["folder"], ["mystyle", "catdoll", "zz-texture"], model)
    ids, slots, _ = tokenize_prompts(PROMPTS, embeddings)
    with torch.no_grad():
        got = model.text_encoder(ids, token_embeds=embed_tokens(model.text_encoder, ids, slots))
        plain = model.text_encoder(ids)
        for row, prompt in enumerate(PROMPTS):
            want = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            diff = (got[row:row + 1] - want).abs().max().item()
            assert diff <= MODULE_TOL, f"{prompt!r}: {diff:.2e}"
            if slots[row]:
                assert (plain[row:row + 1] - want).abs().max() > 0.1, "the embedding changed nothing"


def test_embeddings_for_another_model_are_refused(sd1, tmp_path):
    model = sd1["ours"]
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "wide.safetensors"))
    save_file({"clip_l": torch.zeros(2, 64), "clip_g": torch.zeros(2, 64)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(EmbeddingError, match=r"wide .*768-wide vectors, the encoder is 64-wide"):
        for_model(tmp_path, ["wide"], model)
    with pytest.raises(EmbeddingError, match=r"xl .* is for SDXL \(clip_l \+ clip_g\); the model needs SD 1\.x/2\.x"):
        for_model(tmp_path, ["xl"], model)
    with pytest.raises(EmbeddingError, match=r"unknown layout"):
        load_embedding(tmp_path / "odd.safetensors")
    with pytest.raises(EmbeddingError, match=r"missing.pt does not exist"):
        load_embedding(tmp_path / "missing.pt")
    save_file({"emb_params": torch.zeros(76, 64)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(EmbeddingError, match=r"76 vectors: a prompt chunk holds 1\.\.75"):
        load_embedding(tmp_path / "long.safetensors")


# ----------------------------------------------------------------------------- SDXL

def test_sdxl_two_encoder_embedding_matches_diffusers(tmp_path):
    ref = build_reference_sdxl(SDXL_TEST)
    path = write_sdxl_single_file(tmp_path / "sdxl.safetensors", ref)
    model = Pipeline.load(path, device="cpu", dtype="fp32").model
    gen = torch.Generator().manual_seed(9)
    tables = {"clip_l": torch.randn(2, SDXL_TEST.clip.width, generator=gen),
              "clip_g": torch.randn(2, SDXL_TEST.clip2.width, generator=gen)}
    (tmp_path / "emb").mkdir()
    save_file(tables, str(tmp_path / "emb" / "xlstyle.safetensors"))
    pipe = StableDiffusionXLPipeline(scheduler=reference_scheduler(EulerDiscreteScheduler), **ref)
    pipe.load_textual_inversion(tables["clip_l"], token="xlstyle", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tables["clip_g"], token="xlstyle", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    # transformers pools at the largest id when a config's eos_token_id is the legacy 2 (SDXL's is), which
    # with added tokens is the embedding's; sgm and A1111 pool at <|endoftext|>, as batchsd does, and so
    # does transformers with the end token's real id
    pipe.text_encoder_2.text_model.eos_token_id = 49407
    embeddings = for_model(tmp_path / "emb", ["xlstyle"], model)
    prompt = "a xlstyle portrait of a cat"
    ids, slots, _ = tokenize_prompts([prompt], embeddings)
    ids2, slots2, _ = tokenize_prompts([prompt], embeddings, SD2_PAD_TOKEN)
    with torch.no_grad():
        first = model.text_encoder(ids, token_embeds=embed_tokens(model.text_encoder, ids, slots, "clip_l"))
        second, pooled = model.text_encoder_2.forward_with_pooled(
            ids2, token_embeds=embed_tokens(model.text_encoder_2, ids2, slots2, "clip_g"))
        plain_second, _ = model.text_encoder_2.forward_with_pooled(ids2)
        context, _, want_pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
    assert (torch.cat([first, second], -1) - context).abs().max() <= MODULE_TOL
    assert (pooled - want_pooled).abs().max() <= MODULE_TOL
    assert (plain_second - context[..., SDXL_TEST.clip.width:]).abs().max() > 0.1
    # through Pipeline.generate: the row's embedding file, in both encoders, and the pooled vector
    ours = Pipeline.load(path, device="cpu", dtype="fp32")
    row = GenerationRow(prompt=prompt, negative_prompt="xlstyle, blurry", seed=5, steps=3, sampler="euler",
                        width=64, height=64, embeddings=(str(tmp_path / "emb" / "xlstyle.safetensors"),))
    image_ref, latents_ref = sdxl_run(ref, reference_scheduler(EulerDiscreteScheduler), row)
    out = ours.generate([row])
    assert_close(out.images[0], out.latents, image_ref, latents_ref)
    with pytest.raises(EmbeddingError, match=r"is for SD 1\.x/2\.x \(one 64-wide table\); the model needs SDXL"):
        save_file({"emb_params": torch.zeros(1, 64)}, str(tmp_path / "emb" / "one.safetensors"))
        for_model(tmp_path / "emb", ["one"], model)


# ----------------------------------------------------------------------------- through Pipeline.generate

def _no_safety(parts: dict) -> dict:
    return {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def test_sd1_generate_with_embeddings_matches_diffusers(sd1):
    """A row naming three embeddings of three layouts (prompt and negative prompt) against diffusers'
    pipeline with load_textual_inversion; without the row's files the same row is another image."""
    files = tuple(str(p) for p in sd1["files"].values())
    row = GenerationRow(prompt=PROMPTS[0], negative_prompt="catdoll, blurry", seed=3, steps=3, sampler="euler",
                        width=64, height=64, embeddings=files)
    out = sd1["pipeline"].generate([row])
    parts = {k: v for k, v in sd1["pipe"].components.items() if k != "image_encoder"}
    image_ref, latents_ref = diffusers_run(_no_safety({**parts, "scheduler": sd1_scheduler("euler")}), row)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)
    without = sd1["pipeline"].generate([GenerationRow(**{**row.__dict__, "embeddings": ()})])
    assert (without.latents - out.latents).abs().max() > 1e-2, "the embeddings changed nothing"


def test_sd2_generate_with_embeddings_matches_diffusers(tmp_path):
    ref = build_reference_sd2(SD2_TEST, "epsilon", seed=20)
    path = write_sd2_single_file(tmp_path / "sd2.safetensors", ref)
    ours = Pipeline.load(path, device="cpu", dtype="fp32", prediction_type="epsilon")
    vectors = torch.randn(2, SD2_TEST.clip.width, generator=torch.Generator().manual_seed(4))
    save_file({"emb_params": vectors}, str(tmp_path / "sd2style.safetensors"))
    row = GenerationRow(prompt="a sd2style house by the sea!", negative_prompt="sd2style", seed=8, steps=3,
                        sampler="euler", width=64, height=64, embeddings=(str(tmp_path / "sd2style.safetensors"),))
    out = ours.generate([row])
    parts = dict(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"], unet=ref["unet"],
                 scheduler=sd2_scheduler(EulerDiscreteScheduler, "epsilon"))
    pipe = StableDiffusionPipeline(**_no_safety(parts))
    pipe.load_textual_inversion(str(tmp_path / "sd2style.safetensors"), token="sd2style")
    image_ref, latents_ref = diffusers_run(_no_safety(parts), row)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)


def test_a1111_chunks_keep_an_embedding_whole():
    """A1111's tokenize_line: an embedding that does not fit the chunk's room starts the next chunk; the
    comma backtrack moves an embedding after the last comma with the text around it."""
    tokenize = fragment_tokenizer({"mystyle": 3})
    assert tokenize(["a mystyle cat"])[0][1] == EmbeddingRef("mystyle", 3)
    full = chunk_prompt("word " * 74 + "mystyle cat", tokenize)   # 74 + 3 > 75: the embedding moves on
    assert len(full) == 2 and full[0].embeddings == () and full[0].ids[75] != 0
    assert full[1].embeddings == ((1, "mystyle"),) and full[1].ids[1:4] == (0, 0, 0)
    fits = chunk_prompt("word " * 72 + "mystyle cat", tokenize)   # 72 + 3 = 75: it fits
    assert fits[0].embeddings == ((73, "mystyle"),) and fits[1].ids[1] != 0
    comma = chunk_prompt("word " * 70 + ", mystyle " + "cat " * 10, tokenize)
    # 70 words, the comma (71st), the 3 vectors and "cat" fill 75; the next "cat" moves all after the comma
    assert comma[0].embeddings == () and comma[0].ids[72] == comma[0].ids[-1]
    assert comma[1].embeddings == ((1, "mystyle"),) and comma[1].weights[1:4] == (1.0, 1.0, 1.0)
    emphasized = chunk_prompt("(mystyle:1.3) cat", tokenize)[0]
    assert emphasized.weights[1:5] == (1.3, 1.3, 1.3, 1.0)


def test_a1111_syntax_with_embeddings(sd1):
    """One chunk without emphasis is the plain reading; a chunk break puts the embedding in the second
    chunk, which is then that text's own plain encoding; the batch key counts the vectors."""
    model = sd1["ours"]
    embeddings = for_model(sd1["folder"], ["mystyle", "catdoll", "zz-texture"], model)
    with torch.no_grad():
        plain = encode_prompts(SD1, model, PROMPTS[:1], torch.device("cpu"), "plain", 0, embeddings)[0].context
        a1111 = encode_prompts(SD1, model, PROMPTS[:1], torch.device("cpu"), "a1111", 0, embeddings)[0].context
        assert torch.allclose(plain, a1111, atol=1e-6, rtol=0)
        long = "word " * 74 + "mystyle cat"
        chunked = encode_prompts(SD1, model, [long], torch.device("cpu"), "a1111", 0, embeddings)[0].context
        second = encode_prompts(SD1, model, ["mystyle cat"], torch.device("cpu"), "plain", 0, embeddings)[0].context
    assert chunked.shape[0] == 154 and torch.allclose(chunked[77:], second, atol=1e-6, rtol=0)
    row = GenerationRow(prompt="word " * 73 + "mystyle", prompt_syntax="a1111", width=64, height=64)
    assert row_batch_key(row)[5] == 1
    assert row_batch_key(GenerationRow(**{**row.__dict__, "embeddings": (str(sd1["files"]["mystyle"]),)}))[5] == 2


def test_embedding_for_another_family_fails_the_row(sd1, tmp_path):
    save_file({"clip_l": torch.zeros(1, 64), "clip_g": torch.zeros(1, 64)}, str(tmp_path / "xlonly.safetensors"))
    row = GenerationRow(prompt="a xlonly cat", width=64, height=64, steps=1,
                        embeddings=(str(tmp_path / "xlonly.safetensors"),))
    with pytest.raises(InputError, match=r"row 0, embeddings: embedding xlonly .* is for SDXL .*; this SD 1\.x model"):
        sd1["pipeline"].generate([row])
    twice = GenerationRow(prompt="x", embeddings=(str(sd1["files"]["mystyle"]), str(tmp_path / "mystyle.pt")))
    with pytest.raises(InputError, match=r"embeddings: two embedding files share the name 'mystyle'"):
        sd1["pipeline"].generate([twice])

