"""The model: vision tower, image processor, projector, attention masks and decoders, assembled into ``MMGPT``.

Modules that know nothing of Lightning, data or generation. ``mmgpt.create_model`` builds them and loads a
pretrained LM into the decoder; the only file a module opens itself is the vision tower's timm checkpoint.
"""
