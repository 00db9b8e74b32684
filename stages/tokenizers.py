"""Train the real tokenizer types on the built-in corpus: SentencePiece unigram for T5 (IF stages I
and II) and CLIP's byte-level BPE (x4 upscaler). They are saved with complete configs so that
diffusers' pipelines tokenize exactly as with the released tokenizers (77 tokens, same specials)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5Tokenizer

from stages.corpus import captions

MODEL_MAX_LENGTH = 77
# CLIP's own pre-tokenization (the pattern transformers' CLIPTokenizer uses).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def keep_tokenizer_sources(src: Path, pipeline_dir: Path, names: tuple[str, ...]) -> None:
    """Also keep the tokenizer's source files (spiece.model; vocab.json + merges.txt) next to the
    tokenizer.json that save_pretrained writes, as in the released checkpoints."""
    for name in names:
        shutil.copy(src / name, pipeline_dir / "tokenizer" / name)


def train_t5_tokenizer(out_dir: Path, pieces: int) -> T5Tokenizer:
    """SentencePiece unigram with T5's ids (pad 0, eos 1, unk 2, no bos) and 100 sentinel tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions()),
            model_prefix=f"{tmp}/spiece",
            vocab_size=pieces,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,  # the corpus is small: take as many pieces as it supports
            minloglevel=2,
        )
        shutil.copy(f"{tmp}/spiece.model", out_dir / "spiece.model")
    tokenizer = T5Tokenizer.from_pretrained(out_dir, model_max_length=MODEL_MAX_LENGTH, extra_ids=100)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def train_clip_tokenizer(out_dir: Path, merges: int) -> CLIPTokenizer:
    """Byte-level BPE with CLIP's layout: 256 byte symbols, the same with `</w>`, the merges, then
    <|startoftext|> and <|endoftext|> (also the pad token, as in the released CLIP tokenizer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(captions(), trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]

    vocab = {symbol: i for i, symbol in enumerate(alphabet + [s + "</w>" for s in alphabet])}
    for left, right in learned:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = "\n".join(f"{left} {right}" for left, right in learned)
    (out_dir / "merges.txt").write_text(f"#version: 0.2\n{merge_lines}\n")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
