"""Attention over packed documents: every attention backend, the model, the batches and Megatron's
--reset-position-ids / --reset-attention-mask / --eod-mask-loss.

The invariant throughout: a row that packs several documents gives each document the outputs,
logits, loss and gradients it gets when run alone.
"""

import io
import os

import pytest
import torch

import megalm.kernels as K
from megalm.config import ModelConfig
from megalm.data import documents
from megalm.data.documents import IGNORE_INDEX, DocumentSplit, positions_in_documents, split_documents
from megalm.data.errors import DataError
from megalm.model import GPTModel, KVCache
from megalm.parallel.state import ParallelState
from megalm.training.trainer import gpt_forward_step, model_inputs

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "sdpa", "triton"]
# Two packed rows of 37 tokens: three documents (one shorter than a 16-token block, one straddling
# two blocks) and a single document.
LENGTHS = [[5, 20, 12], [37]]


def _document_ids(lengths) -> torch.Tensor:
    return torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths], device=DEVICE)


def _qkv(b, s, n_q, n_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g).to(DEVICE) for n in (n_q, n_kv, n_kv, n_q)]


def _attend(backend, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = K.attention(q, k, v, backend=backend, **kwargs)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


# ------------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_attention_equals_each_document_alone(backend):
    """Outputs and q / k / v gradients of a packed row, sliced per document, equal those of the
    document run alone (GQA, documents shorter than and across the kernel's blocks)."""
    q, k, v, grad = _qkv(2, 37, 4, 2, 16)
    packed = _attend(backend, q, k, v, grad, document_ids=_document_ids(LENGTHS))
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            alone = _attend(backend, *(t[row:row + 1, part] for t in (q, k, v, grad)))
            for name, a, e in zip(("out", "dq", "dk", "dv"), packed, alone):
                torch.testing.assert_close(a[row:row + 1, part], e, atol=2e-5, rtol=1e-5, msg=name)
            start += n


@pytest.mark.parametrize("ids,causal", [
    ([[3] * 17 + [1] * 3 + [3] * 25], True),   # ids that decrease, and one id in two runs
    ([[0] * 17 + [1] * 3 + [2] * 25], False),  # full (bidirectional) attention inside documents
    ([list(range(45))], True),                 # every token its own document
    ([[i for i, n in enumerate([19, 10, 25, 53, 6, 22, 43, 22]) for _ in range(n)]], True),  # many, across blocks
])
def test_triton_and_sdpa_match_reference_on_any_document_ids(ids, causal):
    document_ids = torch.tensor(ids, device=DEVICE)
    q, k, v, grad = _qkv(1, len(ids[0]), 2, 1, 24, seed=1)  # head dim padded 24 -> 32
    want = _attend("reference", q, k, v, grad, causal=causal, document_ids=document_ids)
    for backend in ("sdpa", "triton"):
        got = _attend(backend, q, k, v, grad, causal=causal, document_ids=document_ids)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN by design, in the skipped tiles' own rows
def test_triton_reads_no_block_of_another_document():
    """With documents aligned to 128 tokens (a multiple of every block size the kernel uses), NaN in
    one document cannot reach another through a masked tile: its blocks are skipped, forward
    (V of document 0 -> output and dQ of document 1) and backward (Q of document 1 -> dK, dV of
    document 0)."""
    q, k, v, grad = _qkv(1, 256, 1, 1, 16, seed=2)
    document_ids = torch.tensor([[0] * 128 + [1] * 128], device=DEVICE)
    poisoned = v.clone()
    poisoned[:, :128] = float("nan")
    out, dq, _, _ = _attend("triton", q, k, poisoned, grad, document_ids=document_ids)
    assert torch.isfinite(out[:, 128:]).all() and torch.isfinite(dq[:, 128:]).all()
    poisoned = q.clone()
    poisoned[:, 128:] = float("nan")
    _, _, dk, dv = _attend("triton", poisoned, k, v, grad, document_ids=document_ids)
    assert torch.isfinite(dk[:, :128]).all() and torch.isfinite(dv[:, :128]).all()


def test_document_bounds_give_spans_and_runs():
    from megalm.kernels._triton.attention import document_bounds
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 2, 2, 4, 4]])
    bounds = document_bounds(ids).tolist()
    assert bounds[0] == [[0, 0, 2, 2, 2, 5], [0, 0, 2, 2, 2, 5], [2, 2, 5, 5, 5, 6], [2, 2, 5, 5, 5, 6]]
    # ids that decrease: the runs stay exact, the spans cover the whole row (nothing skipped)
    assert bounds[1] == [[0] * 6, [0, 0, 2, 2, 4, 4], [2, 2, 4, 4, 6, 6], [6] * 6]


