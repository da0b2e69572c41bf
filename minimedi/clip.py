"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two transformers map a caption and an image into one embedding space, trained so that matching pairs
have the highest cosine similarity in a batch (the symmetric InfoNCE loss, `contrastive_loss`).

    text:  tokens -> token + position embeddings -> causal pre-LN blocks -> ln_final
           -> the state at the end-of-text token (the largest id, so argmax) @ text_projection
    image: pixels -> patches (conv with kernel = stride = patch) -> [class token; patches] + positions
           -> ln_pre -> pre-LN blocks -> ln_post(class token) @ proj

Every block is x + attn(ln_1(x)), then x + mlp(ln_2(x)), with the MLP's QuickGELU x * sigmoid(1.702 x).
Parameter names are OpenAI's, so an OpenAI state dict loads as is; Hugging Face `CLIPModel` weights are
renamed on the way in. `load_clip(path)` reads either family (TorchScript archive, plain state dict,
safetensors, pytorch_model.bin, a minimedi checkpoint) and infers the architecture from tensor shapes.
"""
import collections
import io
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimedi import kernels
from minimedi.errors import UserError

# The per-channel statistics every released CLIP was trained with (OpenAI's `clip._transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    """Defaults are ViT-B/32. Heads default to width // 64, as in every released CLIP."""
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int | None = None
    text_layers: int = 12
    image_resolution: int = 224
    vision_width: int = 768
    vision_heads: int | None = None
    vision_layers: int = 12
    patch_size: int = 32

    def __post_init__(self):
        self.text_heads = self.text_heads or self.text_width // 64
        self.vision_heads = self.vision_heads or self.vision_width // 64


# ---- the transformer ---------------------------------------------------------------------------

def quick_gelu(x):
    """The sigmoid approximation of GELU that CLIP was trained with (the weights expect exactly this)."""
    return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """Self-attention with one fused q, k, v projection, stored as OpenAI (and nn.MultiheadAttention) do."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal):
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = kernels.attention(q, k, v, causal=causal)  # [B, H, N, D]
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: the residual stream itself is never normalised, only each branch's input."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, causal):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        w = c.vision_width
        self.conv1 = nn.Conv2d(3, w, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(w ** -0.5 * torch.randn(w))
        grid = c.image_resolution // c.patch_size
        self.positional_embedding = nn.Parameter(w ** -0.5 * torch.randn(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, c.vision_layers, c.vision_heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(w ** -0.5 * torch.randn(w, c.embed_dim))

    def forward(self, images):
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, grid^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


# ---- the model ---------------------------------------------------------------------------------

class CLIP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.visual = VisionTransformer(c)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07 (CLIP §2.5)
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation: residual-branch outputs scaled by (2 * layers)^-1/2 (as GPT-2)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text_width ** -0.5)
        for transformer, width in ((self.transformer, self.config.text_width),
                                   (self.visual.transformer, self.config.vision_width)):
            proj_std = width ** -0.5 * (2 * len(transformer.resblocks)) ** -0.5
            for block in transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def text_hidden(self, tokens):
        """(states [B, L, W] after ln_final, pooled [B, E]) for token ids [B, L], L <= context_length.

        The mask is causal, so cutting trailing padding off `tokens` leaves every kept state unchanged.
        """
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        end = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        return x, x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection

    def encode_text(self, tokens):
        return self.text_hidden(tokens)[1]

    def encode_image(self, images):
        """images [B, 3, R, R], already normalised (see `preprocess`) -> [B, E]."""
        return self.visual(images)

    def forward(self, images, tokens):
        """(logits_per_image [B_img, B_txt], logits_per_text = its transpose): scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        # CLIP §2.5 clips the learned scale at 100 during training; released weights sit exactly there.
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    @classmethod
    def from_openai_state_dict(cls, sd, config=None):
        """A CLIP holding the weights of an OpenAI state dict; `config` defaults to one read off the shapes."""
        config = config or openai_config(sd)
        with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
            model = cls(config)
        expected = model.state_dict()
        for name, meta in expected.items():
            if name not in sd:
                raise UserError(f"CLIP weights incomplete: missing key {name!r}")
            if not isinstance(sd[name], torch.Tensor) or sd[name].shape != meta.shape:
                shape = tuple(getattr(sd[name], "shape", ()))
                raise UserError(f"CLIP weight {name!r} has shape {shape}, expected {tuple(meta.shape)} "
                                f"for the architecture inferred from the other weights")
        # Released weights are fp16; compute in fp32 and leave lower precision to autocast. Copies, so the
        # model never shares memory with the caller's tensors.
        weights = {k: sd[k].to(torch.float32, memory_format=torch.contiguous_format, copy=True) for k in expected}
        model.load_state_dict(weights, assign=True)
        return model

    @classmethod
    def from_hf_state_dict(cls, sd, heads=None):
        """A CLIP holding the weights of a Hugging Face `CLIPModel` state dict.

        `heads` = (text heads, vision heads) from the model's config.json, else width // 64.
        """
        openai = hf_to_openai(sd)
        config = openai_config(openai)
        if heads:
            config.text_heads = heads[0] or config.text_heads
            config.vision_heads = heads[1] or config.vision_heads
        return cls.from_openai_state_dict(openai, config)


