"""The A1111 `parameters` text (batchsd/job/png_metadata.py) read back with A1111's own parsing rules:
`re_param` and `unquote` from AUTOMATIC1111/stable-diffusion-webui modules/infotext_utils.py
(parse_generation_parameters, the part that splits prompt, negative prompt and settings)."""
from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from batchsd.job.png_metadata import a1111_parameters, encode_png, quote

# A1111, modules/infotext_utils.py
re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def a1111_quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    """A1111's parse_generation_parameters without its UI defaults and style handling."""
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in re_param.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    return res


def record(**over) -> dict:
    rec = {"id": "a", "prompt": "a cat, (detailed:1.2)", "negative_prompt": "blurry, low quality", "seed": 42,
           "steps": 20, "cfg_scale": 7.5, "sampler": "euler_a", "width": 512, "height": 768,
           "init_image": None, "strength": None}
    rec.update(over)
    return rec


@pytest.mark.parametrize("model", ["v1-5-pruned-emaonly", "anime, v2: final", 'my "best" model', "a:b",
                                   "comma, only", "line\nbreak", "ünïcode: ✓"])
def test_a1111_reads_every_setting_back(model):
    text = a1111_parameters(record(model=model, model_sha256="6ce0161689" + "0" * 54))
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == "a cat, (detailed:1.2)" and parsed["Negative prompt"] == "blurry, low quality"
    assert parsed["Model"] == model
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"]) == ("20", "Euler a", "7.5", "42")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Model hash"]) == ("512", "768", "6ce0161689")


def test_img2img_strength_and_no_negative_prompt():
    text = a1111_parameters(record(negative_prompt="", init_image="x.png", strength=0.75, model="m: x"))
    parsed = parse_generation_parameters(text)
    assert parsed["Negative prompt"] == "" and parsed["Denoising strength"] == "0.75" and parsed["Model"] == "m: x"
    assert "Model hash" not in parsed


def test_quoting_matches_a1111_where_a1111_quotes():
    for value in ("plain", "anime, v2: final", "a:b", "x\ny", "tiny-random", "DPM++ 2M Karras"):
        assert quote(value) == a1111_quote(value)
    # a value holding '"' alone: A1111 writes it bare; batchsd quotes it, which A1111 reads back the same
    assert quote('say "hi"') == '"say \\"hi\\""' and unquote(quote('say "hi"')) == 'say "hi"'
    assert "Model: anime, v2: final" not in a1111_parameters(record(model="anime, v2: final"))
    assert 'Model: "anime, v2: final"' in a1111_parameters(record(model="anime, v2: final"))


def test_png_chunk_holds_the_quoted_text():
    text = a1111_parameters(record(model="anime, v2: final"))
    png = encode_png(Image.new("RGB", (8, 8)), text, json.dumps(record()))
    with Image.open(io.BytesIO(png)) as im:
        assert parse_generation_parameters(im.text["parameters"])["Model"] == "anime, v2: final"
        assert json.loads(im.text["batchsd"])["seed"] == 42
