"""Model parallelism without processes: rank order, shards, stage contents, flag checks, recompute,
and the planner's formulas."""

import io
import os
import sys

import pytest
import torch

from megalm.arguments import parse_args
from megalm.config import ConfigError, ModelConfig, ParallelConfig
from megalm.model import GPTModel
from megalm.parallel.state import ParallelState, data_parallel_size_for, group_ranks
from megalm.parallel.tensor import merge_shards, shard
from tests.helpers import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def test_rank_order_keeps_tensor_parallel_ranks_adjacent():
    groups = group_ranks(tp=2, dp=2, pp=2)
    assert groups["tensor_model_parallel_group"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["data_parallel_group"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pipeline_model_parallel_group"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding_group"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    state = ParallelState(rank=6, world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert (state.tensor_model_parallel_rank, state.data_parallel_rank, state.pipeline_model_parallel_rank) == (0, 1, 1)


def test_interleaved_stages_take_every_pp_th_piece():
    layers = {(p, v): list(ParallelState.for_layout(1, 2, 2, 0, p).stage_layers(8, v)) for p in (0, 1) for v in (0, 1)}
    assert layers == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}


def test_stacked_shards_hold_a_slice_of_each_block():
    full = torch.arange(8.0).view(8, 1)  # [gate 0..3; up 4..7]
    shards = [shard(full, 0, r, 2, stacked=2) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5]
    assert torch.equal(merge_shards(shards, 0, stacked=2), full)


def _model(config: ModelConfig, state: ParallelState, virtual_stage: int = 0) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(config, state, virtual_stage)


def test_tensor_and_pipeline_parallel_models_hold_slices_of_the_full_model():
    config = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, swiglu=True,
                         position_embedding_type="rope", padded_vocab_size=256, seq_length=16)
    full = _model(config, ParallelState()).state_dict()
    for tp_rank in range(2):
        for pp_rank in range(2):
            part = _model(config, ParallelState.for_layout(2, 2, 1, tp_rank, pp_rank))
            names = part.state_dict().keys()
            assert ("embedding.weight" in names) == (pp_rank == 0)
            assert ("layers.2.self_attention.linear_qkv.weight" in names) == (pp_rank == 1)
            for name, p in part.named_parameters():
                source = "embedding.weight" if name == "output_layer.weight" else name  # the tied copy
                expected = full[source]
                if hasattr(p, "partition_dim"):
                    expected = shard(expected, p.partition_dim, tp_rank, 2, p.partition_stacked)
                assert torch.equal(p.detach(), expected), name


def test_parallel_flags_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"--num-query-groups \(2\) must be divisible by --tensor-model-parallel-size"):
        tiny_config("--train-iters", "1", "--num-query-groups", "2", "--tensor-model-parallel-size", "4")
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel"):
        tiny_config("--train-iters", "1", "--num-layers-per-virtual-pipeline-stage", "1")
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size"):
        tiny_config("--train-iters", "1", "--num-layers", "4", "--pipeline-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "3", "--micro-batch-size", "1")
    with pytest.raises(ConfigError, match=r"world size \(6 processes\) must be divisible"):
        data_parallel_size_for(ParallelConfig(tensor_model_parallel_size=4), 6)


def _saved_bytes(trainer, batch):
    from megalm.training.trainer import split_batch
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens, labels = split_batch(batch, trainer.state.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.model(tokens, labels).backward()
    return sum(seen.values())


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_changes_memory_not_results(granularity):
    import pretrain_gpt
    from megalm.training.trainer import Trainer, build_data_iterator

    def run(*flags):
        config = tiny_config("--train-iters", "4", "--num-layers", "4", "--hidden-dropout", "0.1",
                             "--attention-dropout", "0.1", *flags)
        trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
        data = build_data_iterator(trainer.datasets[0], 0, config, trainer.state)
        steps = [trainer.train_step(data)[:2] for _ in range(3)]
        memory = _saved_bytes(trainer, next(data))
        trainer.close()
        return [(loss.item(), norm) for loss, norm in steps], memory

    plain, plain_memory = run()
    recomputed, memory = run("--recompute-granularity", granularity, "--recompute-num-layers", "2")
    for step, (got, want) in enumerate(zip(recomputed, plain, strict=True), 1):
        assert got == pytest.approx(want, rel=1e-6), f"step {step}: (loss, grad norm) {got} vs {want}"
    assert memory < plain_memory if granularity == "full" else memory <= plain_memory


def test_planner_formulas():
    from parallel_plan import Cluster, activation_bytes_per_layer, estimate
    flags = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32", "--seq-length", "4096",
             "--micro-batch-size", "1", "--global-batch-size", "64", "--bf16", "--attention-dropout", "0.1"]
    config, _ = parse_args(flags + ["--tensor-model-parallel-size", "4"])
    # Korthikanti et al. 2022, eq. 2 (no flash attention, GELU MLP of 4h, 16-bit): sbh (10 + 24/t + 5as/(ht)).
    s, b, h, a, t = 4096, 1, 2048, 32, 4
    assert activation_bytes_per_layer(config, 1, 2, flash=False) == pytest.approx(
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-9)
    config.parallel.sequence_parallel = True  # eq. 4: everything split by t
    assert activation_bytes_per_layer(config, 1, 2, flash=False) == pytest.approx(
        s * b * h / t * (34 + 5 * a * s / h), rel=1e-9)
    config, _ = parse_args(flags + ["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage",
                                    "2", "--use-distributed-optimizer"])
    plan = estimate(config, Cluster(world_size=16), 50257)
    assert plan["dp"] == 4 and plan["num_microbatches"] == 16
    assert plan["bubble"] == pytest.approx(3 / (2 * 16))
    assert plan["optimizer"] == pytest.approx(2 * plan["weights"] / 4)  # 8 bytes / DP against 4


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 2)])
def test_planner_counts_the_parameters_of_an_moe_model(layout):
    """The planner's parameters per GPU equal those of the model shard megalm builds: first and
    last pipeline stage, the routed experts split by TP and EP, the rest by TP (shared experts,
    attention) or replicated (router, norms, shared-expert gate); a first dense layer and a layer
    pattern included."""
    from parallel_plan import Cluster, estimate, stage_parameter_split
    tp, pp, ep = layout
    config, _ = parse_args(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
                            "--num-query-groups", "2", "--seq-length", "32", "--swiglu", "--ffn-hidden-size", "96",
                            "--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
                            "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate",
                            "--moe-layer-freq", "[0,1,1,0]", "--moe-router-enable-expert-bias",
                            "--vocab-size", "1000", "--micro-batch-size", "1",
                            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                            "--expert-model-parallel-size", str(ep), "--use-distributed-optimizer"])
    config.model.padded_vocab_size = 1024
    for rank in range(pp):
        state = ParallelState.for_layout(tp, pp, 1, 0, rank)
        model = GPTModel(config.model, state)
        experts = sum(p.numel() for p in model.parameters() if getattr(p, "expert_parallel", False)) / ep
        dense = sum(p.numel() for p in model.parameters() if not getattr(p, "expert_parallel", False))
        planned = stage_parameter_split(config, 1024, rank == 0, rank == pp - 1)
        assert planned == {"dense": pytest.approx(dense), "expert": pytest.approx(experts)}, rank
    plan = estimate(config, Cluster(world_size=tp * pp * 4), 1000)  # DP 4: experts' optimizer over DP / EP
    worst = stage_parameter_split(config, 1024, plan["stage"] == "first", plan["stage"] == "last" or pp == 1)
    assert plan["optimizer"] == pytest.approx(8 * (worst["dense"] / 4 + worst["expert"] / (4 // ep)))
    assert (plan["ep_bytes"] > 0) == (ep > 1)


PLANNER_MODEL = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32", "--num-query-groups", "8",
                 "--swiglu", "--seq-length", "4096", "--bf16", "--micro-batch-size", "1", "--global-batch-size", "256",
                 "--use-distributed-optimizer"]


def test_planner_help_lists_its_own_flags_before_the_model_flags(capsys):
    from parallel_plan import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    planner = [text.index(flag) for flag in ("--world-size", "--gpus-per-node", "--gpu-memory-gb",
                                              "--intra-node-gb-per-s", "--inter-node-gb-per-s", "--gpu-tflops", "--search")]
    assert max(planner) < text.index("\n  --num-layers")  # the option lists, after the description
    assert "Every pretrain_gpt.py flag is accepted" in text
    assert "--vocab-size (the tokenizer's vocabulary size)" in text


def test_planner_ranks_exposed_communication_and_bubble_lower():
    from parallel_plan import Cluster, estimate, ranked, step_time
    config, _ = parse_args(PLANNER_MODEL + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    cluster = Cluster(world_size=16)
    plan = estimate(config, cluster, 128256)

    def variant(**changes):
        changed = dict(plan, **changes)
        return dict(changed, **step_time(changed))

    slower = [variant(tp_seconds=plan["tp_seconds"] + 0.05), variant(ep_seconds=plan["ep_seconds"] + 0.05),
              variant(bubble=plan["bubble"] + 0.1), variant(dp_gather_seconds=plan["dp_gather_seconds"] + 0.05)]
    for other in slower:
        assert other["step_seconds"] > plan["step_seconds"]
        assert ranked([other, plan], cluster)[0] is plan
    # The gradient reduction hides behind the last backward pass except for its last bucket:
    # the same seconds cost less there than in a tensor-parallel all-reduce.
    window = 2 / 3 * plan["compute_seconds"] / plan["num_microbatches"]
    extra = (window - plan["dp_reduce_seconds"]) / 2  # still within the window
    assert extra > 0
    more_reduce = variant(dp_reduce_seconds=plan["dp_reduce_seconds"] + extra)
    assert plan["step_seconds"] < more_reduce["step_seconds"] < variant(tp_seconds=plan["tp_seconds"] + extra)["step_seconds"]
    assert plan["tokens_per_second"] == pytest.approx(256 * 4096 / plan["step_seconds"])


def _planner_rows(out: str) -> list:
    """(tp, pp, fits, tokens per second) of each table row."""
    rows = []
    for line in out.splitlines():
        cells = line.split("|")
        if len(cells) == 5 and cells[0].split()[0].isdigit():
            tp, pp = (int(v) for v in cells[0].split()[:2])
            rows.append((tp, pp, cells[1].split()[-1] == "yes", float(cells[4].split()[-1].replace(",", ""))))
    return rows


def test_planner_search_recommends_the_fastest_layout_that_fits(capsys):
    from parallel_plan import main
    # 8.5 GiB rules out the fastest layout (TP 1 x PP 8, 8.8 GiB)
    assert main(PLANNER_MODEL + ["--vocab-size", "128256", "--world-size", "64", "--search",
                                 "--gpu-memory-gb", "8.5"]) == 0
    out = capsys.readouterr().out
    assert "estimates, not measurements" in out
    rows = _planner_rows(out)
    fitting = [r for r in rows if r[2]]
    assert rows[:len(fitting)] == fitting and len(fitting) < len(rows)
    assert [r[3] for r in fitting] == sorted((r[3] for r in fitting), reverse=True)
    assert max(r[3] for r in rows) > fitting[0][3]
    tp, pp = fitting[0][:2]
    assert out.splitlines()[-1].startswith(f"recommended: --tensor-model-parallel-size {tp} "
                                           f"--pipeline-model-parallel-size {pp} --data-parallel-sharding-strategy ")


def test_planner_needs_the_vocabulary(capsys, tmp_path):
    from parallel_plan import main

    from megalm.data.tokenizer.bpe import GPT2_PATTERN, ByteLevelBPETokenizer
    assert main(PLANNER_MODEL) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--vocab-size N (the tokenizer's vocabulary size" in err
    assert "--tokenizer-type" in err
    assert main(PLANNER_MODEL + ["--tokenizer-type", "MegaBPE", "--tokenizer-model", str(tmp_path)]) == 2
    assert "error: --tokenizer-model" in capsys.readouterr().err
    # the vocabulary read from the tokenizer (256 bytes + one special token) gives the same plan
    ByteLevelBPETokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN,
                          {"<|endoftext|>": 256}).save(str(tmp_path / "tokenizer.json"))
    assert main(PLANNER_MODEL + ["--tokenizer-type", "MegaBPE", "--tokenizer-model", str(tmp_path)]) == 0
    from_tokenizer = capsys.readouterr().out
    assert main(PLANNER_MODEL + ["--vocab-size", "257"]) == 0
    assert capsys.readouterr().out == from_tokenizer
