"""A small built-in caption corpus: the tokenizers of generated checkpoints are trained on it, so
they are real SentencePiece / BPE tokenizers with real merges, not lookup tables."""

_SUBJECTS = [
    "a kangaroo wearing an orange hoodie",
    "a red bicycle",
    "an astronaut riding a horse",
    "a corgi puppy",
    "a bowl of ramen",
    "a lighthouse on a cliff",
    "a vintage typewriter",
    "a hot air balloon",
    "a robot reading a newspaper",
    "a snowy mountain village",
    "a glass of iced coffee",
    "a sailing boat",
    "a fox in the forest",
    "a steam locomotive",
    "a cat wearing sunglasses",
    "a cup of green tea",
    "a medieval castle",
    "a neon city street",
    "a field of sunflowers",
    "a panda eating bamboo",
]
_STYLES = [
    "a photo of",
    "an oil painting of",
    "a watercolor of",
    "a pencil sketch of",
    "a 3d render of",
    "a close-up photograph of",
    "a cinematic still of",
    "an illustration of",
    "a pixel art image of",
]
_PLACES = [
    "in front of the eiffel tower",
    "on the beach at sunset",
    "under a starry night sky",
    "in a busy market",
    "next to a river",
    "on top of a skyscraper",
    "in the rain",
    "in a quiet library",
    "at golden hour",
]
_EXTRA = [
    'holding a sign that says "very deep learning"',
    "highly detailed, sharp focus, 4k",
    "blurry, low quality, deformed, watermark, text",
    "trending on artstation, dramatic lighting",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}<>-_+=*/&%$#@",
]


def captions() -> list[str]:
    """Deterministic list of a few thousand captions."""
    out = []
    for i, subject in enumerate(_SUBJECTS):
        for j, style in enumerate(_STYLES):
            for k, place in enumerate(_PLACES):
                extra = _EXTRA[(i + j + k) % len(_EXTRA)]
                out.append(f"{style} {subject} {place}, {extra}")
    return out
