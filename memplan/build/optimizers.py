"""The optimizers that need the model to be built (memplan.spec.optimizers entries whose builder names this module):
LLaMA-Factory's create_custom_optimizer (src/llamafactory/train/trainer_utils.py L200-524, HEAD ff6d4d12e) and
transformers' LOMO, built as those do, on the packages they import (galore-torch, apollo-torch, adam-mini,
lomo-optim). llamafactory itself cannot be imported beside transformers 5.24 (it pins <= 5.6)."""

from __future__ import annotations

from typing import Any

from memplan._imports import try_import
from memplan.errors import ConfigError
from memplan.spec.train import ALL_LINEAR, TrainConfig

LR = 1e-5


def _targets(model: Any, train: TrainConfig) -> list[Any]:
    """The 2-D weights of the nn.Linear modules named by proj_targets (_create_galore_optimizer L205-215: "all" is
    find_all_linear_modules, every linear but lm_head)."""
    torch = try_import("torch")
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hit = ("lm_head" not in name) if ALL_LINEAR in train.proj_targets else \
            any(t in name for t in train.proj_targets)
        out += [p for p in module.parameters() if hit and p.requires_grad and p.ndim > 1]
    return out


class DummyOptimizer:
    """LLaMA-Factory's DummyOptimizer (trainer_utils.py L68-84): the layer-wise steps run in backward hooks."""

    def __init__(self, per_param: dict[Any, Any]) -> None:
        self.optimizer_dict = per_param
        self.state: dict[Any, Any] = {}
        for opt in per_param.values():
            self.state.update(opt.state)

    def step(self) -> None:
        for opt in self.optimizer_dict.values():  # the states live in the per-parameter optimizers
            self.state.update(opt.state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _low_rank(model: Any, train: TrainConfig, cls: Any, extra: dict[str, Any], layerwise: bool) -> Any:
    """_create_galore_optimizer / _create_apollo_optimizer: targets get the projection kwargs, the rest plain."""
    targets = _targets(model, train)
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    kwargs = dict(rank=train.proj_rank, update_proj_gap=200, proj_type=train.proj_type.value, **extra)
    if not layerwise:
        return cls([dict(params=rest), dict(params=targets, **kwargs)], lr=LR)
    per_param = {p: cls([dict(params=[p])], lr=LR) for p in rest}
    per_param.update({p: cls([dict(params=[p], **kwargs)], lr=LR) for p in targets})

    def hook(param: Any) -> None:  # trainer_utils.py L264-270
        if param.grad is not None:
            per_param[param].step()
            per_param[param].zero_grad()

    for p in [*rest, *targets]:
        p.register_post_accumulate_grad_hook(hook)
    return DummyOptimizer(per_param)


def galore(model: Any, train: TrainConfig, layerwise: bool = False) -> Any:
    galore_torch = try_import("galore_torch")
    return _low_rank(model, train, galore_torch.GaLoreAdamW, {"scale": 2.0}, layerwise)  # galore_scale 2.0


def apollo(model: Any, train: TrainConfig, layerwise: bool = False) -> Any:
    apollo_torch = try_import("apollo_torch")
    extra = {"scale": 32.0, "proj": "random", "scale_type": "channel"}  # LF's ApolloArguments defaults
    return _low_rank(model, train, apollo_torch.APOLLOAdamW, extra, layerwise)


def adam_mini(model: Any, train: TrainConfig) -> Any:
    """_create_adam_mini_optimizer (L473-495)."""
    adam_mini_pkg = try_import("adam_mini")
    cfg = model.config
    return adam_mini_pkg.Adam_mini(named_parameters=model.named_parameters(), lr=LR, dim=cfg.hidden_size,
                                   n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                                   model_sharding=False, verbose=False)


def muon(model: Any, train: TrainConfig) -> Any:
    raise ConfigError("LLaMA-Factory's Muon (third_party/muon) cannot be built here (llamafactory is not importable "
                      "beside transformers 5.24): estimate it with the analytic mode")


class _FusedBackward:
    """transformers Trainer.training_step runs `optimizer.fused_backward(loss, lr)` for LOMO: backward with the
    per-tensor hooks, then the hook once more for the last gradient (lomo_optim lomo.py fused_backward). In the
    reference step `loss.backward()` fires the hooks; step() is that last call."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.state = inner, getattr(inner, "state", {})

    def step(self) -> None:
        self.inner.lr = LR
        self.inner.grad_func(0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def lomo(model: Any, train: TrainConfig, ada: bool = False) -> Any:
    lomo_optim = try_import("lomo_optim")
    return _FusedBackward((lomo_optim.AdaLomo if ada else lomo_optim.Lomo)(model, lr=LR))
