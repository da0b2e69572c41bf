"""The frozen text encoder as the UNet sees it: captions -> (token states, key mask, pooled vector).

The CLIP text transformer is causal, so the states of the tokens up to the end token never depend on
the zero padding after it. We can therefore cut every batch of token ids right after its longest
caption's end token: identical states for the real tokens, and the UNet's cross-attention (which
masks padding anyway) attends over ~20 keys instead of 77. The mask is True up to and including
the end token (argmax of the ids, as CLIP pools).
"""
import torch

from minimedi.tokenizer import Tokenizer
from minimedi.unet import token_mask


def trim_padding(tokens):
    """Token ids [B, 77] cut right after the longest caption's end token (exact for a causal text model)."""
    return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]


class FrozenTextEncoder:
    """Tokenise and encode captions with a frozen CLIP; `encode(captions) -> (states, mask, pooled)`."""

    def __init__(self, clip, tokenizer=None, truncate=False):
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer or Tokenizer()
        self.truncate = truncate

    @property
    def dims(self):
        """(token state width, pooled width): what the UNet's cross-attention and pooled MLP take."""
        return self.clip.config.text_width, self.clip.config.embed_dim

    @torch.no_grad()
    def encode(self, captions, batch_size=256):
        return self.encode_with(self.clip, captions, batch_size)

    def encode_with(self, clip, captions, batch_size=256):
        """`encode` through another CLIP (align.py's tuned copy), with autograd if its weights need it."""
        device = next(clip.parameters()).device
        tokens = trim_padding(self.tokenizer(list(captions), truncate=self.truncate)).to(device)
        states, pooled = [], []
        for chunk in tokens.split(batch_size):
            h, p = clip.text_hidden(chunk)
            states.append(h.float())
            pooled.append(p.float())
        return torch.cat(states), token_mask(tokens), torch.cat(pooled)


class CaptionCache:
    """Encodes each distinct caption of a corpus once; `lookup(ids)` gathers a batch by caption id.

    The text encoder is frozen, so the whole training run reads its conditioning from this table
    instead of running CLIP every step. The states are kept in float16 on the CPU: the phantom's
    captions name exact ages, so nearly every caption is distinct (~18,000 per 20,000 items).
    """

    def __init__(self, encoder, captions):
        unique = sorted(set(captions))
        index = {c: i for i, c in enumerate(unique)}
        self.caption_ids = torch.tensor([index[c] for c in captions])
        states, self.mask, pooled = encoder.encode(unique)
        self.states, self.pooled = states.half().cpu(), pooled.half().cpu()
        self.mask = self.mask.cpu()

    def lookup(self, item_ids):
        """(states, mask, pooled) of the items' captions, float32."""
        ids = self.caption_ids[item_ids.cpu()]
        return self.states[ids].float(), self.mask[ids], self.pooled[ids].float()
