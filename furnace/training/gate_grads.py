"""`debug.log_gate_grads`: the xattn tanh gates' full gradients before each optimizer step,
averaged over the global batch, unclipped and unscaled, logged as gate_grad/<name> (a per-channel
gate, `model.xattn.gate=vector`: the mean over its channels, which sums over micro-batches)."""
from __future__ import annotations

import torch

from furnace.training.distributed import all_reduce_host


class GateGrads:
    def __init__(self, model, engine, pipe=None, topology=None):
        self.engine, self.pipe, self.topology = engine, pipe, topology
        self.last: dict[str, float] = {}
        if pipe is not None:
            self._install_hooks(model)

    def _install_hooks(self, model) -> None:
        """Pipeline: the gates live on different stages; hooks sum each micro-batch's gradient
        (already divided by the accumulation steps) and one all-reduce assembles them."""
        self.names = [f"xattn.{j}.{g}" for j in range(len(model.xattn)) for g in ("attn_gate", "ff_gate")]
        self.acc = torch.zeros(len(self.names), dtype=torch.float64)
        owned = {id(p) for p in self.pipe.parameters()}
        for k, name in enumerate(self.names):
            j, g = name.split(".")[1:]
            p = getattr(model.xattn[int(j)], g)
            if id(p) in owned:
                p.register_hook(lambda grad, k=k: self.acc.__setitem__(k, self.acc[k] + float(grad.float().mean())))

    def before_step(self) -> None:
        """Layout A: read the gradients at the accumulation boundary (collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_grad

        if not self.engine.is_gradient_accumulation_boundary():
            return
        out = {}
        for name, p in self.engine.module.named_parameters():
            if name.startswith("xattn.") and name.endswith(("attn_gate", "ff_gate")):
                g = safe_get_full_grad(p)
                out[f"gate_grad/{name}"] = float(g.float().mean()) if g is not None else float("nan")
        self.last = out

    def after_pipeline_step(self) -> None:
        acc = self.acc.clone()
        all_reduce_host(acc)  # owners only; tp peers hold equal values, dp replicas are averaged
        acc /= self.topology.tp * self.topology.dp
        self.acc.zero_()
        self.last = {f"gate_grad/{n}": float(v) for n, v in zip(self.names, acc)}
