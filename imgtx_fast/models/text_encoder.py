"""The frozen text encoder of the Imagen-style model: a T5 encoder from transformers.

    tok = WordTokenizer.from_texts(["a digit seven", ...])          # offline demo / tests
    enc = TextEncoder.random(tok, d_model=64, num_layers=2, seed=0)  # tiny random T5
    enc = TextEncoder.from_pretrained("/path/to/t5-v1_1-base")       # real weights + tokenizer
    emb, lengths = enc(["a digit seven", "a digit one"])             # (B, L, d), (B,) int64

Imagen keeps the text encoder frozen: it only turns prompts into token embeddings that the
denoiser cross-attends to. `lengths` come from the tokenizer's attention mask (right padding,
so keys [lengths[b], L) are padding) and go to imgtx_fast.attention as key_lengths.

No real T5 sentencepiece files ship with the package, so WordTokenizer gives the demo and the
tests an offline tokenizer (a closed word vocabulary, T5's conventions: pad 0, eos 1, unk 2).
With real weights any Hugging Face tokenizer works (it is called with padding="max_length").
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["WordTokenizer", "TextEncoder"]

_WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Lower-cased words -> ids; T5's special ids (pad 0, eos 1, unk 2), words from 3 on.

    Called like a Hugging Face tokenizer: tok(prompts, max_length=L) returns
    {"input_ids", "attention_mask"} (B, L) int64, each prompt followed by eos, right-padded,
    truncated to L (eos kept)."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2
    _SPECIAL = ("<pad>", "</s>", "<unk>")

    def __init__(self, words: Sequence[str]):
        words = list(dict.fromkeys(str(w).lower() for w in words))
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad:
            raise ValueError(f"WordTokenizer: words must be [a-z0-9]+, got {bad[:5]}")
        self.words = words
        self._ids: Dict[str, int] = {w: i + len(self._SPECIAL) for i, w in enumerate(words)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "WordTokenizer":
        """The vocabulary of `texts`, in order of first appearance (deterministic)."""
        return cls([w for t in texts for w in _WORD.findall(str(t).lower())])

    @property
    def vocab_size(self) -> int:
        return len(self._SPECIAL) + len(self.words)

    def split(self, text: str) -> List[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> List[int]:
        return [self._ids.get(w, self.unk_token_id) for w in self.split(text)] + [self.eos_token_id]

    def __call__(self, prompts, max_length: int = 16, **_ignored) -> Dict[str, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"WordTokenizer: max_length must be an int >= 1, got {max_length!r}")
        ids = torch.zeros(len(prompts), max_length, dtype=torch.int64)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.int64)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"WordTokenizer: prompts must be strings, got {type(p).__name__}")
            e = self.encode(p)
            if len(e) > max_length:
                e = e[:max_length - 1] + [self.eos_token_id]
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TextEncoder(nn.Module):
    """A frozen T5 encoder and its tokenizer: prompts -> (embeddings (B, L, d), lengths (B,)).

    max_length: every batch is padded to this many tokens (Imagen: 128; the demo: 8), so the
    denoiser sees one text length L and padding is told apart only by `lengths`."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64):
        super().__init__()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"TextEncoder: max_length must be an int >= 1, got {max_length!r}")
        if not callable(tokenizer):
            raise TypeError(f"TextEncoder: tokenizer must be callable (a WordTokenizer or a Hugging "
                            f"Face tokenizer), got {type(tokenizer).__name__}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def train(self, mode: bool = True):
        """The encoder stays in eval mode (frozen: no dropout) whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def t5_config(vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                  d_ff: Optional[int] = None, **kw):
        from transformers import T5Config

        return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads,
                        d_ff=d_ff or 2 * d_model, num_layers=num_layers, num_heads=num_heads,
                        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, **kw)

    @classmethod
    def random(cls, tokenizer: WordTokenizer, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
               max_length: int = 16, seed: int = 0) -> "TextEncoder":
        """A tiny randomly initialised T5 encoder (tests, the offline demo): frozen random
        features still tell the prompts apart, which is all the denoiser needs to learn from."""
        from transformers import T5EncoderModel

        cfg = cls.t5_config(tokenizer.vocab_size, d_model, num_layers, num_heads)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = T5EncoderModel(cfg)
        finally:
            torch.random.set_rng_state(state)
        return cls(model, tokenizer, max_length)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, max_length: int = 128, **kw) -> "TextEncoder":
        """Real T5 weights from a local folder (transformers' T5EncoderModel.from_pretrained);
        tokenizer: any Hugging Face tokenizer (None: AutoTokenizer from the same folder)."""
        from transformers import AutoTokenizer, T5EncoderModel

        model = T5EncoderModel.from_pretrained(path, **kw)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, max_length)

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) (B, L) int64 on the encoder's device."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"TextEncoder: prompts must be a non-empty list of strings, got {prompts!r:.80}")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"TextEncoder: prompts must be strings, got {type(p).__name__}")
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return out["input_ids"].to(device), out["attention_mask"].to(device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """(embeddings (B, L, d) float32, lengths (B,) int64): token j of row b is real iff
        j < lengths[b]. A left-padded or holey mask is refused: lengths could not describe it."""
        ids, mask = self.tokenize(prompts)
        lengths = mask.sum(1).to(torch.int64)
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask.bool()):
            raise ValueError("TextEncoder: the tokenizer must pad on the right (padding_side='right')")
        if int(lengths.min()) < 1:
            raise ValueError("TextEncoder: a prompt tokenized to no tokens")
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return emb.float(), lengths

    # -- checkpoints (WordTokenizer + randomly initialised / small encoders) --------------------
    def state(self) -> dict:
        """Plain values: the T5 config, its weights and the word vocabulary (a Hugging Face
        tokenizer is not stored: reload real weights with from_pretrained)."""
        if not isinstance(self.tokenizer, WordTokenizer):
            raise TypeError("TextEncoder.state: only a WordTokenizer is stored with the weights; "
                            "reload pretrained encoders with TextEncoder.from_pretrained(path)")
        return {"t5_config": self.model.config.to_dict(), "words": list(self.tokenizer.words),
                "max_length": self.max_length,
                "state_dict": {k: v.clone() for k, v in self.model.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> "TextEncoder":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config.from_dict(state["t5_config"])
        model = T5EncoderModel(cfg)
        ref = model.state_dict()
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state["state_dict"].items()})
        return cls(model, WordTokenizer(state["words"]), int(state["max_length"]))
