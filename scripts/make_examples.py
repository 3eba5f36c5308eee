"""Write example scenes to assets/examples/ and a picture grid of the model's captions and answers.

    python scripts/make_examples.py [--model assets/default_model] [--out assets/examples] [--n 4]

Examples are drawn from the test split (never seen in training). For each: ``{i}.png`` (the scene),
an entry in ``examples.json`` (ground truth caption and questions), and one ``grid.png`` showing every scene
next to the model's caption and answers, marked right or wrong.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import mmgpt
from mmgpt.data import ShapesConfig, ShapesDataset
from mmgpt.data.scenes import render_scene
from mmgpt.data.shapes_language import caption
from mmgpt.eval.metrics import exact_match

DISPLAY = 192  # scenes are rendered at the model's input size (tens of px); upscaled, nearest, to read in a README


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: assets/default_model)")
    parser.add_argument("--out", type=Path, default=Path("assets/examples"))
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    pipe = mmgpt.load(args.model)
    # Rendered at the model's own input size, as in training: no resampling blur between the picture and the model.
    ds = ShapesDataset("test", size=args.n, config=ShapesConfig(image_size=pipe.processor.img_size), qa_per_scene=3)
    args.out.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=14)
    examples, panels = [], []
    for i in range(args.n):
        scene = ds.scene(i)
        image = render_scene(scene, ds.config.image_size)
        image.save(args.out / f"{i}.png")
        qas = ds.questions(i)
        questions = [qa.question for qa in qas]
        outputs = pipe.generate([image] * (len(qas) + 1), [None, *questions])
        lines = [("caption: " + outputs[0], exact_match(outputs[0], [caption(scene)]) == 1.0)]
        for qa, out in zip(qas, outputs[1:], strict=True):
            lines.append((f"{qa.question} {out}", exact_match(out, [qa.answer]) == 1.0))
        examples.append({
            "file": f"{i}.png", "caption": caption(scene),
            "questions": [{"question": qa.question, "answer": qa.answer, "qtype": qa.qtype} for qa in qas],
        })
        scale = max(1, DISPLAY // image.width)
        big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        # Long captions wrap; each line starts with a green (right) or red (wrong) dot: the default font has no
        # check-mark glyph.
        rows = [(piece, ok, k == 0) for text, ok in lines for k, piece in enumerate(textwrap.wrap(text, 62))]
        panel = Image.new("RGB", (big.width + 560, max(big.height, 14 + 22 * len(rows)) + 8), "white")
        panel.paste(big, (4, 4))
        draw = ImageDraw.Draw(panel)
        x = big.width + 16
        for k, (text, ok, first) in enumerate(rows):
            y, colour = 10 + 22 * k, (0, 110, 0) if ok else (180, 0, 0)
            if first:
                draw.ellipse([x, y + 4, x + 9, y + 13], fill=colour)
            draw.text((x + 16, y), text, fill=colour, font=font)
        panels.append(panel)
    grid = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        grid.paste(p, (0, y))
        y += p.height
    grid.save(args.out / "grid.png")
    (args.out / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    print(f"wrote {args.n} examples and grid.png to {args.out}")


if __name__ == "__main__":
    main()