def test_auto_and_compiled_triton_take_document_ids():
    q, k, v, grad = _qkv(1, 16, 2, 1, 16, seed=3)
    document_ids = torch.tensor([[0] * 7 + [1] * 9], device=DEVICE)
    want = _attend("reference", q, k, v, grad, document_ids=document_ids)
    auto = _attend("auto", q, k, v, grad, document_ids=document_ids)

    def block(q, k, v):
        return K.attention(q, k, v, backend="triton", document_ids=document_ids)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = compiled(q2, k2, v2)
    out.backward(grad)
    for got in (auto, (out.detach(), q2.grad, k2.grad, v2.grad)):
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n_q,n_kv,d", [(16, 4, 64), (8, 8, 128)])
def test_gpu_bf16_documents_within_twice_plain_bf16_error(n_q, n_kv, d):
    """Autotuned blocks on a GPU: rows of 1024 tokens packing documents of random lengths (some
    shorter than a block, some spanning several)."""
    g = torch.Generator().manual_seed(5)
    lengths = [[int(n) for n in torch.randint(1, 300, (12,), generator=g).cumsum(0) if n < 1024] for _ in range(2)]
    lengths = [[b - a for a, b in zip([0] + row, row + [1024])] for row in lengths]
    document_ids = _document_ids(lengths)
    q, k, v, grad = (t.to(torch.bfloat16) for t in _qkv(2, 1024, n_q, n_kv, d, seed=6))
    got = _attend("triton", q, k, v, grad, document_ids=document_ids)
    exact = _attend("reference", *(t.float() for t in (q, k, v, grad)), document_ids=document_ids)

    def plain(q, k, v):  # naive attention in bf16 (FlashAttention's error baseline)
        group = n_q // n_kv
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
        visible = (document_ids[:, None, :, None] == document_ids[:, None, None, :]).tril()
        scores = ((qt @ kt.transpose(-1, -2)) / d ** 0.5).masked_fill(~visible, float("-inf"))
        return (torch.softmax(scores, -1) @ vt).transpose(1, 2)

    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = plain(q2, k2, v2)
    out.backward(grad)
    for name, a, n, e in zip(("out", "dq", "dk", "dv"), got, (out, q2.grad, k2.grad, v2.grad), exact):
        err, base = (a.float() - e).abs().max().item(), (n.float() - e).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: triton {err:.2e}, plain bf16 {base:.2e}"


@pytest.mark.parametrize("s_q,s_k,document_ids,message", [
    (8, 8, torch.zeros(2, 9, dtype=torch.long), r"document_ids \(2, 9\) do not match q's \[b, s\] = \(2, 8\)"),
    (8, 8, torch.zeros(2, 8), "must be an integer tensor"),
    (4, 8, torch.zeros(2, 4, dtype=torch.long), "s_q == s_k"),  # decoding with a KV cache
])
def test_bad_document_ids_are_refused(s_q, s_k, document_ids, message):
    q = torch.randn(2, s_q, 2, 16)
    k = v = torch.randn(2, s_k, 2, 16)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=message):
            K.attention(q, k, v, backend=backend, document_ids=document_ids)


# ------------------------------------------------------------------------------------ model

def _model_config(rope: bool, backend: str) -> ModelConfig:
    extra = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
                 untie_embeddings_and_output_weights=True) if rope else {}
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, attention_dropout=0.0,
                       hidden_dropout=0.0, padded_vocab_size=64, attention_backend=backend, **extra)


