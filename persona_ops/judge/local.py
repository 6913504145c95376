"""A local judge: the probability of every integer answer as a whole continuation.

For each integer ``k`` in ``[lo, hi]`` the judge model's probability of answering
exactly ``k`` is ``p_k = P(tokens of str(k)) * P(next token does not start with an
ASCII digit)``, right after the chat template's generation prompt. Numbers of several
tokens ("37" -> "3", "7" for SmolLM2) are scored token by token.

Efficiency: the candidate numbers form a token trie (for 0..100 with one token per
digit: 101 nodes). Each prompt and the whole trie go through the model in **one
forward pass**: the trie nodes are appended after the prompt and a custom 4-D
attention mask lets each node see the prompt and its own ancestors only, with
position ids ``prompt_len + depth - 1`` (tree attention). Only the logits of the
last prompt token and of the trie nodes are computed. Several prompts are batched
(left-padded, masked).

Only the canonical tokenization of each number is scored (a model could in
principle spell "37" with other token splits; that mass is ignored).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from persona_ops.chat import prompt_ids
from persona_ops.errors import InputError
from persona_ops.judge.scoring import MIN_MASS, aggregate_score
from persona_ops.kernels.cpu_linear import packed_linears
from persona_ops.models.loading import LoadedModel


def number_token_ids(tokenizer, text: str, context: str = "\n") -> list[int]:
    """Tokens of ``text`` as a continuation of ``context`` (default: a newline, as after a
    generation prompt).

    Encoding after a context avoids SentencePiece's leading-space marker; when the
    context merges with the text, the plain encoding is used.
    """
    base = tokenizer.encode(context, add_special_tokens=False)
    full = tokenizer.encode(context + text, add_special_tokens=False)
    if full[:len(base)] == base and len(full) > len(base):
        return full[len(base):]
    return tokenizer.encode(text, add_special_tokens=False)


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of tokens whose text starts with an ASCII digit (they would continue a number)."""
    ids = []
    for token, idx in tokenizer.get_vocab().items():
        # Byte-level BPE keeps ASCII digits as is; SentencePiece marks a leading space with
        # "▁" (not a digit); byte-fallback tokens spell digits as <0x30>..<0x39>.
        if token[:1].isascii() and token[:1].isdigit() or token in _BYTE_DIGITS:
            ids.append(idx)
    return sorted(ids)


_BYTE_DIGITS = {f"<0x{0x30 + d:02X}>" for d in range(10)}


