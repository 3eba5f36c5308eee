"""``mmgpt chat`` (mmgpt/commands/chat.py): piped lines in, the replies of ``Pipeline.chat`` on the same
conversation out, one per line; commands for images and resets; errors that name what was wrong and keep the
session going."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import mmgpt
from mmgpt.commands.chat import main
from mmgpt.pipeline import DEFAULT_MODEL, Pipeline

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "config.yaml").is_file(), reason="no default model shipped in assets/default_model"
)

EXAMPLES = ROOT / "assets" / "examples"
IMAGE_0, IMAGE_1 = str(EXAMPLES / "0.png"), str(EXAMPLES / "1.png")


@pytest.fixture(scope="module")
def default_model() -> Pipeline:
    return mmgpt.load()


@pytest.fixture
def chat(monkeypatch, capsys, default_model):
    """``chat(lines, *argv)`` runs ``mmgpt chat ARGV`` on the shared default model with ``lines`` piped in:
    ``(stdout lines, stderr, conversations sent)``."""
    sent = []
    original = Pipeline.chat_stream

    def spy(self, messages, **kwargs):
        sent.append(messages)
        return original(self, messages, **kwargs)

    monkeypatch.setattr(Pipeline, "chat_stream", spy)
    monkeypatch.setattr(mmgpt, "load", lambda path=None, map_location="cpu": default_model)

    def run(lines: list[str], *argv: str) -> tuple[list[str], str, list]:
        sent.clear()
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
        main(list(argv))
        out, err = capsys.readouterr()
        return out.splitlines(), err, list(sent)

    return run


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                        {"type": "text", "text": text}]}


def replies_of(pipeline: Pipeline, turns: list[tuple[str, tuple]], **kwargs) -> list[str]:
    """What ``Pipeline.chat`` answers, turn by turn, to a conversation of ``(text, images)`` user turns."""
    messages, replies = [], []
    for text, images in turns:
        messages.append(user(text, *images))
        replies.append(pipeline.chat(messages, reuse_cache=False, **kwargs))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_piped_replies_equal_pipeline_chat(chat, default_model):
    turns = [("What color is the circle?", (IMAGE_0,)), ("What shape is at the center?", ()),
             ("How many green shapes are there?", ())]
    out, err, sent = chat(["/image " + IMAGE_0, *(t for t, _ in turns)], "--max-new-tokens", "16")
    assert out == replies_of(default_model, turns, max_new_tokens=16)
    assert out[0] == "red"
    assert [len(m) for m in sent] == [1, 3, 5]  # the history grows turn by turn
    assert f"image {IMAGE_0} attached" in err and "error" not in err


def test_turns_reuse_the_kv_cache(chat, default_model):
    default_model.prefix_cache.clear()  # the module's pipeline has chatted this conversation before
    prefilled = []
    hook = default_model.model.decoder.register_forward_pre_hook(
        lambda m, a, kw: prefilled.append(kw["inputs_embeds"].size(1)) if "inputs_embeds" in kw else None,
        with_kwargs=True,
    )
    try:
        chat(["/image " + IMAGE_0, "What color is the circle?", "What shape is at the center?"])
    finally:
        hook.remove()
    first, second = prefilled
    full = default_model.encode_chat([[user("What color is the circle?", IMAGE_0)]])[0].size(1)
    assert first == full and second < first  # the second turn prefills its new tokens only


def test_reset_forgets_the_history_and_images(chat, default_model):
    out, err, sent = chat([
        "/image " + IMAGE_0, "What color is the circle?", "/image " + IMAGE_1, "/reset",
        "What shape is at the bottom right?", "/image " + IMAGE_1, "What shape is at the bottom right?",
    ])
    assert "(conversation cleared)" in err
    assert [len(m) for m in sent] == [1, 1, 3]  # after /reset: a new conversation, without the pending image
    assert sent[1] == [user("What shape is at the bottom right?")]
    assert out[1] == default_model.chat([user("What shape is at the bottom right?")], reuse_cache=False)
    assert out[2] == replies_of(default_model, [("What shape is at the bottom right?", ()),
                                                ("What shape is at the bottom right?", (IMAGE_1,))])[1]


def test_a_bad_image_path_is_an_error_line_and_the_session_goes_on(chat, default_model, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    missing = str(tmp_path / "missing.png")
    out, err, sent = chat(["/image " + missing, f"/image {not_an_image}", "/image", "Hi", "/exit", "Hi again"])
    assert f"error: cannot use image {missing!r}: image file not found" in err
    assert f"error: cannot use image {str(not_an_image)!r}" in err
    assert "error: /image needs a path" in err
    assert out == [default_model.chat([user("Hi")], reuse_cache=False)]  # no image went with it; /exit ended
    assert sent == [[user("Hi")]]


def test_a_message_the_pipeline_refuses_is_an_error_line_and_the_session_goes_on(chat, default_model):
    out, err, sent = chat(["what is <image> here?", "What color is the circle?"])
    assert "error: messages[0].content[0].text holds '<image>'" in err
    assert out == [default_model.chat([user("What color is the circle?")], reuse_cache=False)]  # the first forgotten
    assert sent == [[user("What color is the circle?")]]


def test_bytes_that_are_not_utf8_are_an_error_line_and_the_session_goes_on(chat, default_model):
    # How Python reads them in the C locale (LC_ALL=C): each byte that is not UTF-8 as a lone surrogate.
    out, err, sent = chat([b"a \xff b".decode("utf-8", "surrogateescape"), "What color is the circle?"])
    assert "error: the message is not UTF-8 text (b'a \\xff b')" in err
    assert out == [default_model.chat([user("What color is the circle?")], reuse_cache=False)]
    assert len(sent) == 1


def test_commands_help_and_escapes(chat):
    out, err, sent = chat(["/help", "/bogus", "//image is a word here", "   ", "/quit"])
    assert "/image PATH" in err and "/reset" in err
    assert "error: unknown command '/bogus'" in err
    assert [m[-1]["content"][-1]["text"] for m in sent] == ["/image is a word here"]
    assert len(out) == 1


def test_image_flag_system_message_and_sampling_with_a_seed(chat, default_model):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.9)
    argv = ("--image", IMAGE_0, "--system", "Answer briefly.", "--temperature", "1.5", "--top-p", "0.9",
            "--seed", "3", "--max-new-tokens", "10")
    out, _, sent = chat(["Describe the image.", "Again."], *argv)
    assert sent[0][0] == {"role": "system", "content": "Answer briefly."} and len(sent[1]) == 4
    # One generator for the session, seeded once: the same replies as Pipeline.chat drawing from it turn by turn.
    generator = torch.Generator().manual_seed(3)
    messages = [{"role": "system", "content": "Answer briefly."}, user("Describe the image.", IMAGE_0)]
    expected = [default_model.chat(messages, generator=generator, reuse_cache=False, **kw)]
    messages += [{"role": "assistant", "content": expected[0]}, user("Again.")]
    expected.append(default_model.chat(messages, generator=generator, reuse_cache=False, **kw))
    assert out == expected
    assert chat(["Describe the image.", "Again."], *argv)[0] == out  # reproducible


def test_a_conversation_too_long_for_the_model(chat, default_model):
    block_size = default_model.model.config.decoder.block_size
    out, err, sent = chat(["/image " + IMAGE_0, "What color is the circle?", "word " * block_size,
                           "What shape is at the center?"], "--max-new-tokens", str(block_size - 20))
    assert f"fills the model's context of {block_size} tokens: /reset to start over" in err
    assert "nearly fills" in err  # the second turn's reply got the room that was left
    assert len(out) == 2 and len(sent) == 2  # the overlong message was dropped, the session went on


def test_usage_errors(chat, capsys, tmp_path):
    for argv, message in [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--temperature", "0.5", "--top-p", "0"], "top_p"),
        (["--image", str(tmp_path / "missing.png")], "missing.png"),
    ]:
        with pytest.raises(SystemExit) as e:
            chat([], *argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_python_dash_m_with_piped_stdin(default_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    lines = f"/image {IMAGE_0}\nWhat color is the circle?\nWhat shape is at the center?\n"
    done = subprocess.run([sys.executable, "-m", "mmgpt.commands.chat", "--max-new-tokens", "16"], input=lines,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    turns = [("What color is the circle?", (IMAGE_0,)), ("What shape is at the center?", ())]
    assert done.stdout.splitlines() == replies_of(default_model, turns, max_new_tokens=16)


@pytest.mark.parametrize("io_encoding", ["utf-8:strict", "utf-8:surrogateescape"])
def test_python_dash_m_with_bytes_that_are_not_utf8(default_model, io_encoding):
    # strict: what a UTF-8 locale gives a pipe; surrogateescape: the C locale's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": io_encoding}
    lines = b"what is \xff\xfe here?\nWhat color is the circle?\n"
    done = subprocess.run([sys.executable, "-m", "mmgpt.commands.chat", "--max-new-tokens", "16"], input=lines,
                          capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    err = done.stderr.decode()
    assert "error: the message is not UTF-8 text" in err and "Traceback" not in err
    expected = default_model.chat([user("What color is the circle?")], reuse_cache=False, max_new_tokens=16)
    assert done.stdout.decode().splitlines() == [expected]
