"""A small decoder-only (GPT/Llama-style) transformer that classifies an image read as a sequence of rows.

The image ``(B, 1, H, W)`` becomes ``H`` tokens of ``W`` pixels; a linear embedding maps each row to the hidden
size, a causal :class:`transformers.LlamaModel` (random configuration, never pretrained weights) runs over the
rows, and a linear head reads the last token. Every projection (embedding, q/k/v/o, gate/up/down, head) is a plain
``nn.Linear``, so :func:`chiplock.softlock.apply_config` runs the whole model on a number format. The attention
score and value products are ``torch.matmul`` inside the attention, not layers, and stay in fp32 as they would in
a weight-and-activation quantised deployment that keeps attention in a wider format.
"""

from __future__ import annotations

import torch
from torch import nn


class GPTClassifier(nn.Module):
    """Causal transformer over image rows; logits from the last row's hidden state.

    Args:
        num_classes: Output classes.
        image_size: Image side ``H = W`` (rows are tokens, pixels per row are the token features).
        width: Hidden size.
        layers: Decoder layers.
        heads: Attention heads (must divide ``width``).

    Raises:
        ValueError: ``heads`` does not divide ``width``, or a size is not positive.

    Example:
        >>> torch.manual_seed(0); model = GPTClassifier(10, 28, width=64)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, image_size: int = 28, width: int = 64, *, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        if min(num_classes, image_size, width, layers, heads) < 1 or width % heads:
            raise ValueError(f"GPTClassifier(width={width}, heads={heads}): use positive sizes and a width "
                             "divisible by heads (e.g. width=64, heads=4)")
        self.image_size = image_size
        cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=16,
                          max_position_embeddings=max(image_size, 32), use_cache=False)
        cfg._attn_implementation = "sdpa"
        self.embed = nn.Linear(image_size, width)
        self.body = LlamaModel(cfg)
        # Tokens come in through ``inputs_embeds``; the unused token table would only add dead weights.
        self.body.embed_tokens = None
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, self.image_size)
        h = self.body(inputs_embeds=self.embed(rows), use_cache=False).last_hidden_state
        return self.head(h[:, -1])


def gpt(num_classes: int = 10, image_size: int = 28, width: int = 64) -> GPTClassifier:
    """:class:`GPTClassifier` with 2 layers and 4 heads (seed torch first for reproducibility)."""
    return GPTClassifier(num_classes, image_size, width)


__all__ = ["GPTClassifier", "gpt"]
