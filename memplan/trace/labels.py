"""Who made each allocation, for `memplan trace --timeline`: the phase, the aten op and the module (its full name,
`model.layers.3.mlp.down_proj`). Only traced when a timeline is asked for.

Forward (and checkpoint recomputation): the innermost running module, kept by forward pre/post hooks. Backward: the
module whose forward created the autograd node now running (`torch._C._current_autograd_node()`); each module's
forward post hook tags the nodes its forward created (those reachable from its outputs, down to its inputs' nodes,
that no inner module tagged first)."""

from __future__ import annotations

from typing import Any

from memplan.trace.tracker import LiveBytes

Label = tuple[str, str, str]  # (phase, module, op), e.g. ("backward", "model.layers.1.mlp", "aten::mm")
_TAG = "memplan_module"  # the key of a module's name in an autograd node's metadata


class LabelledLiveBytes(LiveBytes):
    """LiveBytes recording events, with `labels[i]` the Label of event i (a free's: its phase only)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(record_events=True, **kwargs)
        self.labels: dict[int, Label] = {}
        self.modules: list[str] = []  # the running forwards, innermost last
        self._op: Any = None
        self._op_names: dict[Any, str] = {}

    def seed(self, tensors: Any) -> None:
        self._op = None  # seeded tensors were made before the trace: no op made them here
        super().seed(tensors)

    def reset_peak(self) -> None:
        super().reset_peak()  # the events start over from what is live: their labels are the phase's
        self.labels = {i: (self.phase, "", "") for i in range(len(self.events or ()))}

    def _add(self, t: Any, check: bool = True) -> None:
        n = len(self.events)
        super()._add(t, check)
        if len(self.events) > n:
            self.labels[n] = (self.phase, self._module(), self._op_name())

    def _free(self, key: int) -> None:
        n = len(self.events) if self.events is not None else -1
        super()._free(key)
        if self.events is not None and len(self.events) > n:
            self.labels[n] = (self.phase, "", "")

    def _module(self) -> str:
        if self.modules:
            return self.modules[-1]
        import torch

        node = torch._C._current_autograd_node()
        return node.metadata.get(_TAG, "") if node is not None else ""

    def _op_name(self) -> str:
        if self._op is None:
            return ""
        name = self._op_names.get(self._op)
        if name is None:
            name = self._op_names[self._op] = self._op._schema.name
        return name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self._op = func
        return super().__torch_dispatch__(func, types, args, kwargs)


def label_modules(model: Any, tracker: LabelledLiveBytes) -> None:
    """Hooks on every module: `tracker.modules` is the stack of running forwards (popped even when a forward stops
    early, as checkpoint recomputation does), and each forward tags the autograd nodes it created."""
    import torch
    from torch.utils._pytree import tree_flatten

    root = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    inputs: list[set[Any]] = []

    def nodes(tree: Any) -> list[Any]:
        return [t.grad_fn for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]

    def enter(name: str) -> Any:
        def hook(_module: Any, args: Any, kwargs: Any) -> None:
            tracker.modules.append(name)
            inputs.append(set(nodes((args, kwargs))))
        return hook

    def leave(name: str) -> Any:
        def hook(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
            stop = inputs.pop() if inputs else set()
            if tracker.modules:
                tracker.modules.pop()
            todo = nodes(output)
            while todo:
                node = todo.pop()
                if node in stop or _TAG in node.metadata:
                    continue
                node.metadata[_TAG] = name
                todo += [f for f, _ in node.next_functions if f is not None]
        return hook

    for name, module in model.named_modules():
        short = name.replace("base_model.model.", "")
        short = root if short in ("", "base_model", "base_model.model") else short
        module.register_forward_pre_hook(enter(short), with_kwargs=True)
        module.register_forward_hook(leave(short), with_kwargs=True, always_call=True)
