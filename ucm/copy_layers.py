"""The layers that copy from the context, measured on the model itself (no task, no data).

A copying ("induction") head, at a token that occurred before, attends to the token that
followed that earlier occurrence: the head that reproduces a needle's value character by
character. A block's mean key dilutes the one key such a head reads, so these layers need finer
block representations than the others (`ucm.methods.copy_layer_keys`; issue #20, docs/accuracy.md
sessions 21-22: ESA with groups of 2 tokens in Qwen2.5-Coder-0.5B's copying layers and whole
blocks elsewhere scores what dense scores on the multi-key needles that whole blocks everywhere
lose).

The measurement is the standard induction score: a random token sequence of `length` tokens
repeated once; for each query position i of the second copy, the attention it pays to position
i - length + 1 (the token after its earlier occurrence), averaged over the positions and
`sequences` random sequences, per query head; a layer's score is its best head's. Random tokens
make the earlier occurrence the only way to predict the next one, so a score near 1 is a head
that copies and a score near 0 one that does not.
"""

from __future__ import annotations

import torch

#: a layer whose best head pays at least this much attention to the copy source is a copying layer.
#: Measured (4 sequences of 256 tokens), the scores fall in a gap here: Qwen2.5-Coder-0.5B
#: 0.96-0.99 in layers 9/11/16, 0.39-0.49 in 13/19/21/23, then 0.25 and below; SmolLM2-135M
#: 0.80-0.88 in 17/18, 0.39 in 20/23, then 0.15 and below
COPY_THRESHOLD = 0.3
#: at most this share of the layers is taken (the highest scores first; layers a method keeps
#: dense are among them: that method skips them, `ucm.config.copy_layer_defaults`)
MAX_COPY_FRACTION = 0.3


def induction_scores_from_attention(attentions: torch.Tensor, length: int) -> torch.Tensor:
    """Per layer and query head, the mean attention of the second copy's positions to their copy
    source. `attentions`: [layers, heads, 2 * length, 2 * length] (softmax rows) of one sequence
    repeated once. Returns [layers, heads]."""
    if attentions.dim() != 4 or attentions.shape[-1] != 2 * length or attentions.shape[-2] != 2 * length:
        want = f"[layers, heads, {2 * length}, {2 * length}]"
        raise ValueError(f"attentions must be {want}, got {list(attentions.shape)}")
    queries = torch.arange(length + 1, 2 * length)  # the first token of the copy has no earlier successor
    return attentions[:, :, queries, queries - length + 1].mean(-1)


@torch.no_grad()
def induction_scores(model, length: int = 256, sequences: int = 4, seed: int = 0) -> torch.Tensor:
    """Per layer, the best query head's induction score (module docstring) of a Hugging Face
    causal LM run with eager attention. Token ids are drawn from the middle of the vocabulary
    (clear of special and byte tokens, short of the rarest). Returns [layers] in [0, 1]."""
    if length < 2 or sequences < 1:
        raise ValueError(f"length must be >= 2 and sequences >= 1, got {length} and {sequences}")
    vocab = int(model.config.vocab_size)
    low, high = vocab // 50, vocab // 5
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = None
    for _ in range(sequences):
        seq = torch.randint(low, high, (length,), generator=gen)
        ids = torch.cat([seq, seq]).unsqueeze(0).to(device)
        out = model(ids, output_attentions=True, use_cache=False)
        if not out.attentions or out.attentions[0] is None:
            raise ValueError("the model returned no attention weights: load it with attn_implementation='eager'")
        # layer by layer: the [heads, T, T] maps are not stacked into one more copy
        scores = torch.cat([induction_scores_from_attention(a[:1].float(), length).cpu() for a in out.attentions])
        total = scores if total is None else total + scores
    return (total / sequences).max(-1).values


def choose_copy_layers(
    scores: torch.Tensor | list[float],
    threshold: float = COPY_THRESHOLD,
    max_fraction: float = MAX_COPY_FRACTION,
    exclude: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """The layers scoring at least `threshold` (the highest first, ties: the lower layer), at most
    floor(max_fraction * layers) of them, none of `exclude` (dense layers need no groups);
    returned sorted."""
    values = [float(s) for s in scores]
    cap = int(max_fraction * len(values) + 1e-9)
    ranked = sorted((-v, layer) for layer, v in enumerate(values) if v >= threshold and layer not in exclude)
    return sorted(layer for _, layer in ranked[:cap])
