"""Train a tiny character-level ReLU transformer language model on real English text (the
calibration half of the standard library's docstrings, ``stdlib_text.py``) in a few CPU minutes.

It is the HiRE evaluation's ReLU FFN model (``eval_hire_relu_lm.py``): two pre-norm blocks of
causal self-attention and a ReLU FFN (d=128 -> 1024 -> 128), trained with AdamW on 64-character
windows. The checkpoint goes to ``--checkpoint`` (default ``benchmarks/.cache/relu_lm.pt``, not
committed); the log to stdout.

    python benchmarks/train_relu_lm.py --steps 1500
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stdlib_text  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / ".cache" / "relu_lm.pt"
# Printable ASCII; anything else maps to the last id.
ALPHABET = "".join(chr(c) for c in range(32, 127))
CONTEXT = 64


def encode(text: str) -> torch.Tensor:
    table = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([table.get(c, len(ALPHABET)) for c in text], dtype=torch.long)


def corpus(split: str) -> torch.Tensor:
    return encode("\n".join(stdlib_text.paragraphs(split)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.relu(self.fc1(self.norm2(x))))


class ReluLM(nn.Module):
    """Character LM: embeddings, ``layers`` blocks, final norm, output projection."""

    def __init__(self, vocab: int = len(ALPHABET) + 1, d: int = 128, heads: int = 4, d_ff: int = 1024,
                 layers: int = 2, context: int = CONTEXT):
        super().__init__()
        self.config = dict(vocab=vocab, d=d, heads=heads, d_ff=d_ff, layers=layers, context=context)
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def windows(data: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - CONTEXT - 1, (count,), generator=gen)
    x = torch.stack([data[s:s + CONTEXT] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + CONTEXT + 1] for s in starts.tolist()])
    return x, y


def train(steps: int, batch: int, lr: float, seed: int) -> tuple[ReluLM, list[dict]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data, held_out = corpus("calibration"), corpus("evaluation")
    model = ReluLM()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    log, start = [], time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # linear warm-up, cosine decay
            group["lr"] = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = windows(data, batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                hx, hy = windows(held_out, 256, torch.Generator().manual_seed(1))
                held = F.cross_entropy(model(hx).flatten(0, 1), hy.flatten()).item()
            log.append(dict(step=step, train_loss=loss.item(), held_out_bits_per_char=held / math.log(2),
                            seconds=round(time.time() - start, 1)))
            print(log[-1], flush=True)
    return model.eval(), log


def load(checkpoint: Path = DEFAULT_CHECKPOINT) -> ReluLM:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = ReluLM(**state["config"])
    model.load_state_dict(state["model"])
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)  # held-out loss is lowest near 1500 (200 KB of text)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args()
    model, log = train(args.steps, args.batch, args.lr, args.seed)
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(config=model.config, model=model.state_dict(), log=log, args=vars(args) | {"checkpoint": str(args.checkpoint)}),
               args.checkpoint)
    print(f"saved {args.checkpoint}")


if __name__ == "__main__":
    main()
