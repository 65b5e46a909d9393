"""Distillation losses against TRL's definition, and the cached top-k form."""

import pytest
import torch

from megalm.posttrain.distill import generalized_jsd, topk_generalized_jsd

trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="trl (requirements-dev.txt) is not installed")


def _logits(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_generalized_jsd_equals_trl(beta, temperature):
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    ours = generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature, chunk_size=3)
    theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    g_ours, = torch.autograd.grad(ours, student)
    g_theirs, = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


def test_forward_and_reverse_kl_are_the_two_ends():
    student, teacher = _logits(3), _logits(4)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    assert generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(forward.item(), rel=1e-5)
    assert generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(reverse.item(), rel=1e-5)
    assert generalized_jsd(teacher, teacher, beta=0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_a_padded_teacher_vocabulary_is_cut_to_the_student():
    student, teacher = _logits(5), _logits(6, (2, 5, 16))
    teacher[..., 11:] = 50.0  # padding rows that a real model never predicts would dominate if kept
    expected = generalized_jsd(student, teacher[..., :11], beta=0.5)
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_with_the_whole_vocabulary_is_the_full_loss(beta):
    student, teacher = _logits(7), _logits(8)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3] = -100
    logprobs, indices = teacher.log_softmax(-1).topk(11, dim=-1)
    full = generalized_jsd(student, teacher, labels, beta=beta, temperature=2.0)
    topk = topk_generalized_jsd(student, logprobs, indices, labels, beta=beta, temperature=2.0)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)


def test_topk_restricts_both_distributions_to_the_teachers_tokens():
    student, teacher = _logits(9), _logits(10)
    logprobs, indices = teacher.log_softmax(-1).topk(4, dim=-1)
    s = student.gather(-1, indices).log_softmax(-1)
    t = logprobs.log_softmax(-1)
    expected = (t.exp() * (t - s)).sum(-1).mean()
    assert topk_generalized_jsd(student, logprobs, indices, beta=0.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cached_ids_beyond_the_student_vocabulary_are_refused():
    student = _logits(11)
    indices = torch.full((2, 5, 2), 20)
    with pytest.raises(ValueError, match="another tokenizer"):
        topk_generalized_jsd(student, torch.zeros(2, 5, 2), indices)
