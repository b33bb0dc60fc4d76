"""CUDA-only terms: the caching allocator's reserved memory over the live bytes, and the context + cuBLAS workspace."""

from __future__ import annotations

from memplan.predict.layout import Layout
from memplan.predict.reserve import load_reserved, reserved_overhead
from memplan.predict.weights import ModelStates, model_states
from memplan.spec.stacks import stack_facts
from memplan.spec.train import Method

MIB = 1024**2
CUDA_CONTEXT_BYTES = 500 * MIB  # CUDA context + cuBLAS workspace: not yet calibrated on a GPU, see README 'Limits'


def cuda_overheads(peak_allocated: int, lay: Layout, st: ModelStates) -> tuple[int, int]:
    """(peak reserved bytes, context bytes). Reserved = the live peak + the allocator's overhead on the step's
    sketched allocation sequence (predict/reserve.py, replayed by predict/allocator.py), sketched at one and two
    decoder layers and put on a line to the model's depth: a full-depth sketch costs ~0.1 s an estimate (a fit
    replays hundreds), and was not closer to the exact mode's replays (benchmarks/results/allocator_catalog.md).
    `st` is one rank's model states (sharding scales each parameter's, gradient's and state's request)."""
    unsharded = model_states(lay).weights_bytes
    scale = st.weights_bytes / unsharded if unsharded else 1.0
    one = reserved_overhead(lay, st, scale, depth=1)
    layers = lay.spec.num_layers
    two = reserved_overhead(lay, st, scale, depth=2) if layers > 1 else one
    overhead = one + (two - one) * (layers - 1)
    reserved = peak_allocated + max(overhead, 0)  # the allocator never reserves less than it hands out
    if stack_facts(lay.train.stack).device_init and lay.train.method is Method.QLORA:
        reserved = max(reserved, load_reserved(lay, st, scale))  # the cache keeps what the load reserved
    return reserved, CUDA_CONTEXT_BYTES
