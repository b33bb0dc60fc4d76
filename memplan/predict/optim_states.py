"""State and step bytes of the optimizers whose states do not follow each parameter one to one (memplan.spec.
optimizers: GaLore / APOLLO projections, Adam-mini, Muon, torchao 4-bit), per trainable tensor from its shape.
Each formula names the source lines it follows; tests/test_optimizers_lf.py checks them against the packages."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.predict.layout import Layout
from memplan.spec.optimizers import Projection, States, facts
from memplan.spec.train import ALL_LINEAR, ProjType

Q4_BLOCK = 128  # torchao AdamW4bit block_size
Q4_MIN = 4096  # torchao _AdamBase._new_buffer: "follow bitsandbytes, only quantize tensors >= 4096 values"
Q4_QMAP = 16 * 4  # the 16-entry fp32 qmap each 4-bit state holds (subclass_4bit.py OptimState4bit.zeros)


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str  # a decoder linear's name (q_proj ...), "norm", "embed", "lm_head" or "lora"
    rows: int
    cols: int  # 0 for a vector
    count: int

    @property
    def numel(self) -> int:
        return self.rows * (self.cols or 1)


def _extra_tensors(lay: Layout) -> list[Tensor]:
    """TrainConfig.extra_modules' trainable (V, H) tensors, named as full fine-tuning names them."""
    n = lay.extra_params() // (lay.spec.vocab_size * lay.spec.hidden_size)
    names = [{"embed_tokens": "embed"}.get(m, m) for m in lay.train.extra_modules][:n]
    return [Tensor(name, lay.spec.vocab_size, lay.spec.hidden_size, 1) for name in names]


def trainable_tensors(lay: Layout) -> list[Tensor]:
    """Every trainable tensor's shape, grouped (count: how many alike); biases are not listed."""
    s = lay.spec
    h = s.hidden_size
    if lay.train.is_lora:
        r = lay.train.lora_rank
        out = []
        for lin in s.layer_linears():
            if lin.name in lay.lora_modules:
                out += [Tensor("lora", r, lin.in_features, len(lay.adapted_ids)),
                        Tensor("lora", lin.out_features, r, len(lay.adapted_ids))]
        return out + _extra_tensors(lay)
    n = lay.trainable_layers
    trained = lay.trained_linear_names()
    out = [Tensor(lin.name, lin.out_features, lin.in_features, n) for lin in s.layer_linears() if lin.name in trained]
    norms = sum(lay.part_trains(p) for p in ("input_layernorm", "post_attention_layernorm")) * s.norms_per_layer // 2
    out.append(Tensor("norm", h, 0, norms * n))
    if lay.full:
        out.append(Tensor("embed", s.vocab_size, h, 1))
        if not s.tie_word_embeddings:
            out.append(Tensor("lm_head", s.vocab_size, h, 1))
        out.append(Tensor("norm", h, 0, s.family.norm_tensors))
    return out + _extra_tensors(lay)


def _projected(lay: Layout, t: Tensor) -> bool:
    """A GaLore / APOLLO target: a 2-D decoder linear named by proj_targets ("all": every linear but lm_head)."""
    targets = lay.train.proj_targets
    return bool(t.cols) and t.name not in ("norm", "embed", "lm_head", "lora") and (
        ALL_LINEAR in targets or any(x in t.name for x in targets))


def _projection(lay: Layout, t: Tensor, width: int) -> tuple[int, int, int]:
    """(state elements of the projected gradient, projector bytes, the step's full-size temporaries) of one target
    matrix m x n (galore_projector.py GaLoreProjector.project / get_orthogonal_matrix, random_projector.py)."""
    opt = facts(lay.train.optimizer)
    m, n, r = t.rows, t.cols, lay.train.proj_rank
    kind = lay.train.proj_type
    right = {ProjType.STD: m >= n, ProjType.REVERSE_STD: m < n, ProjType.RIGHT: True, ProjType.LEFT: False}[kind]
    if opt.projection is Projection.SVD:
        k = min(m, n)
        r = min(r, k)  # U[:, :rank] / Vh[:rank, :] of a full_matrices=False SVD
        # fp32: the slice keeps its whole factor (Vh (k, n) or U (m, k)); a half dtype: `.type(original_type)`
        proj = (k * (n if right else m) * 4) if width == 4 else r * (n if right else m) * width
        # step: project_back's matmul and its `* self.scale` (2 full) beside grad, denom, norm_grad (low rank)
        return r * (m if right else n), proj, 2 * m * n
    # APOLLO random: stable_randn((m, r) or (r, n)) in the parameter's dtype, uncapped; plus state["scaled_grad"],
    # a 0-d norm; step: `p.grad * grad_scaling_factor` (1 full) beside the low-rank grad, denom, norm_grad
    return r * (m if right else n), r * (n if right else m) * width + width, m * n


