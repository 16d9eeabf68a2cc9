"""Build random-weight models for the tests and the benchmark. Runs in infinity_env.

    infinity_env/.venv/bin/python scripts/tiny_models.py OUT_DIR [NAME ...]

Names: conan (a tiny BERT + mean pooling + Dense to 1792, the shape of
TencentBAC/Conan-embedding-v1), conan-large (the real shape: BERT-large, 24
layers x 1024, + Dense 1024 -> 1792; for GPU benchmarks), poison (a BERT
whose custom code crashes, raises or stalls on trigger words), classifier (BERT sequence classifier, 3
labels), reranker (BERT cross-encoder, 1 label), clip (tiny CLIP), clap
(tiny CLAP). Everything is seeded, so a model is the same on every run.
Writes OUT_DIR/NAME/ and prints one JSON line per model.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# Characters the tiny vocabularies cover: ASCII plus the most common CJK
# ideographs (BERT's basic tokenizer splits CJK text into single characters).
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
PUNCT = list("，。！？；：“”‘’（）、《》")


def bert_vocab(directory: Path) -> Path:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation) + PUNCT + CJK
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    words = [
        "the",
        "cat",
        "dog",
        "sat",
        "mat",
        "hello",
        "world",
        "good",
        "bad",
        "paris",
        "france",
        "is",
        "in",
        "where",
    ]
    tokens += words + ["##" + w for w in ("ing", "ed", "s", "er", "ly")]
    unique = list(dict.fromkeys(tokens))  # first occurrence wins, order kept
    path = directory / "vocab.txt"
    path.write_text("\n".join(unique) + "\n", encoding="utf-8")
    return path


def bert_tokenizer(directory: Path, max_length: int = 128):  # type: ignore[no-untyped-def]
    from transformers import BertTokenizerFast

    vocab = bert_vocab(directory)
    tokenizer = BertTokenizerFast(
        vocab_file=str(vocab), do_lower_case=True, model_max_length=max_length
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def bert_config(vocab_size: int, **extra: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        **extra,
    )


def make_conan(directory: Path, large: bool = False) -> dict[str, object]:
    """BERT encoder + mean pooling + Dense(hidden -> 1792), as sentence-transformers modules."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(1792)
    directory.mkdir(parents=True, exist_ok=True)
    max_length = 512 if large else 128
    tokenizer = bert_tokenizer(directory, max_length=max_length)
    if large:
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=512,
        )
    else:
        config = bert_config(tokenizer.vocab_size)
    BertModel(config).save_pretrained(directory)
    word = models.Transformer(str(directory), max_seq_length=max_length)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    dense = models.Dense(
        word.get_word_embedding_dimension(), 1792, activation_function=torch.nn.Identity()
    )
    SentenceTransformer(modules=[word, pooling, dense], device="cpu").save(str(directory))
    return {"dim": 1792}


def make_classifier(directory: Path, labels: list[str]) -> dict[str, object]:
    from transformers import BertForSequenceClassification

    torch.manual_seed(3 if len(labels) > 1 else 1)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer(directory)
    config = bert_config(
        tokenizer.vocab_size,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return {"labels": labels}


def byte_level_bpe_files(directory: Path, end_of_word: str, specials: tuple[str, ...] = ()) -> None:
    """A vocab.json/merges.txt with every byte symbol and no merges: valid, tiny.

    ``specials`` get the first ids, in order.
    """
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {special: i for i, special in enumerate(specials)}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    if end_of_word:
        for symbol in symbols:
            vocab[symbol + end_of_word] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def make_clip(directory: Path) -> dict[str, object]:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    torch.manual_seed(32)
    directory.mkdir(parents=True, exist_ok=True)
    byte_level_bpe_files(directory, end_of_word="</w>")
    tokenizer = CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        model_max_length=77,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    return {"dim": 16}


def make_clap(directory: Path) -> dict[str, object]:
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        RobertaTokenizer,
    )

    torch.manual_seed(48)
    directory.mkdir(parents=True, exist_ok=True)
    # Specials first, as in RoBERTa: the pad id doubles as the position
    # embeddings' padding index and must be small.
    byte_level_bpe_files(
        directory, end_of_word="", specials=("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    )
    tokenizer = RobertaTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        model_max_length=64,
    )
    extractor = ClapFeatureExtractor(
        feature_size=32, sampling_rate=48000, max_length_s=1, truncation="rand_trunc"
    )
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 70,
            "projection_dim": 16,
            "pad_token_id": tokenizer.pad_token_id,
        },
        audio_config={
            "spec_size": 64,
            "num_mel_bins": 32,
            "patch_embeds_hidden_size": 16,
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "window_size": 4,
            "hidden_size": 32,
            "projection_dim": 16,
            "patch_stride": [4, 4],
            "enable_fusion": False,
        },
        projection_dim=16,
    )
    ClapModel(config).save_pretrained(directory)
    return {"dim": 16, "sampling_rate": 48000}


