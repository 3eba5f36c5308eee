"""Generate text with an mmgpt model.

    python scripts/generate.py --image assets/examples/0.png --prompt "What color is the circle?"
    python scripts/generate.py --model runs/shapes/.../last.ckpt --prompt "How many sides does a triangle have?"
    python scripts/generate.py --image photo.png          # no prompt: a caption
"""

from __future__ import annotations

import argparse

import mmgpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: assets/default_model)")
    parser.add_argument("--image", default=None, help="image file; omit for text-only generation")
    parser.add_argument("--prompt", default=None, help="question or instruction; omit with --image for a caption")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not returned")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.image is None and args.prompt is None:
        parser.error("give --image, --prompt, or both")
    model = mmgpt.load(args.model, map_location=args.device)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop, seed=args.seed,
    )
    if args.stream:
        for piece in model.stream(args.image, args.prompt, **sampling):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(args.image, args.prompt, num_beams=args.num_beams, **sampling))


if __name__ == "__main__":
    main()
