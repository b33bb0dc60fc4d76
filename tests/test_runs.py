"""runs.replay_chunks, the analytic sketch's fast replay, gives allocator.replay's peaks to the byte: on a program
written by hand and on the sketches of catalog configurations (mixed dense / MoE layers, frozen layers below,
FSDP1's stream pools, the QLoRA load's quantizer temporaries)."""

import pytest

from memplan.predict import reserve
from memplan.predict.allocator import replay
from memplan.predict.layout import Layout
from memplan.predict.runs import replay_chunks
from memplan.predict.weights import model_states
from memplan.spec.catalog import resolve_model
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, Sharding, TrainConfig

MIB = 2**20


def _same(p: reserve._Program) -> None:
    fast, full = replay_chunks(p.chunks, p.sizes), replay(p.events)
    assert (fast.peak_reserved_bytes, fast.peak_requested_bytes) == (full.peak_reserved_bytes,
                                                                      full.peak_requested_bytes)


def test_a_program_by_hand():
    """Small-pool splits, a large segment split and merged back on both sides, a 0-byte tensor, a free of an
    earlier chunk's tensor, two streams."""
    p = reserve._Program()
    a, b, c = p.new(1000), p.new(300 * 1024), p.new(0)
    big = p.new(30 * MIB)
    p.free(big)
    x, y, z = p.new(8 * MIB), p.new(6 * MIB), p.new(12 * MIB)  # best fit in the cached 30 MiB block, split
    p.mark(layer=True)
    p.free(y, x, c)  # merged with both neighbours
    w = p.new(3 * MIB, stream=1)  # its own pool: a new 20 MiB segment
    p.mark()
    p.free(z, a, w)
    p.new(29 * MIB)
    p.free(b)
    p.mark()
    _same(p)
    assert replay_chunks(p.chunks, p.sizes).peak_reserved_bytes == 2 * MIB + 30 * MIB + 20 * MIB


@pytest.mark.parametrize(("name", "train", "scale"), [
    ("llama-2-7b", dict(batch_size=2, seq_len=2048), 1.0),
    ("llama-2-7b", dict(batch_size=2, seq_len=2048, checkpointing=True, lora_rank=64), 1.0),
    ("meta-llama/Llama-3.2-1B", dict(method=Method.FULL, precision=Precision.BF16, batch_size=2, seq_len=1024), 1.0),
    ("meta-llama/Llama-3.2-3B", dict(method=Method.FREEZE, batch_size=2, seq_len=1024, checkpointing=True), 1.0),
    ("deepseek-ai/DeepSeek-V2-Lite", dict(batch_size=1, seq_len=1024), 1.0),  # a dense layer, then MoE ones
    ("google/gemma-3-1b-pt", dict(batch_size=2, seq_len=1024), 1.0),
    ("meta-llama/Llama-3.2-1B", dict(method=Method.FULL, gpus=8, sharding=Sharding.FULL_SHARD, seq_len=512), 1 / 8),
])
def test_the_sketch_replays_as_the_allocator_model(name, train, scale):
    lay = Layout.of(resolve_model(name), TrainConfig().with_(**train))
    _same(reserve._sketch(lay, model_states(lay), scale))


def test_the_qlora_load_replays_as_the_allocator_model():
    """torchtune's QLoRA load: each weight quantized through the stack's temporaries, built on the device and
    replaced (reserve.load_reserved)."""
    lay = Layout.of(resolve_model("llama-2-7b"), TrainConfig(method=Method.QLORA, stack=Stack.TORCHTUNE))
    p = reserve._Program()
    layers = [reserve._layer_params(lay, i, 1.0) for i in range(lay.spec.num_layers)]
    reserve._load(p, lay, layers, 1.0, quantizer=True)
    reserve._requantize(p, lay, layers)
    p.mark()
    _same(p)
