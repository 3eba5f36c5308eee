"""PaliGemma with several images in one prompt, as ``PaliGemmaProcessor`` writes it (every image's placeholders
first, then ``<bos>`` and the prompt): prompt ids, pixels and greedy tokens against HF, through ``mmgpt.load``."""

from __future__ import annotations

import torch
from test_paligemma import hf_generate, hf_image_processor, load_hf, picture, processor, saved  # noqa: F401
from transformers import PaliGemmaProcessor

import mmgpt


# processor and saved: the PaliGemma tests' fixtures, imported above.
def test_two_images_in_one_prompt_match_hf(saved, processor):  # noqa: F811
    pipeline, hf = mmgpt.load(saved), load_hf(saved)
    tok = pipeline.tokenizer
    # The PIL backend: mmgpt's SigLIP preprocessing equals it bit for bit.
    pil = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=processor.tokenizer)
    images, prompt = [picture(50, 40), picture(30, 60, seed=1)], "answer en which one is red?"
    inputs = pil(text=prompt, images=[images], return_tensors="pt")
    ids, mask, pixels = pipeline.encode([images], [prompt])
    assert torch.equal(ids, inputs.input_ids) and torch.equal(pixels, inputs.pixel_values)
    assert int((ids == pipeline.model.config.image_token_id).sum()) == 2 * pipeline.model.image_seq_len
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    theirs = hf_generate(hf, inputs, kwargs)
    assert len(set(theirs[0].tolist())) > 1
    expected = tok.decode(theirs[0], skip_special_tokens=True).strip()
    assert pipeline.generate([images], [prompt], max_new_tokens=10) == [expected]
    content = [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
               {"type": "text", "text": prompt}]
    assert pipeline.chat([{"role": "user", "content": content}], max_new_tokens=10) == expected
