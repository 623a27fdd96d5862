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
from batchsd.model.config import TINY  # noqa: E402
from batchsd.model.diffusers_layout import diffusers_to_original  # noqa: E402
from batchsd.model.embeddings import (PLACEHOLDER_ID, EmbeddingError, EmbeddingLibrary, embed_tokens,  # noqa: E402
                                      read_embedding, tokenize_prompts, tokenize_text)
from batchsd.model.tokenizer import SD2_PAD_TOKEN, tokenize  # noqa: E402

from ref_checkpoint import write_original_checkpoint  # noqa: E402
from ref_clip import build_reference_clip  # noqa: E402
from ref_sdxl import (SDXL_TEST, build_reference_sdxl, reference_scheduler, sdxl_tokenizers,  # noqa: E402
                      write_sdxl_single_file)
from ref_unet import build_reference_unet  # noqa: E402
from ref_vae import build_reference_vae  # noqa: E402
from test_pipeline_parity import reference_scheduler as sd1_scheduler  # noqa: E402

MODULE_TOL = 1e-4
PROMPTS = ["a photo of mystyle, a catdoll on a table in zz-texture style",
           "catdoll and catdoll again, (mystyle:1.2) mystyle2",
           "a plain prompt without any embedding"]
PART_OF_A_WORD = "catdolls and xmystyle are not names here"   # A1111's rule; diffusers matches substrings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return dict(ours=Pipeline.load(path, device="cpu", dtype="fp32").model, pipe=pipe, folder=folder / "embeddings")


def test_library_reads_every_layout_and_finds_names(sd1):
    library = EmbeddingLibrary(sd1["folder"])
    assert sorted(library.files) == ["catdoll", "mystyle", "zz-texture"]
    assert [read_embedding(library.files[n]).vectors for n in ("mystyle", "catdoll", "zz-texture")] == [3, 2, 1]
    assert library.names_in(PROMPTS[0]) == ["mystyle", "catdoll", "zz-texture"]
    assert library.names_in(PROMPTS[1]) == ["catdoll", "mystyle"]              # "mystyle2" too
    assert library.names_in("MyStyle, CATDOLL") == ["mystyle", "catdoll"]   # case-insensitive, as CLIP's BPE
    assert library.names_in(PART_OF_A_WORD) == []


def test_placeholders_leave_the_other_tokens_as_the_tokenizer_makes_them(sd1):
    embeddings = EmbeddingLibrary(sd1["folder"]).for_model(["mystyle", "catdoll", "zz-texture"], sd1["ours"])
    for pad in (None, SD2_PAD_TOKEN):
        ids, slots, truncated = tokenize_prompts(PROMPTS, embeddings, pad)
        plain, plain_truncated = tokenize(PROMPTS[2:], pad)
        assert torch.equal(ids[2:], plain) and truncated[2:] == plain_truncated
        assert [len(s) for s in slots] == [6, 10, 0]
        assert all(ids[row, s.position] == PLACEHOLDER_ID for row, rs in enumerate(slots) for s in rs)
    pieces = tokenize_text("red mystyle!", embeddings, SD2_PAD_TOKEN)   # SD 2.x splits "!" out of the text
    assert pieces.ids[1:4] == [PLACEHOLDER_ID] * 3 and pieces.ids[-1] == 0 and len(pieces.ids) == 5


def test_long_prompts_keep_the_first_75_positions(sd1):
    embeddings = EmbeddingLibrary(sd1["folder"]).for_model(["mystyle"], sd1["ours"])
    prompt = "word " * 73 + "mystyle after"
    ids, slots, truncated = tokenize_prompts([prompt], embeddings)
    assert truncated == [True] and [s.position for s in slots[0]] == [74, 75]   # the third vector is cut
    assert ids[0, 76] == 49407


def test_sd1_text_encoder_matches_diffusers_load_textual_inversion(sd1):
    model, pipe = sd1["ours"], sd1["pipe"]
    embeddings = EmbeddingLibrary(sd1["folder"]).for_model(["mystyle", "catdoll", "zz-texture"], model)
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
    library = EmbeddingLibrary(tmp_path)
    with pytest.raises(EmbeddingError, match=r"wide .*768-wide vectors, the encoder is 64-wide"):
        library.for_model(["wide"], model)
    with pytest.raises(EmbeddingError, match=r"xl .* is for SDXL \(clip_l \+ clip_g\); the model needs SD 1\.x/2\.x"):
        library.for_model(["xl"], model)
    with pytest.raises(EmbeddingError, match=r"unknown layout"):
        library.get("odd")
    with pytest.raises(EmbeddingError, match=r"no embedding 'missing'"):
        library.get("missing")


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
    embeddings = EmbeddingLibrary(tmp_path / "emb").for_model(["xlstyle"], model)
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
    with pytest.raises(EmbeddingError, match=r"is for SD 1\.x/2\.x \(one 64-wide table\); the model needs SDXL"):
        save_file({"emb_params": torch.zeros(1, 64)}, str(tmp_path / "emb" / "one.safetensors"))
        EmbeddingLibrary(tmp_path / "emb").for_model(["one"], model)
