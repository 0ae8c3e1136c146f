"""LoRA: low-rank adapters on the frozen decoder's linear layers (`model.lora`).

A targeted `nn.Linear` of every decoder layer becomes a `LoraLinear`: the same weight and bias
Parameters under the same names (checkpoints, HF names and export are unchanged) plus two small
trainable layers named as peft names them,

    y = W x + b + (alpha / rank) * lora_B(lora_A(dropout(x)))     lora_A [rank, in], lora_B [out, rank]

lora_A starts as peft's (kaiming-uniform, nn.Linear's own init), lora_B at zero: at step 0 the
model is the frozen LM. `merged_weight` folds the update into W for an adapter-free export.
Tensor parallelism swaps these for `furnace.parallel.lora`'s layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from furnace.config import LORA_TARGETS, LoraConfig

ADAPTERS = ("lora_A", "lora_B")
# peft's adapter folder: its config, its weights, and the prefix of its keys over an HF *ForCausalLM
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class ZeroLinear(nn.Linear):
    """nn.Linear whose weight starts at zero, set in its constructor (so ZeRO-3's partitioning at
    construction keeps it)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def new_adapters(in_features: int, out_features: int, rank: int, *, dtype=None, device=None):
    """(lora_A, lora_B) drawn as peft draws them: A kaiming-uniform(a=sqrt(5)), B zeros."""
    return (nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device),
            ZeroLinear(rank, out_features, bias=False, dtype=dtype, device=device))


class LoraLinear(nn.Linear):
    """A frozen nn.Linear's weight and bias (the same Parameters) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float, dropout: float):
        nn.Module.__init__(self)  # nn.Linear's own would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = lora_A, lora_B
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return merge(self.weight.detach(), self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scaling={self.scaling:g}"


def scaling(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.rank


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32 and returned in W's dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def add_lora(lm: nn.Module, cfg: LoraConfig, drawn=None) -> int:
    """Wrap `cfg.targets` of every decoder layer of `lm` in LoraLinear (nothing for rank 0).
    The adapters are drawn layer by layer in LORA_TARGETS order; each adapted linear goes to
    `drawn(name, module)` as it is made (its name in `lm`; what it returns takes its place: a
    parallel build keeps its share); the base weight may be a meta shape (filled in later).
    Returns the number of layers wrapped."""
    if cfg.rank == 0:
        return 0
    n = 0
    for i, layer in enumerate(lm.layers):
        for short, (parent_name, leaf) in LORA_TARGETS.items():
            if short not in cfg.targets:
                continue
            parent = getattr(layer, parent_name)
            base = getattr(parent, leaf)
            real = base.weight if not base.weight.is_meta else None  # adapters are real even on a meta decoder
            a, b = new_adapters(base.in_features, base.out_features, cfg.rank,
                                dtype=None if real is None else real.dtype,
                                device=None if real is None else real.device)
            lin = LoraLinear(base, a, b, scaling(cfg), cfg.dropout)
            setattr(parent, leaf, lin if drawn is None else drawn(f"layers.{i}.{parent_name}.{leaf}", lin))
            n += 1
    return n


def is_adapter(name: str) -> bool:
    """Whether parameter `name` is a LoRA adapter's (`...q_proj.lora_A.weight`)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ADAPTERS


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with every LoraLinear's update folded into its weight and the adapter
    tensors left out: the plain model's state."""
    state = module.state_dict()
    for name, m in module.named_modules():
        if isinstance(m, LoraLinear):
            p = f"{name}." if name else ""
            state[p + "weight"] = m.merged_weight()
            for a in ADAPTERS:
                state.pop(f"{p}{a}.weight")
    return state


def merge_lora(module: nn.Module) -> int:
    """Fold every LoraLinear of `module` back into a plain nn.Linear holding W + scale * B A
    (in place; for decoding paths that replace nn.Linear layers, e.g. quantization). Returns
    how many were merged."""
    n = 0
    for parent in list(module.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, LoraLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                lin.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
                lin.bias = m.bias
                setattr(parent, name, lin)
                n += 1
    return n


def peft_name(name: str) -> str:
    """peft's key of a FlamingoModel adapter: lm.layers.0.self_attn.q_proj.lora_A.weight ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return PEFT_PREFIX + "model." + name.removeprefix("lm.")


def peft_config(cfg: LoraConfig, base_model: str) -> dict:
    """adapter_config.json of these adapters over the HF decoder at `base_model`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": [leaf for short, (_, leaf) in LORA_TARGETS.items() if short in cfg.targets],
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