POISON_MODELING = '''"""A BERT whose forward pass misbehaves on trigger words: a real model bug, on demand."""

import os
import signal
import time

import torch
from transformers import BertModel


class PoisonBertModel(BertModel):
    def forward(self, input_ids=None, **kwargs):
        triggers = self.config.poison_ids
        if input_ids is not None:
            if (input_ids == triggers["crashnow"]).any():
                os.kill(os.getpid(), signal.SIGKILL)  # like a segfault in a CUDA kernel
            if (input_ids == triggers["failnow"]).any():
                raise RuntimeError("poison input: this model cannot embed the word failnow")
            if (input_ids == triggers["oomnow"]).any():
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the test model)")
            if (input_ids == triggers["slownow"]).any():
                time.sleep(2.0)
        return super().forward(input_ids=input_ids, **kwargs)
'''

TRIGGER_WORDS = ("crashnow", "failnow", "oomnow", "slownow")


def make_poison(directory: Path) -> dict[str, object]:
    """A sentence-transformers BERT with custom code (trust_remote_code, embed's default)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    torch.manual_seed(666)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer(directory, max_length=128)
    with (directory / "vocab.txt").open("a", encoding="utf-8") as fh:
        fh.write("\n".join(TRIGGER_WORDS) + "\n")
    tokenizer = bert_tokenizer_from_vocab(directory, max_length=128)
    config = bert_config(tokenizer.vocab_size)
    BertModel(config).save_pretrained(directory)
    word = models.Transformer(str(directory), max_seq_length=128)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(directory))
    (directory / "modeling_poison.py").write_text(POISON_MODELING, encoding="utf-8")
    saved = json.loads((directory / "config.json").read_text())
    saved["auto_map"] = {"AutoModel": "modeling_poison.PoisonBertModel"}
    saved["architectures"] = ["PoisonBertModel"]
    saved["poison_ids"] = {word: tokenizer.convert_tokens_to_ids(word) for word in TRIGGER_WORDS}
    (directory / "config.json").write_text(json.dumps(saved, indent=2))
    return {"triggers": list(TRIGGER_WORDS)}


def bert_tokenizer_from_vocab(directory: Path, max_length: int):  # type: ignore[no-untyped-def]
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(
        vocab_file=str(directory / "vocab.txt"), do_lower_case=True, model_max_length=max_length
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


BUILDERS = {
    "conan-large": lambda d: make_conan(d, large=True),
    "poison": make_poison,
    "conan": make_conan,
    "classifier": lambda d: make_classifier(d, ["negative", "neutral", "positive"]),
    "reranker": lambda d: make_classifier(d, ["score"]),
    "clip": make_clip,
    "clap": make_clap,
}


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or [name for name in BUILDERS if name != "conan-large"]
    for name in names:
        directory = out / name
        info = BUILDERS[name](directory)
        print(json.dumps({"name": name, "path": str(directory), **info}), flush=True)


if __name__ == "__main__":
    main()
