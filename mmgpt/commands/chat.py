"""Chat with an mmgpt model in the terminal, turn by turn.

    mmgpt chat
    mmgpt chat --image assets/examples/0.png
    mmgpt chat --model runs/shapes/.../last.ckpt --temperature 0.8 --seed 0
    printf '/image scene.png\\nWhat color is the circle?\\n' | mmgpt chat     # piped: one reply per line

Type a message and press Enter: the reply is printed as it is written. The conversation is kept, so later
messages can refer to earlier ones, and each turn reuses the model's KV cache of the turns before it: only the new
words are read again.

    /image PATH   attach an image to your next message (several /image lines attach several)
    /reset        forget the conversation and any attached images
    /help         list these commands
    /exit         quit (so do /quit and end of input, Ctrl-D)

To send a message that starts with "/", type "//" (the first slash is dropped). Without --model the default
model that ships with mmgpt answers; --temperature 0 (the default) is greedy decoding. Replies go to standard
output, one line each; prompts, notices and errors go to standard error, so piped output holds the replies only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import mmgpt  # cheap: its names load on first use, so --help and usage errors never wait for torch
from mmgpt.commands.arguments import argument_errors

COMMANDS_HELP = """commands:
  /image PATH   attach an image to your next message
  /reset        forget the conversation and attached images
  /help         this list
  /exit         quit (also /quit, Ctrl-D)"""


class ChatSession:
    """A conversation with a pipeline: the messages so far and the images waiting for the next message.

    Args:
        pipeline: the ``mmgpt.Pipeline`` that answers.
        generation: keywords for ``Pipeline.chat_stream`` (``max_new_tokens``, sampling settings, ``generator``).
        system: a system message that opens every conversation, or ``None``.
        out, err: where replies, and notices and errors, are written.
    """

    def __init__(
        self, pipeline: Any, generation: dict[str, Any], system: str | None = None,
        out: TextIO | None = None, err: TextIO | None = None,
    ) -> None:
        self.pipeline, self.generation, self.system = pipeline, generation, system
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.messages: list[dict[str, Any]] = []
        # (path, ImageEmbedding) for the next message; (path, path) for an anyres model (attach says why)
        self.images: list[tuple[str, Any]] = []

    def attach(self, path: str) -> None:
        """Read and encode an image for the next message (once: every later turn reuses its embedding).

        Raises:
            OSError, ValueError, TypeError: the file cannot be read as an image; the message names it.
        """
        if getattr(self.pipeline, "anyres", False):
            # A LLaVA-OneVision picture is encoded one way as its conversation's only image (cut into tiles) and
            # another as one of several (taken whole), which a later turn may change: keep the file, and let every
            # turn encode it as its place needs. Read once now, so that a bad file is named when attached.
            self.pipeline.processor(path)
            self.images.append((path, path))
            return
        self.images.append((path, self.pipeline.encode_image(path)))

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def conversation(self, text: str) -> list[dict[str, Any]]:
        """The messages to answer when ``text`` is sent now."""
        parts = [{"type": "image", "image": embedding} for _, embedding in self.images]
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
        return [*system, *self.messages, user]

    def send(self, text: str) -> str | None:
        """Send a user message, print the reply as it streams and keep both; ``None`` (and an error line) when
        the model cannot answer it (the message is then forgotten, attached images stay)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8, read as lone surrogates: show them, not the codec
            raw = text.encode("utf-8", "surrogateescape")
            self.error(f"the message is not UTF-8 text ({raw[:60]!r}); send it as UTF-8")
            return None
        conversation = self.conversation(text)
        generation = dict(self.generation)
        block_size = self.pipeline.model.config.decoder.block_size
        try:
            prompt = self.pipeline.encode_chat([conversation])[0].size(1)
        except (TypeError, ValueError) as e:  # what the pipeline refuses, such as a typed <image> marker
            self.error(str(e))
            return None
        wanted = generation.get("max_new_tokens", self.pipeline.generation_config.max_new_tokens)
        if prompt >= block_size:
            self.error(
                f"the conversation ({prompt} tokens, images included) fills the model's context of {block_size} "
                "tokens: /reset to start over"
            )
            return None
        if prompt + wanted > block_size:
            # The reply gets the room left rather than no reply at all.
            generation["max_new_tokens"] = block_size - prompt
            self.notice(f"(the conversation nearly fills the model's context of {block_size} tokens: /reset soon)")
        pieces = []
        stream = self.pipeline.chat_stream(conversation, **generation)
        try:
            for piece in stream:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.notice("\n(interrupted)")  # the reply so far is kept, as the model wrote it
        except (TypeError, ValueError) as e:  # what the pipeline refuses, before the first piece
            self.error(str(e))
            return None
        finally:
            stream.close()  # frees the model at once, also when interrupted
        self.out.write("\n")
        self.out.flush()
        reply = "".join(pieces)
        self.messages = [*conversation[1 if self.system else 0 :], {"role": "assistant", "content": reply}]
        self.images.clear()
        return reply

    def command(self, line: str) -> bool:
        """Run a ``/`` command; returns False for the one that ends the session."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.notice(COMMANDS_HELP)
        elif name == "/reset":
            self.reset()
            self.notice("(conversation cleared)")
        elif name == "/image":
            if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
                rest = rest[1:-1]  # a quoted path with spaces
            if not rest:
                self.error("/image needs a path: /image PATH")
            else:
                try:
                    self.attach(rest)
                except (OSError, ValueError, TypeError) as e:
                    self.error(f"cannot use image {rest!r}: {e}")
                else:
                    self.notice(f"(image {rest} attached to your next message)")
        else:
            self.error(f"unknown command {name!r}; /help lists the commands (start a message with // to send '/')")
        return True

    def run(self, lines: Iterator[str]) -> None:
        """Answer each line until ``/exit`` or the end of the lines."""
        for line in lines:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line.strip()):
                    return
                continue
            self.send(line[1:] if line.startswith("//") else line)

    def notice(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)


def _lines(stdin: TextIO) -> Iterator[str]:
    """Lines typed at a terminal (with line editing and a prompt), or read from a pipe or file.

    Bytes that are not UTF-8 come as lone surrogates (as Python reads them in the C locale) rather than as a
    UnicodeDecodeError that would end the session: ``ChatSession.send`` refuses that one line.
    """
    if getattr(stdin, "errors", None) == "strict" and hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    if not stdin.isatty():
        yield from stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            print(file=sys.stderr)


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt chat") -> None:
    """Parse the arguments, load the model and chat over standard input and output until ``/exit`` or EOF.

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
    parser.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="the most tokens per reply (default: the model's, 48)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=50, help="sampling: keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling of the whole session")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.temperature > 0:
        generation.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        mmgpt.GenerationConfig(**generation)  # torch-free: a bad flag is a usage error before the model loads
    except (TypeError, ValueError) as e:
        parser.error(str(e))

    with argument_errors(parser, "--model"):
        pipeline = mmgpt.load(args.model, map_location=args.device)
    if args.seed is not None:
        import torch

        generation["generator"] = torch.Generator(device=pipeline.device).manual_seed(args.seed)
    session = ChatSession(pipeline, generation, system=args.system)
    for path in args.image:
        try:
            session.attach(path)
        except (OSError, ValueError, TypeError) as e:
            parser.error(f"--image {path}: {e}")
    if sys.stdin.isatty():
        attached = f" ({len(args.image)} image(s) attached to your first message)" if args.image else ""
        session.notice(f"mmgpt chat{attached}: type a message; /help lists the commands, /exit quits.")
    session.run(_lines(sys.stdin))


if __name__ == "__main__":
    main()
