"""Serve an mmgpt model over HTTP with OpenAI's chat completions API, decoding concurrent requests in batches.

    mmgpt serve                                   # the shipped model on http://127.0.0.1:8000
    mmgpt serve --model runs/shapes/export --port 8080 --model-name shapes
    python -m mmgpt.commands.serve --allow-local-files

Then point any OpenAI client at http://127.0.0.1:8000/v1, or open http://127.0.0.1:8000/ for the chat page.
Sampling follows OpenAI: temperature defaults to 1.0; send temperature=0 for greedy (deterministic) answers.
Images come inline as data:image/...;base64 URLs; http(s) URLs are never fetched, and local paths or file://
URLs are read only with --allow-local-files.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt serve") -> None:
    """Parse the arguments, load the model and run the server until interrupted.

    Args:
        argv: the arguments after the subcommand (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.

    Raises:
        SystemExit: status 2, with ``PROG: error: --model: REASON``, for a model that cannot be loaded.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: the shipped model)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients send as `model` (default: the model directory's name, or mmgpt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allow-local-files", action="store_true",
                        help="read image_url paths and file:// URLs from this machine (off: data URLs only)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=256, help="most requests waiting; more get a 503")
    parser.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body, in MiB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 often serves best on a small CPU, "
                             "where the HTTP side needs a core too")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    # After parsing: --help and usage errors never wait for torch.
    import uvicorn

    import mmgpt
    from mmgpt.commands.arguments import argument_errors
    from mmgpt.serve.app import create_app

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    with argument_errors(parser, "--model"):
        pipeline = mmgpt.load(args.model, map_location=args.device)
    name = args.model_name or (Path(args.model).name if args.model else "mmgpt")
    app = create_app(
        pipeline, name, allow_local_files=args.allow_local_files, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_request_bytes=int(args.max_request_mb * 2**20),
    )
    print(f"mmgpt serve: model {name!r} on http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:"
          f"{args.port}/)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
