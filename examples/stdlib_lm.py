"""A small decoder-only transformer language model (GPT-style, character level) trained on the Python standard
library's own source code: the text is on every machine that runs Python, so nothing is downloaded.

    ef21 run --workers 4 --objective examples/stdlib_lm.py:make --k-per-tensor 0.5 --k-floor 4 \\
        --encoding compact --estimator sgd --batch-size 8 --optimizer adamw --weight-decay 0.1 --clip-norm 1.0 \\
        --stepsize 1e-3 --lr-schedule cosine --warmup 100 --min-lr 1e-4 --rounds 1500 --eval-every 150 \\
        --checkpoint runs/lm.ckpt
    ef21 export runs/lm.ckpt    # then python -c "...; print(generate(model, 'def ', 200))" (see generate)

The corpus: the top-level ``*.py`` files of the standard library (``sysconfig.get_paths()["stdlib"]``, the
machine-specific ``_sysconfigdata*`` left out), in name order; every tenth file is held out. Text is read as bytes,
one token per byte (non-ASCII bytes become token 0: a fixed vocabulary of 128, the same on every machine), cut into
windows of ``context`` + 1 tokens (input and the next-token target); worker i trains on the i-th contiguous part of
the training windows (``train_kb`` of text in all) and every worker evaluates the same held-out windows
(``test_kb``). Workers must run the same Python version (the same standard library) to see the same text.

The model: token and position embeddings, ``layers`` pre-norm blocks (causal self-attention with ``heads`` heads,
a 4× GELU MLP, dropout 0.1), a final LayerNorm and an output layer tied to the token embedding; d = 112k for the
defaults (``width=64``, ``layers=2``, ``heads=4``, ``context=64``). Metrics: held-out loss (nats per character),
its perplexity ``test_ppl`` and bits per character ``test_bpc``. ``generate`` samples text from trained weights.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ef21.problems.torch import TorchObjective, seeded

VOCAB = 128


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata"))


def encode(text: bytes) -> np.ndarray:
    t = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    t[t >= VOCAB] = 0
    return t


def corpus(train_kb: int, test_kb: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and held-out token streams (every tenth file held out), ``*_kb`` KiB of text each at most."""
    train, test = [], []
    for i, path in enumerate(stdlib_files()):
        (test if i % 10 == 9 else train).append(path.read_bytes() + b"\n\n")
    return encode(b"".join(train)[:train_kb * 1024]), encode(b"".join(test)[:test_kb * 1024])


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of a token stream: item i is (tokens[s:s+T], tokens[s+1:s+T+1]), s = i·T."""

    def __init__(self, tokens: np.ndarray, context: int) -> None:
        self.tokens, self.context = torch.from_numpy(tokens), context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.context
        return self.tokens[s:s + self.context], self.tokens[s + 1:s + self.context + 1]


class Attention(torch.nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.ln2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width), torch.nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.context = context
        self.tok = torch.nn.Embedding(VOCAB, width)
        self.pos = torch.nn.Embedding(context, width)
        self.drop = torch.nn.Dropout(dropout)
        self.blocks = torch.nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, two state-dict keys
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                torch.nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LMObjective(TorchObjective):
    """The adapter, with the language model's metrics: perplexity and bits per character of the held-out text."""

    def metrics(self, x: np.ndarray) -> dict[str, float]:
        m = super().metrics(x)
        m["test_ppl"] = math.exp(m["test_loss"])
        m["test_bpc"] = m["test_loss"] / math.log(2)
        return m


def build(options: dict[str, str]) -> GPT:
    return GPT(int(options.get("width", 64)), int(options.get("layers", 2)), int(options.get("heads", 4)),
               int(options.get("context", 64)), float(options.get("dropout", 0.1)))


def make(ctx) -> LMObjective:  # type: ignore[no-untyped-def]
    o = ctx.options
    context = int(o.get("context", 64))
    train, test = corpus(int(o.get("train_kb", 512)), int(o.get("test_kb", 64)))
    windows = Windows(train, context)
    mine = np.array_split(np.arange(len(windows)), ctx.n)[ctx.rank]
    shard = Windows(train[mine[0] * context:(mine[-1] + 1) * context + 1], context)
    model = seeded(ctx.seed, lambda: build(o))  # the same initial weights on every worker
    return LMObjective(model, lm_loss, shard, test=Windows(test, context), dtype=o.get("dtype", "float32"))


def generate(model: GPT, prompt: str, n: int, *, temperature: float = 0.8, seed: int = 0) -> str:
    """``n`` characters after ``prompt``, sampled at ``temperature`` (seeded), in eval mode."""
    model.eval()
    idx = torch.from_numpy(encode(prompt.encode())).reshape(1, -1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.context:])[0, -1] / temperature
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt.reshape(1, 1)], dim=1)
    return bytes(idx[0].tolist()).decode("ascii", errors="replace")
