"""Render the thumbnails ComfyUI's Browse Templates shows for the shipped workflows (workflows/<name>.jpg).

A title card per workflow, every word read from the workflow itself: the variant and the video (frames,
width, height) from its VRAM Estimate, the duration from Save Video's fps, the card from its Note's
"For:" line, LoRA when it has a LoRA Loader. The video's frame is drawn to scale (1360x768 beside
720x480 shows the size difference); nothing in it is a video frame. A distinct colour per workflow.

The frontend draws a thumbnail in a 256x256 box (object-contain): square, 512 px for sharp screens,
text at least 30 px (15 on screen).

    python3 tools/workflow_thumbnails.py            # rewrites workflows/*.jpg
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
MARGIN = 32
FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf")
VARIANT = {"CogVideoX1.5-5B-I2V": "CogVideoX1.5", "CogVideoX-5B-I2V": "CogVideoX-5B"}
# background per (variant, card, LoRA); a workflow not listed here gets GREY and a warning
COLOURS = {
    ("CogVideoX1.5-5B-I2V", "24 GB cards", False): (31, 86, 150),
    ("CogVideoX1.5-5B-I2V", "12 GB and 8 GB cards", False): (27, 112, 72),
    ("CogVideoX1.5-5B-I2V", "24 GB cards", True): (104, 58, 156),
    ("CogVideoX-5B-I2V", "any card", False): (160, 84, 18),
}
GREY = (70, 70, 70)


def font(size: int) -> ImageFont.FreeTypeFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def fitted(draw: ImageDraw.ImageDraw, text: str, largest: int, width: int) -> ImageFont.FreeTypeFont:
    """The largest font (down to 30 px) that draws text within width."""
    for size in range(largest, 29, -2):
        f = font(size)
        if draw.textlength(text, font=f) <= width:
            return f
    return font(30)


def facts(workflow: dict) -> dict:
    """What the card says, read from the workflow's nodes."""
    by_type = {n["type"]: n for n in workflow["nodes"]}
    variant, frames, width, height = by_type["CogVidVRAMEstimate"]["widgets_values"][:4]
    fps = by_type["CogVidSaveVideo"]["widgets_values"][0] or (8 if frames <= 49 else 16)
    card = re.search(r"For: ([^.(;]+)", by_type["Note"]["widgets_values"][0]).group(1).strip()
    return {"variant": variant, "frames": frames, "width": width, "height": height,
            "seconds": round(frames / fps), "fps": int(fps), "card": card, "lora": "CogVidLoraLoader" in by_type}


def centred(draw, y: int, text: str, f, fill=(255, 255, 255)) -> int:
    """Draw text centred at y (its top); returns the y under it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    draw.text(((SIZE - (right - left)) / 2 - left, y - top), text, font=f, fill=fill)
    return y + bottom - top


def render(fx: dict) -> Image.Image:
    colour = COLOURS.get((fx["variant"], fx["card"], fx["lora"]))
    if colour is None:
        print(f"no colour for {fx['variant']}, {fx['card']}, LoRA {fx['lora']}: grey (add it to COLOURS)")
    img = Image.new("RGB", (SIZE, SIZE), colour or GREY)
    d = ImageDraw.Draw(img)
    inner = SIZE - 2 * MARGIN
    title = VARIANT.get(fx["variant"], fx["variant"])
    y = centred(d, 34, title, fitted(d, title, 76, inner))
    y = centred(d, y + 16, "image to video", font(40), fill=(235, 235, 235))
    # the video's frame to scale: 1360 px wide -> 264 px
    w, h = round(fx["width"] * 264 / 1360), round(fx["height"] * 264 / 1360)
    top = y + 28
    box = ((SIZE - w) // 2, top, (SIZE + w) // 2, top + h)
    d.rectangle(box, fill=tuple(c // 2 for c in colour or GREY), outline=(255, 255, 255), width=4)
    dims, line = f"{fx['width']}x{fx['height']}", f"{fx['frames']} frames, {fx['seconds']} s"
    f = fitted(d, dims, 44, w - 24)
    if f.size >= 34 and d.textlength(dims, font=f) <= w - 24:     # the size inside the frame, else under it
        left, t, right, b = d.textbbox((0, 0), dims, font=f)
        d.text(((SIZE - (right - left)) / 2 - left, top + (h - (b - t)) / 2 - t), dims, font=f, fill=(255, 255, 255))
        y = top + h
    else:
        y = centred(d, top + h + 16, dims, font(40))
    centred(d, y + 16, line, fitted(d, line, 40, inner))
    if fx["lora"]:                                     # a gold tag on the frame's top right corner
        f = font(40)
        tw = d.textlength("+ LoRA", font=f)
        x1, y0 = min(box[2] + 40, SIZE - MARGIN // 2), top - 22
        d.rounded_rectangle((x1 - tw - 28, y0, x1, y0 + 56), radius=14, fill=(246, 196, 40))
        d.text((x1 - tw - 14, y0 + 6), "+ LoRA", font=f, fill=(30, 30, 30))
    band = SIZE - 96
    d.rectangle((0, band, SIZE, SIZE), fill=(20, 20, 20))
    centred(d, band + 26, fx["card"], fitted(d, fx["card"], 46, inner))
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workflows", default=str(ROOT / "workflows"), help="folder of the workflows (.json in, .jpg out)")
    args = p.parse_args(argv)
    for path in sorted(Path(args.workflows).glob("*.json")):
        out = path.with_suffix(".jpg")
        render(facts(json.loads(path.read_text()))).save(out, quality=90, optimize=True, progressive=True)
        print(f"{out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
