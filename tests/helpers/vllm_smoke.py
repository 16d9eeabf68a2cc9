"""The CI smoke test's body: a real vLLM ``LLM`` and the bridge in one numpy-2 process.

    main_env/.venv/bin/python tests/helpers/vllm_smoke.py OUT_DIR

Builds a tiny random-weight Llama (head_dim 32: the CPU backend rejects 16),
starts the bridge worker, then vLLM, generates tokens, embeds through the
bridge while vLLM is alive, and writes OUT_DIR/smoke.json + OUT_DIR/embedding.npy.
The ``__main__`` guard matters: vLLM starts its engine core with spawn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SENTENCE = "vLLM and Infinity share one process: 向量检索"


def make_tiny_llama(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(
        ["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import numpy as np

    assert tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 2), np.__version__
    make_tiny_llama(out / "tiny-llama")

    from bridge import BatchedInference, bundled_model_path

    started = time.perf_counter()
    # Worker first: on a GPU this is the start order that lets vLLM size its
    # cache around what the worker already holds.
    client = BatchedInference(model_id=bundled_model_path(), engine="torch")
    bridge_ready = time.perf_counter() - started
    try:
        from vllm import LLM, SamplingParams

        started = time.perf_counter()
        llm = LLM(
            model=str(out / "tiny-llama"),
            enforce_eager=True,
            dtype="float32",
            max_model_len=128,
            seed=0,
        )
        vllm_ready = time.perf_counter() - started
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        generated = llm.generate(["hello world"], params, use_tqdm=False)[0].outputs[0]
        # Embed while vLLM's engine is alive, in the same process.
        embeddings, usage = client.embed(sentences=[SENTENCE, generated.text or "empty"]).result(
            timeout=120
        )
        status = client.status()[0]
    finally:
        client.stop()
    np.save(out / "embedding.npy", np.stack(embeddings))
    import vllm

    (out / "smoke.json").write_text(
        json.dumps(
            {
                "numpy": np.__version__,
                "vllm": vllm.__version__,
                "worker_numpy": status["versions"]["numpy"],
                "generated_token_ids": list(generated.token_ids),
                "usage": usage,
                "embedding_dtype": str(embeddings[0].dtype),
                "embedding_shape": list(embeddings[0].shape),
                "bridge_ready_s": bridge_ready,
                "vllm_ready_s": vllm_ready,
                "modules_loaded": sorted(
                    m for m in ("infinity_emb", "embed", "optimum") if m in sys.modules
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
