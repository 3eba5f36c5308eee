"""Converters: configs and weights to and from other formats (HF Llama, LLaVA and causal LMs, GGUF,
EfficientNet-Lite0), and the SmolLM2 text model built from them."""