@dataclass(frozen=True)
class CandidateTrie:
    """The token trie of the integers ``lo..hi``; parents come before their children."""

    tokens: list[int]  # token of each node
    parents: list[int]  # parent node index, -1 for the root (the last prompt token)
    depths: list[int]  # 1 for first tokens
    node_of: dict[int, int]  # integer -> node of its last token
    ancestors: torch.Tensor  # [T, T] bool: ancestors[i, j] if j is i or an ancestor of i

    @classmethod
    def build(cls, tokenizer, lo: int, hi: int, answer_prefix: str = "") -> "CandidateTrie":
        """Numbers as they continue ``answer_prefix``: its trailing whitespace belongs to the
        number's tokens (" 37" is one unit for many tokenizers), the rest is the context."""
        if hi < lo:
            raise InputError(f"judge scale: hi={hi} < lo={lo}")
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        children: dict[tuple[int, int], int] = {}
        node_of: dict[int, int] = {}
        context = answer_prefix.rstrip() or "\n"
        spacing = answer_prefix[len(answer_prefix.rstrip()):]
        for k in range(lo, hi + 1):
            ids = number_token_ids(tokenizer, spacing + str(k), context)
            node = -1
            for depth, tok in enumerate(ids, 1):
                if (node, tok) not in children:
                    children[(node, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    depths.append(depth)
                node = children[(node, tok)]
            node_of[k] = node
        t = len(tokens)
        anc = torch.eye(t, dtype=torch.bool)
        for i in range(t):  # parents precede children, so a parent's row is complete
            if parents[i] >= 0:
                anc[i] |= anc[parents[i]]
        return cls(tokens, parents, depths, node_of, anc)


class LocalJudge:
    """Judge with a local causal LM; ``label`` keys the cache.

    ``batch_size`` prompts go through the model together (on CPU batching gains little;
    on a GPU it does).
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 4, answer_prefix: str = ""):
        if batch_size < 1:
            raise InputError(f"judge.batch_size must be >= 1, got {batch_size}")
        impl = getattr(loaded.model.config, "_attn_implementation", None) or ""
        if impl.startswith("flash"):
            raise InputError(f"the local judge needs sdpa or eager attention (a custom mask), not {impl}")
        self.loaded = loaded
        self.batch_size = batch_size
        # A prefilled answer start (e.g. "Score: ") gets small models to answer with a number.
        self.answer_prefix = answer_prefix
        self.label = f"local:{loaded.label}" + (f"|prefix={answer_prefix!r}" if answer_prefix else "")
        self._digit_ids = torch.tensor(digit_token_ids(loaded.tokenizer), dtype=torch.long)
        self._tries: dict[tuple[int, int], CandidateTrie] = {}
        self._lock = threading.Lock()  # the model is not thread-safe

    def trie(self, lo: int, hi: int) -> CandidateTrie:
        """The candidate trie of a scale (built once)."""
        if (lo, hi) not in self._tries:
            self._tries[(lo, hi)] = CandidateTrie.build(self.loaded.tokenizer, lo, hi, self.answer_prefix)
        return self._tries[(lo, hi)]

    def render(self, prompt: str) -> list[int]:
        """Token ids of a judge prompt as one user message plus the generation prompt (and the
        answer prefix without its trailing whitespace)."""
        tok = self.loaded.tokenizer
        ids = prompt_ids(tok, [{"role": "user", "content": prompt}])
        context = self.answer_prefix.rstrip()
        return ids + (tok.encode(context, add_special_tokens=False) if context else [])

    def number_probs(self, prompts: list[str], lo: int = 0, hi: int = 100) -> list[dict[int, float]]:
        """``p_k`` for every integer ``k`` in ``[lo, hi]``, for each prompt."""
        self.loaded.activate()
        trie = self.trie(lo, hi)
        encoded = [self.render(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths together
        out: list[dict[int, float] | None] = [None] * len(prompts)
        with self._lock, torch.inference_mode(), packed_linears(self.loaded.model):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, probs in zip(idx, self._score_batch([encoded[i] for i in idx], trie)):
                    out[i] = probs
        return out  # type: ignore[return-value]

    def score_prompts(self, prompts: list[str], lo: int = 0, hi: int = 100
                      ) -> list[tuple[float | None, dict[int, float]]]:
        """Score and probability per integer answer for each prompt."""
        return [(aggregate_score(p, lo, hi, MIN_MASS), p) for p in self.number_probs(prompts, lo, hi)]

    def _score_batch(self, batch: list[list[int]], trie: CandidateTrie) -> list[dict[int, float]]:
        model = self.loaded.model
        device = self.loaded.device
        n_nodes = len(trie.tokens)
        width = max(len(ids) for ids in batch)
        total = width + n_nodes
        pad_id = self.loaded.tokenizer.pad_token_id or 0

        input_ids = torch.full((len(batch), total), pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), total), dtype=torch.long)
        allowed = torch.zeros((len(batch), total, total), dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        node_tokens = torch.tensor(trie.tokens, dtype=torch.long)
        depths = torch.tensor(trie.depths, dtype=torch.long)
        for b, ids in enumerate(batch):
            start = width - len(ids)  # left padding
            input_ids[b, start:width] = torch.tensor(ids, dtype=torch.long)
            input_ids[b, width:] = node_tokens
            positions[b, start:width] = torch.arange(len(ids))
            positions[b, width:] = len(ids) - 1 + depths
            allowed[b, :width, :width] = causal
            allowed[b, :, :start] = False  # nobody looks at padding ...
            allowed[b, width:, start:width] = True  # nodes see the whole prompt ...
            allowed[b, width:, width:] = trie.ancestors  # ... and their own ancestors
        allowed |= torch.eye(total, dtype=torch.bool)  # padding rows see themselves (no NaN)
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

        out = model(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                    position_ids=positions.to(device), logits_to_keep=n_nodes + 1, use_cache=False)
        # row 0: after the last prompt token; row 1 + i: after node i
        parent_rows = torch.tensor([p + 1 for p in trie.parents], device=device)
        node_tokens = node_tokens.to(device)
        digit_ids = self._digit_ids.to(device)
        ancestors = trie.ancestors.to(device=device, dtype=torch.float64)
        results = []
        for b in range(len(batch)):
            logp = torch.log_softmax(out.logits[b].float(), dim=-1)  # [T + 1, V]
            # log P(node token | its prefix); clamped so that 0 * -inf cannot make a NaN below
            token_lp = logp[parent_rows, node_tokens].double().clamp(min=-1e4)
            path_lp = ancestors @ token_lp  # log P(all tokens from the root to the node)
            digit_lp = torch.logsumexp(logp[1:, digit_ids], dim=-1).double()
            stop = (-torch.expm1(digit_lp)).clamp(min=0.0)  # P(the number ends here)
            p = (torch.exp(path_lp) * stop).cpu().tolist()
            results.append({k: p[node] for k, node in trie.node_of.items()})
        return results
