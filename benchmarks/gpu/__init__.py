"""The prepared GPU probe (`probe.sh`, `probe.py`): everything a GPU machine with only torch, diffusers,
transformers, accelerate and sentencepiece needs to measure the cascade there in one short run."""
