"""Any local HF causal LM as the decoder: HF's own generate is the oracle, and so is the native decoder."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY_PROJECTOR, TINY_VISION, cli
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import mmgpt
from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import from_hf_llama_config, from_hf_llama_state_dict
from mmgpt.data.collate import Collator
from mmgpt.data.sample import Sample
from mmgpt.factory import create_model
from mmgpt.generation.engine import generate
from mmgpt.models.hf_decoder import HFDecoder
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import IMAGE, encode_conversation
from mmgpt.tokenizer import load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the red circle is at the top left", "how many shapes are there", "a small blue square and a green triangle",
    "what is the capital of france", "paris is the capital of france", "count from one to ten",
] * 20
PROMPTS = ["What color is the circle?", "Count.", "Tell me about the capital of France, please."]


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE that is *not* mmgpt's own: no <image>, no mmgpt chat markers."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def _hf_config(kind: str, vocab_size: int):
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        )
    if kind == "qwen2":  # q/k/v biases and tied embeddings, unlike Llama
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        )
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)  # learned positions


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def lm_dir(request, tmp_path_factory):
    """A tiny random HF causal LM with O(1) weights (so greedy output varies) and its tokenizer, on disk."""
    kind = request.param
    tok = _tokenizer(None if kind == "gpt2" else CHATML)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(kind, len(tok)))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5 if "wpe" not in name else 0.1)
    path = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return kind, path


def _mmgpt(path, attention: str = "causal") -> Pipeline:
    tok = load_tokenizer(path)
    config = MMGPTConfig(
        VisionConfig(**TINY_VISION), ProjectorConfig(**TINY_PROJECTOR),
        DecoderConfig(vocab_size=len(tok), hf_path=str(path), attention=attention),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(0)
    model = create_model(config, pretrained=True)
    return Pipeline(model, tok)


def test_tokenizer_gains_image_token_and_keeps_its_template(lm_dir):
    kind, path = lm_dir
    tok = load_tokenizer(path)
    assert tok.convert_tokens_to_ids(IMAGE) == len(tok) - 1  # added, as one special token
    assert tok.tokenize(IMAGE * 3 + "hi")[:3] == [IMAGE] * 3
    assert tok.pad_token is not None and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert text == ("User: hi\nAssistant:" if kind == "gpt2" else chatml)


def test_text_generation_equals_hf_generate(lm_dir):
    # Three prompts of different lengths in one left-padded batch: mmgpt's engine on the HF model must produce
    # exactly what HF's own generate produces on the very same weights.
    _, path = lm_dir
    pipe = _mmgpt(path)
    ids, mask, _ = pipe.encode([None] * 3, PROMPTS)
    assert (mask == 0).any()  # really padded
    eos, pad = pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id
    ours = generate(pipe.model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    hf = pipe.model.decoder.model
    theirs = hf.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )[:, ids.size(1) :]
    theirs = torch.nn.functional.pad(theirs, (0, 12 - theirs.size(1)), value=pad)
    assert torch.equal(ours, theirs), (ours, theirs)
    assert len(set(ours.flatten().tolist())) > 3  # the model is lively: not one repeated token
    # Batched equals one by one, and the KV cache equals re-running the whole sequence.
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask, _ = pipe.encode([None], [prompt])
        alone = generate(pipe.model, one_ids, one_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
        assert torch.equal(alone[0], ours[i])
    uncached = generate(pipe.model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad, use_cache=False)
    assert torch.equal(uncached, ours)


def test_image_prompt_and_save_load(lm_dir, tmp_path):
    kind, path = lm_dir
    pipe = _mmgpt(path)
    image = torch.rand(3, 32, 32)
    answers = pipe.generate([image, None], ["What color is it?", "Count."], max_new_tokens=6)
    assert all(isinstance(a, str) for a in answers)
    ids, mask, pixels = pipe.encode([image], ["What color is it?"])
    assert int((ids == pipe.model.config.image_token_id).sum()) == pipe.model.image_seq_len
    before = pipe.model(ids, pixels)
    # An exported model is self-contained: the LM's config travels in config.yaml, so the original directory
    # is not needed to load it.
    pipe.save_pretrained(tmp_path / "export")
    for f in path.iterdir():
        f.rename(tmp_path / f"moved_{f.name}")
    try:
        loaded = Pipeline.from_pretrained(tmp_path / "export")
        assert isinstance(loaded.model.decoder, HFDecoder)
        assert torch.equal(loaded.model(ids, pixels), before)
        assert loaded.generate(image, "What color is it?", max_new_tokens=6) == answers[0]
    finally:
        for f in tmp_path.glob("moved_*"):
            f.rename(path / f.name[len("moved_") :])


def test_hf_llama_decoder_matches_native_decoder_with_images(tmp_path):
    # The same Llama weights behind both decoders, images spliced in, prefix-LM mask included: equal logits.
    tok = _tokenizer(CHATML)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config("llama", len(tok) + 1))  # + <image>
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    parts = dict(vision=VisionConfig(**TINY_VISION), projector=ProjectorConfig(**TINY_PROJECTOR),
                 image_token_id=tok.convert_tokens_to_ids(IMAGE))
    hf_model = create_model(
        MMGPTConfig(decoder=DecoderConfig(vocab_size=len(tok), hf_path=str(tmp_path)), **parts), pretrained=True
    )
    native_decoder = from_hf_llama_config(hf.config)
    native = MMGPT(MMGPTConfig(decoder=native_decoder, **parts))
    native.decoder.load_state_dict(from_hf_llama_state_dict(hf.state_dict(), native_decoder))
    native.vision.load_state_dict(hf_model.vision.state_dict())
    native.projector.load_state_dict(hf_model.projector.state_dict())
    ids, supervised, _ = encode_conversation(
        tok, [{"role": "user", "content": IMAGE + "What color?"}, {"role": "assistant", "content": "red"}],
        hf_model.image_seq_len,
    )
    ids = torch.tensor([ids])
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(hf_model(ids, images), native(ids, images), atol=1e-5, rtol=1e-4)
    prefix = torch.tensor([supervised.index(True)])
    for m in (hf_model, native):
        m.config.decoder.attention = "prefix"
    torch.testing.assert_close(
        hf_model(ids, images, prefix_lengths=prefix), native(ids, images, prefix_lengths=prefix), atol=1e-5, rtol=1e-4
    )


def test_bad_hf_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder.hf_path: no such directory"):
        missing = DecoderConfig(vocab_size=10, hf_path=str(tmp_path / "nope"))
        create_model(MMGPTConfig(decoder=missing, image_token_id=1))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        create_model(MMGPTConfig(decoder=DecoderConfig(vocab_size=10, hf_path=str(tmp_path)), image_token_id=1))
    with pytest.raises(ValueError, match="mmgpt.create_model"):  # the model itself never reads hf_path
        MMGPT(MMGPTConfig(decoder=DecoderConfig(vocab_size=10, hf_path=str(tmp_path)), image_token_id=1))


def test_two_stage_recipe_configs_run_with_a_tiny_lm(tmp_path):
    # configs/smollm2_shapes.yaml (stage 1, align) then configs/smollm2_shapes_instruct.yaml (stage 2, LoRA), as
    # the README runs them, with a tiny random Llama standing in for SmolLM2.
    lm = tmp_path / "lm"
    tok = _tokenizer(CHATML)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_hf_config("llama", len(tok))).save_pretrained(lm)
    tok.save_pretrained(lm)
    small = [
        f"--model.decoder.hf_path={lm}", f"--data.tokenizer={lm}", "--trainer.max_steps=1", "--trainer.logger=false",
        "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--data.batch_size=2",
        "--data.train=[{kind: shapes, size: 2}]", "--model.projector.hidden_dim=32",
        "--model.vision.checkpoint_path=null",  # the recipe's EfficientNet-Lite0, random: no weights file needed
    ]
    stage1 = cli(tmp_path / "align", "fit", *small, config=ROOT / "configs" / "smollm2_shapes.yaml")
    pretrained = AutoModelForCausalLM.from_pretrained(lm).state_dict()
    decoder = stage1.model.model.decoder.model.state_dict()
    for k, v in pretrained.items():  # the LM is frozen in stage 1: still exactly the pretrained weights
        assert torch.equal(decoder[k][: v.size(0)], v), k
    assert all(not p.requires_grad for p in stage1.model.model.decoder.parameters())
    ckpt = tmp_path / "align" / "checkpoints" / "last.ckpt"
    stage2 = cli(
        tmp_path / "instruct", "fit", "--config", str(ROOT / "configs" / "smollm2_shapes_instruct.yaml"), *small,
        f"--model.init_from={ckpt}", f"--trainer.default_root_dir={tmp_path / 'instruct'}",
        config=ROOT / "configs" / "smollm2_shapes.yaml",
    )
    trainable = {n.split(".")[0] for n, p in stage2.model.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "decoder"}
    assert all("lora_" in n for n, p in stage2.model.model.decoder.named_parameters() if p.requires_grad)
    # The stage-2 checkpoint loads as a plain model (adapters merged) that still knows stage 1's projector start.
    final = mmgpt.load(tmp_path / "instruct" / "checkpoints" / "last.ckpt")
    assert not any("lora" in k for k in final.model.state_dict())
    assert isinstance(final.generate(torch.rand(3, 48, 48), "What color is it?", max_new_tokens=3), str)


def test_native_backend_converts_a_llama_into_the_native_decoder(tmp_path):
    # decoder.backend="native": the pretrained Llama runs as mmgpt's own decoder, with HF's generate as the oracle.
    from mmgpt.models.decoder import Decoder

    tok = _tokenizer(CHATML)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config("llama", len(tok)))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    config = MMGPTConfig(
        VisionConfig(**TINY_VISION), ProjectorConfig(**TINY_PROJECTOR),
        DecoderConfig(vocab_size=len(tok), hf_path=str(tmp_path), backend="native"),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
    )
    model = create_model(config, pretrained=True)
    assert type(model.decoder) is Decoder
    assert (model.config.decoder.n_layer, model.config.decoder.n_query_groups) == (2, 2)
    pipe = Pipeline(model, tok)
    ids, mask, _ = pipe.encode([None] * 3, PROMPTS)
    eos = tok.eos_token_id
    ours = generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    hf.resize_token_embeddings(len(tok))  # + <image>, given the very row mmgpt added
    hf.get_input_embeddings().weight.data[-1] = model.decoder.wte.weight[-1]
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)[:, ids.size(1):]
    theirs = torch.nn.functional.pad(theirs, (0, 10 - theirs.size(1)), value=tok.pad_token_id)
    assert torch.equal(ours, theirs)
    # A Qwen2 (q/k/v biases) cannot be expressed natively: a clear error, not wrong outputs.
    qwen = tmp_path / "qwen"
    AutoModelForCausalLM.from_config(_hf_config("qwen2", len(tok))).save_pretrained(qwen)
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        create_model(config.replace(decoder=DecoderConfig(vocab_size=len(tok), hf_path=str(qwen), backend="native")))


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_packed_rows_equal_each_sample_alone(lm_dir, attention):
    # Packing hands an HF model 4-D block masks and restarting position ids (learned ones for GPT-2): every
    # sample's logits must be those it gets alone, with a prefix-LM mask as with a causal one.
    _, path = lm_dir
    pipe = _mmgpt(path, attention)
    model = pipe.model.eval()
    pictures = [Image.new("RGB", (32, 32), c) for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]]
    samples = [
        Sample("Describe the image.", "red square", pictures[0], "caption", "a"),
        Sample("What is one plus one?", "two", None, "text", "b"),
        Sample("What color?", "green", pictures[1], "vqa", "c"),
        Sample("Count to three.", "one two three", None, "text", "d"),
        Sample("What color?", "blue", pictures[2], "vqa", "e"),
    ]
    collators = [Collator(pipe.tokenizer, model.processor, model.image_seq_len, 128, pack=p) for p in (False, True)]
    padded, packed = (collate(samples) for collate in collators)
    assert packed["input_ids"].size(0) < len(samples)
    with torch.no_grad():
        alone = model(padded["input_ids"], padded["images"], prefix_lengths=padded["prefix_lengths"])
        together = model(packed["input_ids"], packed["images"], position_ids=packed["position_ids"],
                         segment_ids=packed["segment_ids"], prefix_lengths=packed["prefix_lengths"])
    for i in range(len(samples)):
        n = int(padded["attention_mask"][i].sum())
        torch.testing.assert_close(together[packed["segment_ids"] == i], alone[i, :n], atol=1e-4, rtol=1e-4)


def test_prefix_lm_training_logits_agree_with_cached_generation(lm_dir):
    # decoder.attention=prefix with an HF LM, as tried in a stage 2 of the SmolLM2 recipe
    # (docs/experiments/2026-12-01-smollm2-stage2-prefix-lm.md): the logits of prompt + generated answer in one
    # forward must pick the tokens KV-cached generation chose, and the prompt must see itself both ways.
    _, path = lm_dir
    pipe = _mmgpt(path, attention="prefix")
    model = pipe.model.eval()
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    N = 6
    with torch.no_grad():
        for image, prompt in [(picture, "Describe the image."), (None, "What is one plus one?")]:
            model.config.decoder.attention = "prefix"
            ids, mask, pixels = pipe.encode([image], [prompt])
            new = generate(model, ids, mask, pixels, max_new_tokens=N)[0]
            P = ids.size(1)
            row = torch.cat([ids[0], new])[None]
            logits = model(row, pixels, prefix_lengths=torch.tensor([P]))[0]
            assert torch.equal(logits[P - 1 : P - 1 + N].argmax(-1), new)
            model.config.decoder.attention = "causal"
            assert not torch.allclose(model(row, pixels)[0, 0], logits[0])  # causal: the first token sees itself only


def test_logits_at_selected_positions_equal_full_logits(lm_dir):
    # Training asks for logits only where a target is predicted: the head run on those positions alone must give
    # exactly the full forward's logits there.
    _, path = lm_dir
    model = _mmgpt(path).model.eval()
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([0, 5, 10, 12, 30, 32])  # flattened (row * 11 + position)
    with torch.no_grad():
        full = model(ids)  # (3, 11, V)
        picked = model(ids, logits_at=at)  # (6, V)
    torch.testing.assert_close(picked, full.flatten(0, 1)[at], atol=1e-5, rtol=1e-5)
