"""The model: vision tower, image processor, projector, attention masks and decoders, assembled into ``MMGPT``.

Modules only: nothing here reads a file or knows of Lightning (``mmgpt.create_model`` builds and loads them).
"""
