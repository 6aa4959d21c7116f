"""Small self-gated FFN models and a plain training loop for the NA-LoRA tests (torch only, so
that the multi-process script starts fast)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.adapters.nalora import NALoRA
from lightning_peft.adapters.nalora_control import NALoRAController
from lightning_peft.targeting import apply_adapter

D, FF = 16, 32


class SwiGLU(nn.Module):
    def __init__(self, act: nn.Module | None = None, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        super().__init__()
        self.names = names
        for n, shape in zip(names, ((FF, D), (FF, D), (D, FF))):
            setattr(self, n, nn.Linear(shape[1], shape[0], bias=False))
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class Net(nn.Module):
    """Two SwiGLU blocks with gate pre-activations spread over [-6, 6] (a meaningful partition)."""

    def __init__(self, seed: int = 0, act: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([SwiGLU(act) for _ in range(2)])
        with torch.no_grad():
            for b in self.blocks:
                b.gate_proj.weight.normal_(0, 0.8)
                b.gate_proj.weight[: FF // 4] -= 1.0  # a quarter of the channels mostly off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def data(n: int = 8, t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, D, generator=torch.Generator().manual_seed(seed))


def gate_b(model: Net, i: int = 0) -> torch.Tensor:
    return model.blocks[i].gate_proj.lora_B.weight


def adapted(seed: int = 0, **kwargs) -> tuple[Net, torch.optim.Optimizer, NALoRAController]:
    model = Net(seed)
    kwargs = {"rank": 4, "warmup_steps": 2, "refresh_every": 3, **kwargs}
    apply_adapter(model, NALoRA(**kwargs), check_gradients=False)
    with torch.no_grad():  # B = 0 at init: give it a value so that weight decay has something to move
        for b in model.blocks:
            b.gate_proj.lora_B.weight.normal_(0, 0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    return model, opt, NALoRAController(model)


def train(model: nn.Module, opt: torch.optim.Optimizer, ctl: NALoRAController | None, steps: range, x: torch.Tensor) -> None:
    for step in steps:
        loss_of(model, x[step % 2 :: 2]).backward()
        if ctl is not None:
            ctl.before_step(step, opt)
        opt.step()
        if ctl is not None:
            ctl.after_step(opt)
        opt.zero_grad()