def special_states(lay: Layout, width: int) -> tuple[int, int]:
    """(state bytes, step temporary bytes) for the rules and projections this module owns."""
    opt = facts(lay.train.optimizer)
    tensors = trainable_tensors(lay)
    if opt.projection is not Projection.NONE:
        states, step = 0, 0
        for t in tensors:
            if _projected(lay, t):
                low, proj, full = _projection(lay, t, width)
                states += t.count * (2 * low * width + proj)  # exp_avg + exp_avg_sq of the projected gradient
                step = max(step, (3 * low + full) * width)
            else:
                states += t.count * 2 * t.numel * width
                step = max(step, 2 * t.numel * width)  # denom, norm_grad (galore_torch/adamw.py: a for loop)
        return states, step
    if opt.states is States.ADAM_MINI:
        # step: `update = (m * stepsize)`, then `p.add_(-update)`; before them `torch.mean(grad * grad, dim=1)`,
        # whose CPU kernel reduces a half tensor through an fp32 copy (measured: +4 B per element)
        per_elem = max(2 * width, width + (4 if lay.device == "cpu" and width == 2 else 0))
        return sum(t.count * (t.numel + _mini_v(lay, t)) * width for t in tensors), \
            per_elem * max(t.numel for t in tensors)
    if opt.states is States.MUON:
        states, step = 0, 0
        for t in tensors:
            if _muon(t):
                states += t.count * t.numel * width  # momentum_buffer = zeros_like(g)
                # g.add(buf), G.bfloat16() unless bf16, X / norm and a Newton-Schulz step in bf16
                step = max(step, t.numel * (width + 2 * 3 + (0 if width == 2 else 2)))
            else:
                states += t.count * 2 * t.numel * width  # moment1, moment2
                step = max(step, 2 * t.numel * width)  # eps + buf2.sqrt(), buf1 / it
        return states, step
    if opt.states is States.ADAM_4BIT:
        def per_state(n: int) -> int:
            return n // 2 + 4 * (n // Q4_BLOCK) + Q4_QMAP if n >= Q4_MIN and n % Q4_BLOCK == 0 else n * width
        return sum(t.count * 2 * per_state(t.numel) for t in tensors), 0
    raise AssertionError(f"no special state rule for {opt.name}")


def _mini_v(lay: Layout, t: Tensor) -> int:
    """Adam-mini's second-moment elements for one tensor (adam_mini.py Adam_mini.step): q/k one per head of
    head_numel = hidden^2 / heads elements; embedding, lm_head, v, o and the MLP one per row; others (norms) one."""
    s = lay.spec
    if t.name in ("q_proj", "k_proj"):
        return t.numel // (s.hidden_size * s.hidden_size // s.num_heads)
    if t.name in ("embed", "lm_head", "v_proj", "o_proj") or t.name in {m.name for m in s.mlp_linears()}:
        return t.rows
    return 1


def _muon(t: Tensor) -> bool:
    """LF's _create_muon_optimizer: `param.ndim == 2 and "embed" not in name and "lm_head" not in name`."""
    return bool(t.cols) and t.name not in ("embed", "lm_head")


def largest_grad(lay: Layout, width: int) -> int:
    """A per-parameter step (layer-wise hooks, LOMO): the gradient alive at once is the largest tensor's."""
    return max(t.numel for t in trainable_tensors(lay)) * width


def fused_step_bytes(lay: Layout, width: int) -> int:
    """LOMO / AdaLomo's update of the largest tensor inside backward (lomo_optim lomo.py / adalomo.py fuse_update):
    `p.grad.to(torch.float32)` and `p.data.to(torch.float32)` are copies unless fp32; AdaLomo adds its fp32
    `update` and the squared gradient it averages (adalomo.py L170-190; not measured: it calls .cuda())."""
    n = max(t.numel for t in trainable_tensors(lay))
    copies = 0 if width == 4 else (2 * 4 - width) * n  # the half gradient is dropped once copied (p.grad = None)
    return copies + (2 * 4 * n if facts(lay.train.optimizer).states is States.FACTORED else 0)