def contrastive_loss(logits_per_image):
    """Symmetric InfoNCE (CLIP Fig. 3): pair i is the positive of row i and of column i."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


def preprocess(images, resolution):
    """Our images [B, C, H, W] in [-1, 1] (C = 1 or 3, any size) -> CLIP input [B, 3, R, R].

    OpenAI's `clip._transform` in tensor form: bicubic resize of the short side to R, center crop,
    [0, 1], normalise. Antialiased bicubic is PIL's filter (a = -0.5), which is what CLIP saw in training.
    Differentiable, so the CLIP-consistency loss can send gradients back into generated images.
    """
    x = (images + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    # torchvision's rule for Resize(int): the short side becomes R, the long side is truncated.
    size = (resolution, int(resolution * w / h)) if h <= w else (int(resolution * h / w), resolution)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    x = x[..., top:top + resolution, left:left + resolution]
    mean = x.new_tensor(CLIP_MEAN)[:, None, None]
    std = x.new_tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


# ---- weights from OpenAI and Hugging Face ---------------------------------------------------------

def _tensor(sd, key):
    if not isinstance(sd.get(key), torch.Tensor):
        raise UserError(f"CLIP weights incomplete: missing key {key!r}")
    return sd[key]


def _count_layers(sd, prefix, suffix):
    """How many consecutive blocks `prefix{i}suffix` exist (i = 0, 1, ...)."""
    n = 0
    while f"{prefix}{n}{suffix}" in sd:
        n += 1
    return n


def openai_config(sd):
    """The architecture of OpenAI-named weights, read off the tensor shapes (as OpenAI's `build_model`)."""
    if "visual.attnpool.positional_embedding" in sd:
        raise UserError("this is a ResNet CLIP (e.g. RN50); minimedi implements the ViT CLIPs only")
    patch = _tensor(sd, "visual.conv1.weight")
    grid = round((_tensor(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
    return CLIPConfig(
        embed_dim=_tensor(sd, "text_projection").shape[1],
        context_length=_tensor(sd, "positional_embedding").shape[0],
        vocab_size=_tensor(sd, "token_embedding.weight").shape[0],
        text_width=_tensor(sd, "ln_final.weight").shape[0],
        text_layers=_count_layers(sd, "transformer.resblocks.", ".ln_1.weight"),
        image_resolution=patch.shape[-1] * grid,
        vision_width=patch.shape[0],
        vision_layers=_count_layers(sd, "visual.transformer.resblocks.", ".ln_1.weight"),
        patch_size=patch.shape[-1])


def hf_to_openai(sd):
    """Rename Hugging Face `CLIPModel` weights to OpenAI's names (and fuse q, k, v; transpose projections)."""
    out = {
        "token_embedding.weight": _tensor(sd, "text_model.embeddings.token_embedding.weight"),
        "positional_embedding": _tensor(sd, "text_model.embeddings.position_embedding.weight"),
        "text_projection": _tensor(sd, "text_projection.weight").t(),  # HF stores nn.Linear [E, W]
        "logit_scale": _tensor(sd, "logit_scale"),
        "visual.class_embedding": _tensor(sd, "vision_model.embeddings.class_embedding"),
        "visual.conv1.weight": _tensor(sd, "vision_model.embeddings.patch_embedding.weight"),
        "visual.positional_embedding": _tensor(sd, "vision_model.embeddings.position_embedding.weight"),
        "visual.proj": _tensor(sd, "visual_projection.weight").t(),
    }
    for ours, theirs in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = _tensor(sd, f"{theirs}.{p}")
    for ours, theirs in (("transformer", "text_model.encoder"), ("visual.transformer", "vision_model.encoder")):
        for i in range(_count_layers(sd, f"{theirs}.layers.", ".layer_norm1.weight")):
            a, b = f"{ours}.resblocks.{i}", f"{theirs}.layers.{i}"
            for p in ("weight", "bias"):
                out[f"{a}.ln_1.{p}"] = _tensor(sd, f"{b}.layer_norm1.{p}")
                out[f"{a}.ln_2.{p}"] = _tensor(sd, f"{b}.layer_norm2.{p}")
                out[f"{a}.mlp.c_fc.{p}"] = _tensor(sd, f"{b}.mlp.fc1.{p}")
                out[f"{a}.mlp.c_proj.{p}"] = _tensor(sd, f"{b}.mlp.fc2.{p}")
                out[f"{a}.attn.out_proj.{p}"] = _tensor(sd, f"{b}.self_attn.out_proj.{p}")
                out[f"{a}.attn.in_proj_{p}"] = torch.cat([_tensor(sd, f"{b}.self_attn.{x}_proj.{p}") for x in "qkv"])
    return out


# ---- reading checkpoint files ------------------------------------------------------------------

class _ScriptObject:
    """Stands in for every TorchScript class in an archive: keeps the attribute dict pickle hands it."""

    def __setstate__(self, state):
        self.state = state


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "BoolStorage": torch.bool}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads the module tree of a TorchScript archive (`<name>/data.pkl`) without running any code.

    Only tensor rebuilding and placeholder objects are allowed; anything else in the pickle is refused.
    Tensor bytes (little-endian) live in `<name>/data/<key>`, pointed to by pickle "persistent ids".
    """

    def __init__(self, archive, prefix):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        return torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _flatten(obj, prefix="", out=None):
    """{'visual.conv1.weight': tensor, ...}: every tensor attribute of a TorchScript module tree."""
    out = {} if out is None else out
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject) and isinstance(value.state, dict):
            _flatten(value, f"{prefix}{name}.", out)
    return out


def read_torchscript(archive):
    """The state dict of a TorchScript archive (OpenAI's released `.pt` files), read as data only."""
    tops = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not tops:
        raise ValueError("TorchScript archive without data.pkl")
    return _flatten(_TorchScriptUnpickler(archive, tops[0][:-len("data.pkl")]).load())


def read_state_dict(path):
    """Tensors of a `.safetensors` file, a TorchScript archive, or anything `torch.save` wrote."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(n.endswith("/constants.pkl") for n in archive.namelist()):
                    return read_torchscript(archive)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read CLIP weights from {path} (corrupt, truncated or not a checkpoint): "
                        f"{reason}") from None


def _hf_heads(folder):
    """(text heads, vision heads) from a Hugging Face config.json; refuses activations we do not implement."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
        text, vision = cfg["text_config"], cfg["vision_config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a Hugging Face CLIPModel config") from None
    for part in (text, vision):
        act = part.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise UserError(f"{path}: hidden_act {act!r}; minimedi's CLIP implements OpenAI's quick_gelu only")
    return text.get("num_attention_heads"), vision.get("num_attention_heads")


def load_clip(path):
    """A CLIP in eval mode from OpenAI weights (.pt), Hugging Face weights (folder or file), or our clip.pt."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise UserError(f"{path}: folder has neither model.safetensors nor pytorch_model.bin")
        path = os.path.join(path, names[0])
    elif not os.path.isfile(path):
        raise UserError(f"CLIP weights not found: {path}")
    sd = read_state_dict(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # a minimedi checkpoint (train.py --task clip)
        if "clip_config" in sd:  # it records its architecture: rebuild from that, never guess from shapes
            return CLIP.from_openai_state_dict(sd["model"], CLIPConfig(**sd["clip_config"])).eval()
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not CLIP weights")
    if "text_model.embeddings.token_embedding.weight" in sd:
        model = CLIP.from_hf_state_dict(sd, _hf_heads(folder))
    elif "token_embedding.weight" in sd:
        model = CLIP.from_openai_state_dict(sd)
    else:
        raise UserError(f"{path} holds no CLIP weights (neither OpenAI's 'token_embedding.weight' nor "
                        f"Hugging Face's 'text_model.embeddings.token_embedding.weight')")
    return model.eval()
