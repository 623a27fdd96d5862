"""Write the example manifests (jobs/prompts.csv, jobs/prompts.parquet, same content) and the
img2img input jobs/init_landscape.png (drawn procedurally). Run: python jobs/make_examples.py

Sizes and steps are small so that `batchsd run jobs/prompts.parquet --model tiny` finishes in about a
minute on a 2-core CPU. The rows show: A1111 and canonical sampler names, square and non-square
sizes, negative prompts, a pass-through column (`tag`), a row with no id and no seed (both
defaulted), rows in different places of the file that share a batch, and two img2img rows whose
size comes from the 132x100 input image (rounded down to 128x96).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLUMNS = ["id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
           "width", "height", "init_image", "strength", "tag"]
NEG = "blurry, low quality, watermark"

# id, prompt, negative_prompt, seed, steps, cfg_scale, sampler, width, height, init_image, strength, tag
ROWS = [
    ("fox_forest", "a red fox in a snowy forest, golden hour, detailed fur", NEG, 1234, 10, 7.5,
     "DPM++ 2M Karras", 128, 128, None, None, "animals"),
    ("lighthouse", "a lighthouse on a cliff at dusk, oil painting", "", 42, 10, 7.0,
     "Euler a", 128, 192, None, None, "landscape"),
    ("teapot", "a porcelain teapot on a wooden table, studio photo", NEG, 7, 8, 6.0,
     "ddim", 64, 64, None, None, "still life"),
    ("city_night", "a neon city street at night in the rain, cinematic", "people, text", 2024, 10, 8.0,
     "euler", 192, 128, None, None, "city"),
    ("owl_moon", "an owl on a branch in front of a full moon, ink drawing", NEG, 99, 10, 7.5,
     "dpmpp_2m_karras", 128, 128, None, None, "animals"),
    ("robot_garden", "a small rusty robot watering flowers, children's book illustration", "", 5, 8, 5.0,
     "DDPM", 96, 64, None, None, "characters"),
    (None, "a watercolor map of a small island with a harbour", "text, labels", None, 8, 7.5,
     "DPM++ 2M", 64, 96, None, None, "maps"),
    ("sushi", "a plate of sushi, top-down food photography", NEG, 314, 8, 6.0,
     "DDIM", 64, 64, None, None, "still life"),
    ("landscape_watercolor", "a watercolor painting of hills under a warm sky", NEG, 11, 12, 7.5,
     "DDIM", None, None, "init_landscape.png", 0.6, "img2img"),
    ("castle_clouds", "a castle floating on clouds, fantasy concept art", "", 77, 10, 4.0,
     "DPM++ 2M Karras", 128, 128, None, None, "fantasy"),
    ("landscape_winter", "the same hills in winter, covered in snow, photograph", NEG, 12, 12, 7.5,
     "ddim", None, None, "init_landscape.png", 0.65, "img2img"),
    ("abstract_waves", "abstract blue and orange waves, minimalism", "", 8, 6, 9.0,
     "euler_a", 80, 80, None, None, "abstract"),
]


def make_init_image(path: Path) -> None:
    """A 132x100 landscape: sky gradient, sun, two rows of hills, a lake (a few KB as PNG)."""
    width, height = 132, 100
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):  # sky: deep blue at the top to warm orange at the horizon
        t = y / (height * 0.6)
        draw.line([(0, y), (width, y)], fill=(int(40 + 200 * t), int(70 + 100 * t), int(160 - 60 * t)))
    draw.ellipse([88, 14, 112, 38], fill=(255, 220, 120))
    for base, amp, freq, colour in ((58, 8, 0.07, (70, 110, 70)), (70, 6, 0.11, (40, 85, 45))):
        for x in range(width):
            top = int(base - amp * math.sin(freq * x + base))
            draw.line([(x, top), (x, height)], fill=colour)
    draw.rectangle([0, 82, width, height], fill=(60, 100, 150))
    image = image.quantize(colors=32).convert("RGB")  # flat colours keep the PNG small
    image.save(path, optimize=True)


def write_manifests(csv_path: Path, parquet_path: Path) -> None:
    columns = list(zip(*ROWS))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in ROWS:
            writer.writerow(["" if v is None else v for v in row])
    types = [pa.string(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.string(),
             pa.int64(), pa.int64(), pa.string(), pa.float64(), pa.string()]
    table = pa.table({name: pa.array(values, type=t) for name, values, t in zip(COLUMNS, columns, types)})
    pq.write_table(table, parquet_path)


if __name__ == "__main__":
    make_init_image(HERE / "init_landscape.png")
    write_manifests(HERE / "prompts.csv", HERE / "prompts.parquet")
    for name in ("init_landscape.png", "prompts.csv", "prompts.parquet"):
        print(f"wrote jobs/{name} ({(HERE / name).stat().st_size:,} bytes)")
