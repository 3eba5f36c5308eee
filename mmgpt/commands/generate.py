"""Generate text with an mmgpt model.

    mmgpt generate --image assets/examples/0.png --prompt "What color is the circle?"
    mmgpt generate --model runs/shapes/.../last.ckpt --prompt "How many sides does a triangle have?"
    mmgpt generate --image photo.png          # no prompt: a caption

Without --model, the default model that ships with mmgpt answers. Sampling is off unless --do-sample is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import mmgpt  # cheap: its names load on first use, so --help and usage errors never wait for torch
from mmgpt.commands.arguments import argument_errors


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt generate") -> None:
    """Parse the arguments, load the model and print its answer (or stream it with ``--stream``).

    Args:
        argv: the arguments after the subcommand (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.

    Raises:
        SystemExit: status 2, with ``PROG: error: --model: REASON`` or ``--image``, for a model or an image that
            cannot be read (as argparse reports a bad argument).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: the shipped model)")
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
    args = parser.parse_args(argv)
    if args.image is None and args.prompt is None:
        parser.error("give --image, --prompt, or both")

    with argument_errors(parser, "--model"):
        model = mmgpt.load(args.model, map_location=args.device)
    image = None
    if args.image is not None:
        with argument_errors(parser, "--image"):
            image = model.encode_image(args.image)  # read once, here: its errors are the file's, not the prompt's
    sampling = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop, seed=args.seed,
    )
    if args.stream:
        for piece in model.stream(image, args.prompt, **sampling):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(image, args.prompt, num_beams=args.num_beams, **sampling))