def _documents(seed=0):
    """Two packed rows of 24 tokens ([7, 9, 8] and [24] tokens long): tokens, labels (-100 on each
    document's last token: it predicts nothing of its own), position ids, document ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 24), generator=g)
    document_ids = _document_ids([[7, 9, 8], [24]]).cpu()
    labels = torch.full_like(tokens, IGNORE_INDEX)
    same = document_ids[:, 1:] == document_ids[:, :-1]
    labels[:, :-1] = torch.where(same, tokens[:, 1:], IGNORE_INDEX)
    return tokens, labels, positions_in_documents(document_ids), document_ids


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rope,backend,recompute", [
    (False, "reference", None), (True, "sdpa", None), (True, "triton", None),
    (False, "sdpa", "full"), (True, "sdpa", "selective")])
def test_packed_model_equals_each_document_alone(rope, backend, recompute):
    """Logits, loss and every parameter's gradient of packed rows equal those of the documents run
    one by one (learned positions and RoPE; each attention backend; full and selective recompute)."""
    tokens, labels, position_ids, document_ids = _documents()
    torch.manual_seed(0)
    model = GPTModel(_model_config(rope, backend), ParallelState(recompute_granularity=recompute))
    loss = model(tokens, labels, position_ids=position_ids, document_ids=document_ids)
    loss.backward()
    packed_grads = _grads(model)
    with torch.no_grad():
        logits = model(tokens, position_ids=position_ids, document_ids=document_ids)

    model.zero_grad()
    counted = (labels != IGNORE_INDEX).sum()
    total = 0.0
    for row in range(2):
        for doc in document_ids[row].unique():
            part = document_ids[row] == doc
            t, lab = tokens[row:row + 1, part], labels[row:row + 1, part]
            with torch.no_grad():
                torch.testing.assert_close(logits[row:row + 1, part], model(t), atol=1e-5, rtol=1e-5)
            alone = model(t, lab) * (lab != IGNORE_INDEX).sum() / counted  # its share of the packed mean
            alone.backward()
            total = total + alone.detach()
    torch.testing.assert_close(loss.detach(), total, atol=1e-5, rtol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rope_reads_position_ids():
    """RoPE is relative, so inside a document mask the restart of the positions cannot show; without
    one (--reset-position-ids alone) it does: the explicit 0 .. s-1 equal the default, a restart not."""
    torch.manual_seed(0)
    config = _model_config(True, "sdpa")
    config.init_method_std = 0.5  # attention scores far from uniform, so that positions show
    model = GPTModel(config).eval()
    tokens = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        default = model(tokens)
        torch.testing.assert_close(model(tokens, position_ids=torch.arange(16)[None]), default)
        restarted = model(tokens, position_ids=torch.arange(16).remainder(8)[None])
    torch.testing.assert_close(restarted[:, :8], default[:, :8])
    assert (restarted[:, 8:] - default[:, 8:]).abs().max() > 0.1


def test_model_refuses_bad_position_and_document_ids():
    model = GPTModel(_model_config(True, "sdpa")).eval()
    tokens = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match=r"document_ids must be integers shaped like tokens \(2, 8\)"):
        model(tokens, document_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be integers shaped like tokens"):
        model(tokens, position_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="position id -1 is outside"):
        model(tokens, position_ids=torch.full((2, 8), -1))
    cache = KVCache(model.config, 2, 16)
    with pytest.raises(ValueError, match="decoding with a KV cache takes none"):
        model(tokens, kv_cache=cache, document_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="decoding with a KV cache takes none"):
        model.layers[0].self_attention(torch.randn(2, 8, 32), model.rotary(8), cache,
                                       torch.zeros(2, 8, dtype=torch.long))


# ------------------------------------------------------------------------------------ batches

def _megatron_ltor(data, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron-LM's get_ltor_masks_and_position_ids, written out step by step as its loops do it:
    (loss mask, position ids, attention mask [b, s, s] True where attending is allowed)."""
    b, s = data.shape
    allowed = torch.tril(torch.ones(b, s, s, dtype=torch.bool))
    loss_mask = torch.ones(b, s)
    if eod_mask_loss:
        loss_mask[data == eod] = 0.0
    position_ids = torch.arange(s).repeat(b, 1)
    for row in range(b):
        previous = 0
        for i in (data[row] == eod).nonzero().flatten().tolist():
            if reset_attention_mask:
                allowed[row, i + 1:, :i + 1] = False
            if reset_position_ids:
                position_ids[row, i + 1:] -= i + 1 - previous
                previous = i + 1
    return loss_mask, position_ids, allowed


def test_split_documents_on_a_hand_made_row():
    eod = 0
    tokens = torch.tensor([[5, 6, 0, 7, 8, 0, 9, 4], [0, 3, 3, 0, 0, 2, 2, 1]])
    batch = split_documents(tokens, eod, eod_mask_loss=True)
    assert batch["tokens"].tolist() == tokens[:, :-1].tolist()
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 3, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 0, 0, 1]]
    assert batch["labels"].tolist() == [[6, 0, -100, 8, 0, -100, 4], [-100, 3, 0, -100, -100, 2, 1]]
    plain = split_documents(tokens, eod, reset_position_ids=False, reset_attention_mask=False)
    assert set(plain) == {"tokens", "labels"} and plain["labels"].tolist() == tokens[:, 1:].tolist()


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_split_documents_matches_megatron(flags):
    reset_position_ids, reset_attention_mask, eod_mask_loss = flags
    tokens = torch.randint(0, 4, (3, 41), generator=torch.Generator().manual_seed(4))  # eod 0: many documents
    batch = split_documents(tokens, 0, *flags)
    loss_mask, position_ids, allowed = _megatron_ltor(tokens[:, :-1], 0, *flags)
    assert ((batch["labels"] != IGNORE_INDEX).float() == loss_mask).all()
    assert (batch.get("position_ids", torch.arange(40).expand(3, 40)) == position_ids).all()
    document_ids = batch.get("document_ids", torch.zeros(3, 40, dtype=torch.long))
    mine = (document_ids[:, :, None] == document_ids[:, None, :]) & torch.ones(40, 40, dtype=torch.bool).tril()
    assert (mine == allowed).all()


