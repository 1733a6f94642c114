"""A small byte-level BPE tokenizer trained on a text, for models trained from scratch (`lckv-vllm make-tokenizer`).

The offline 32k Llama tokenizer makes a tiny model mostly embedding table: at hidden size 128 its 32,000 x 128
embedding outweighs six transformer layers three times over, and the 32k-way softmax dominates the CPU cost of a
training step.  A corpus-specific vocabulary of a few thousand tokens keeps a trained model small enough to commit and
trains several times faster.  The result is a standard `tokenizer.json` + `tokenizer_config.json` pair that
`AutoTokenizer` and vLLM load like any other; token ids 0/1/2 are `<unk>`/`<s>`/`</s>`, as in the Llama tokenizer, so
configs keep `bos_token_id: 1`, `eos_token_id: 2`; every encoding starts with `<s>` (BOS), as Llama's does.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(text: str, vocab_size: int, out: str | Path) -> int:
    """Train a byte-level BPE of `vocab_size` tokens on `text`, save it into `out`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .checkpoint import CHAT_TEMPLATE

    if vocab_size < 300:
        raise ValueError(f"vocab_size: {vocab_size} is below the 256 byte tokens + specials a byte-level BPE needs")
    if not text.strip():
        raise ValueError("text: empty; nothing to train a tokenizer on")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Feed lines, not one 5 MB string: the trainer counts words per item and a single item is slow.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()