def test_document_split_reads_the_eod_id_from_the_tokenizer(tmp_path):
    from megalm.config import DataConfig
    assert documents.document_split(DataConfig(mock_data=True, vocab_size=32)) is None
    split = documents.document_split(DataConfig(mock_data=True, vocab_size=32, reset_attention_mask=True))
    assert split == DocumentSplit(31, False, True, False)  # NullTokenizer: the last id
    assert split({"tokens": torch.tensor([[31, 2, 3]])})["document_ids"].tolist() == [[0, 1]]
    post = {"tokens": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}
    assert split(post) is post  # already packed and shifted: left alone

    import tokenizers
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    config = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(path), eod_mask_loss=True)
    with pytest.raises(DataError, match="has none: train with a tokenizer that defines one"):
        documents.document_split(config)


def test_document_ids_and_positions_helpers():
    tokens = torch.tensor([1, 9, 2, 9, 9, 3])
    ids = documents.document_ids_after_eod(tokens, 9)
    assert ids.tolist() == [0, 0, 1, 1, 2, 3]
    assert positions_in_documents(ids).tolist() == [0, 1, 0, 1, 0, 0]


def test_forward_step_takes_both_batch_shapes():
    tokens, labels, position_ids, document_ids = _documents(seed=5)
    torch.manual_seed(0)
    model = GPTModel(_model_config(True, "sdpa"))
    post = {"tokens": tokens, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}
    assert set(model_inputs(post, torch.device("cpu"))) == set(post)
    torch.testing.assert_close(gpt_forward_step(post, model),
                               model(tokens, labels, position_ids=position_ids, document_ids=document_ids))
    rows = torch.randint(0, 64, (2, 25))
    torch.testing.assert_close(gpt_forward_step({"tokens": rows}, model), model(rows[:, :-1], rows[:, 1:]))


def test_pretraining_with_megatron_document_flags_trains():
    """A short run with --reset-position-ids --reset-attention-mask --eod-mask-loss: every micro-batch
    reaches the model split into documents (EOD = --vocab-size - 1 on mock data), and the loss falls."""
    import pretrain_gpt
    from megalm.training.trainer import Trainer
    from tests.helpers import tiny_config

    config = tiny_config("--vocab-size", "16", "--train-iters", "30", "--lr", "3e-3", "--micro-batch-size", "4",
                         "--global-batch-size", "4", "--reset-position-ids", "--reset-attention-mask",
                         "--eod-mask-loss", "--position-embedding-type", "rope")
    seen = []

    def forward_step(batch, model):
        seen.append(batch)
        return gpt_forward_step(batch, model)

    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, forward_step,
                      log_stream=io.StringIO())
    try:
        state = trainer.train()
    finally:
        trainer.close()
    assert all(set(b) == {"tokens", "labels", "position_ids", "document_ids"} for b in seen)
    assert max(int(b["document_ids"].max()) for b in seen) > 0  # rows really hold several documents
    assert all(((b["labels"] == IGNORE_INDEX) == (b["tokens"] == 15)).all() for b in seen)
    losses = [loss for _, loss in state.history]
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.slow
def test_document_flags_under_tensor_sequence_and_pipeline_parallelism(tmp_path):
    """TP=2 with sequence parallelism and full recompute (learned positions), PP=2 (RoPE): the same
    loss and gradient norm as one process with --reset-position-ids --reset-attention-mask
    --eod-mask-loss; every pipeline stage reads the document ids from its own copy of the batch."""
    from tests.test_parallel_equivalence import GPT2, LLAMA, assert_same_curves, launch, train

    # 16 ids (EOD 15: many documents per row), padded alike for one and two tensor-parallel ranks
    flags = ["--vocab-size", "16", "--make-vocab-size-divisible-by", "8", "--reset-position-ids",
             "--reset-attention-mask", "--eod-mask-loss"]
    runs = {"tp2_sp_recompute": GPT2 + flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                "--recompute-granularity", "full"],
            "pp2": LLAMA + flags + ["--pipeline-model-parallel-size", "2"]}
    curves = launch(2, runs, tmp_path)
    assert_same_curves(train(GPT2 + flags), curves["tp2_sp_recompute"], "tp2_sp_recompute")
    assert_same_curves(train(LLAMA + flags), curves["pp2"], "pp2")
