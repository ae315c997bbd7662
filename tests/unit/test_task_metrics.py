"""Task metrics (``fedllm.evaluation``): each metric on hand-made outputs with known values, and the
generation and option scoring on a tiny random Llama against a plain greedy loop and one forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm import fastpath
from fedllm.config import LoraConfig, ModelConfig
from fedllm.config.run import EvaluateConfig
from fedllm.data.formatting import render, tokenize_records
from fedllm.errors import ConfigError
from fedllm.evaluation.generation import generate_ids, generate_texts, option_log_likelihoods
from fedllm.evaluation.metrics import (
    choice_correct,
    exact_match,
    normalize_answer,
    reference_text,
    rouge_l,
)
from fedllm.evaluation.task import TaskScores, score_task, task_items
from fedllm.model.loading import load_model_and_tokenizer
from fedllm.model.lora import apply_lora

CHOICES = ("yes", "no", "maybe")

# ------------------------------------------------------------------------------ metrics on text


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Cat!", "cat"),
    ("An apple, a day.", "apple day"),
    ("  Theory of\tthe\nmind ", "theory of mind"),  # "the" inside a word stays
    ("YES.", "yes"),
    ("", ""),
])
def test_normalize_answer_is_squads(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalized_answers():
    assert exact_match("The answer is 42.", "answer is 42") == 1.0
    assert exact_match("Yes", "yes.") == 1.0
    assert exact_match("yes", "no") == 0.0
    assert exact_match("yes it is", "yes") == 0.0  # no answer set: the whole generation must match


def test_exact_match_with_choices_takes_the_first_option_the_generation_starts_with():
    assert exact_match("Yes, because the trial showed it", "yes", CHOICES) == 1.0
    assert exact_match("Maybe. The evidence is weak", "maybe", CHOICES) == 1.0
    assert exact_match("No.", "yes", CHOICES) == 0.0
    assert exact_match("nonetheless, yes", "no", CHOICES) == 0.0  # "no" only as a whole word
    assert exact_match("The answer: yes", "yes", CHOICES) == 0.0  # it must start with the option
    assert exact_match("yes no", "no", ("no", "yes")) == 0.0  # the option it starts with, not the first listed


def test_rouge_l_is_the_lcs_f1():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = "the cat on the mat", 5 of 6 words each way
    assert rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # order matters: LCS("the mat sat on the cat", "the cat sat on the mat") = "the sat on the", F1 = 4/6
    assert rouge_l("the mat sat on the cat", "the cat sat on the mat") == pytest.approx(4 / 6)
    # precision 2/2, recall 2/6: F1 = 2·1·(1/3) / (1 + 1/3) = 1/2
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(1 / 2)
    assert rouge_l("The cat sat!", "the cat sat") == 1.0  # lower-cased, punctuation dropped
    assert rouge_l("", "the cat sat") == 0.0


def test_rouge_l_is_stemmed():
    # unstemmed this is 2/3 ("cats" != "cat"); the Porter stemmer makes both "cat"
    assert rouge_l("the cats sat", "the cat sat") == 1.0


def test_choice_correct_takes_the_most_likely_option():
    assert choice_correct([-1.0, -0.5, -2.0], CHOICES, "No") == 1.0
    assert choice_correct([-1.0, -0.5, -2.0], CHOICES, "yes") == 0.0
    assert choice_correct([-0.5, -0.5, -2.0], CHOICES, "yes") == 1.0  # a tie goes to the first
    with pytest.raises(ValueError, match="one per choice"):
        choice_correct([-1.0, -0.5], CHOICES, "yes")


def test_reference_text():
    assert reference_text("yes. The study shows a benefit.", "first-word") == "yes"
    assert reference_text("  (Maybe), it depends", "first-word") == "Maybe"
    assert reference_text("  The study shows a benefit.\n", "response") == "The study shows a benefit."
    assert reference_text("   ", "first-word") == ""
    with pytest.raises(ValueError, match="first-word"):
        reference_text("yes", "last-word")


def test_task_scores_means():
    scores = TaskScores(per_record={"exact-match": [1.0, 0.0, 1.0, 1.0], "rouge-l": [0.5, 0.25, 0.0, 0.25]},
                        num_scored=4, seconds=0.1)
    assert scores.means() == {"exact-match": 0.75, "rouge-l": 0.25}
    assert TaskScores(per_record={}, num_scored=0, seconds=0.0).means() == {}


# --------------------------------------------------------------------------------- tiny model


def _tiny_model():
    """A tiny random Llama whose greedy answers depend on the prompt: weights drawn at σ = 0.25 (at the
    default 0.02 every prompt gets the same near-uniform next token), and the end-of-sequence row of the
    tied embedding scaled up so that some generations end early and some do not."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25, generator=generator)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] *= 2.2
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def _prompt(tokenizer, question: str) -> tuple[int, ...]:
    text = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


QUESTIONS = [f"Question {i}: {'x' * i}?" for i in range(6)]


def _naive_greedy(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step, no cache,
    no padding, stop after the end-of-sequence token."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(token)
            new.append(token)
            if token == eos_id:
                break
    return tuple(new)


def test_task_items_split_prompt_and_response(tiny):
    _, tok = tiny
    records = [{"messages": [{"role": "user", "content": "Is water wet?"},
                             {"role": "assistant", "content": "yes. It is."}]},
               {"text": "plain text trains on every token"},
               {"messages": [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "no"}]}]
    items = task_items(tokenize_records(records, tok, max_length=128), tok)
    assert len(items) == 2  # the plain text record has no prompt
    prompt, response = items[0]
    assert tok.decode(list(prompt)) == "<|im_start|>user\nIs water wet?<|im_end|>\n<|im_start|>assistant\n"
    assert response.strip() == "yes. It is."
    assert "<|im_end|>" not in response
    assert items[1][1].strip() == "no"


def test_batched_generation_equals_one_prompt_at_a_time_and_a_naive_loop(tiny):
    model, tok = tiny
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    batched = generate_ids(model, tok, prompts, max_new_tokens=10, batch_size=3)
    alone = [generate_ids(model, tok, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    assert batched == alone
    naive = [_naive_greedy(model, p, 10, tok.eos_token_id) for p in prompts[:4]]
    assert batched[:4] == naive
    # the fixture is a real test of stopping: some answers end early at EOS, some run to the limit
    assert any(len(n) < 10 and n[-1] == tok.eos_token_id for n in naive)
    assert any(len(n) == 10 and tok.eos_token_id not in n for n in naive)
    assert len(set(batched)) > 2  # and they depend on the prompt


def test_generate_texts_decodes_without_special_tokens_and_restores_training_mode(tiny):
    model, tok = tiny
    prompts = [_prompt(tok, q) for q in QUESTIONS[:4]]
    model.train()
    texts = generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=4)
    assert model.training
    ids = generate_ids(model, tok, prompts, max_new_tokens=10, batch_size=4)
    assert model.training
    assert any(i[-1] == tok.eos_token_id for i in ids)
    assert texts == [tok.decode(list(i), skip_special_tokens=True) for i in ids]
    assert not any("<|im_end|>" in t for t in texts)
    model.eval()


@pytest.mark.parametrize("fast_path", [False, True])
def test_generation_on_a_peft_model_with_and_without_the_fast_path(fast_path):
    model, tok = _tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8), fast_path=False)
    with torch.no_grad():  # a non-zero B, so that the adapter changes the answers
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    prompts = [_prompt(tok, q) for q in QUESTIONS[:3]]
    naive = [_naive_greedy(peft_model, p, 8, tok.eos_token_id) for p in prompts]
    if fast_path:
        fastpath.enable(peft_model, device="cpu", max_length=128)
        assert fastpath.is_enabled(peft_model)
    assert generate_ids(peft_model, tok, prompts, max_new_tokens=8, batch_size=3) == naive
    with peft_model.disable_adapter():  # the answers above are the adapter's: without it they differ
        base_only = [_naive_greedy(peft_model, p, 8, tok.eos_token_id) for p in prompts]
        assert generate_ids(peft_model, tok, prompts, max_new_tokens=8, batch_size=3) == base_only
    assert base_only != naive


def _hand_option_log_likelihood(model, prompt, option_ids):
    ids = torch.tensor([list(prompt) + list(option_ids)])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(option_ids)
    positions = range(len(prompt) - 1, len(prompt) - 1 + n)  # the logits at t predict token t + 1
    return sum(float(log_probs[t, ids[0, t + 1]]) for t in positions) / n


@pytest.mark.parametrize("choices, single", [(("y", "n", "m"), True), (CHOICES, False)])
def test_option_log_likelihoods_equal_one_forward_pass_each(tiny, choices, single):
    model, tok = tiny
    # one token each: one forward per prompt serves every option; else one forward per (prompt, option)
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in choices) == single
    prompts = [_prompt(tok, q) for q in QUESTIONS[:3]]  # different lengths: the batch is padded
    scores = option_log_likelihoods(model, tok, prompts, choices, batch_size=4)
    assert len(scores) == 3 and all(len(s) == 3 for s in scores)
    for prompt, row in zip(prompts, scores):
        for option, score in zip(choices, row):
            option_ids = tok(option, add_special_tokens=False)["input_ids"]
            assert score == pytest.approx(_hand_option_log_likelihood(model, prompt, option_ids), abs=1e-5)
    assert len({round(s, 6) for row in scores for s in row}) > 3  # not all the same number


def _qa_records(answers):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(QUESTIONS, answers)]


def test_score_task_scores_the_models_own_answers_as_correct(tiny):
    """Records whose responses are the model's own greedy answers: exact match 1 on every one, which
    holds only if the prompt is cut where the response starts and generation continues from there."""
    model, tok = tiny
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    said = [t.strip() for t in generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=8)]
    examples = tokenize_records(_qa_records(said), tok, max_length=128)
    settings = EvaluateConfig(metrics="exact-match,rouge-l", max_new_tokens=6, max_examples=0, batch_size=3)
    scores = score_task(model, tok, examples, settings)
    assert scores.num_scored == len(QUESTIONS)
    assert scores.per_record["exact-match"] == [1.0] * len(QUESTIONS)
    assert all(0.0 <= s <= 1.0 for s in scores.per_record["rouge-l"])
    wrong = tokenize_records(_qa_records(["zzzz"] * len(QUESTIONS)), tok, max_length=128)
    assert score_task(model, tok, wrong, settings).per_record["exact-match"] == [0.0] * len(QUESTIONS)


def test_score_task_choice_and_max_examples(tiny):
    model, tok = tiny
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    likelihoods = option_log_likelihoods(model, tok, prompts, CHOICES, batch_size=8)
    best = [CHOICES[max(range(3), key=row.__getitem__)] for row in likelihoods]
    examples = tokenize_records(_qa_records([f"{b}. Because." for b in best]), tok, max_length=128)
    settings = EvaluateConfig(metrics="choice,exact-match,rouge-l", choices="yes,no,maybe", reference="first-word",
                              max_new_tokens=4, max_examples=5, batch_size=4)
    scores = score_task(model, tok, examples, settings)
    assert scores.num_scored == 5
    assert list(scores.per_record) == ["choice", "exact-match", "rouge-l"]
    assert all(len(v) == 5 and all(0.0 <= s <= 1.0 for s in v) for v in scores.per_record.values())
    assert scores.per_record["choice"] == [1.0] * 5
    assert set(scores.means()) == {"choice", "exact-match", "rouge-l"}
    assert scores.seconds > 0 and math.isfinite(scores.seconds)


def test_score_task_without_metrics_computes_nothing(tiny):
    model, tok = tiny
    examples = tokenize_records(_qa_records(["yes"] * 3), tok, max_length=128)
    scores = score_task(model, tok, examples, EvaluateConfig(metrics=""))
    assert scores.per_record == {} and scores.num_scored == 0 and scores.means() == {}


def test_score_task_refuses_choice_without_options(tiny):
    model, tok = tiny
    examples = tokenize_records(_qa_records(["yes"]), tok, max_length=128)
    with pytest.raises(ConfigError, match="evaluate.choices"):
        score_task(model, tok, examples, EvaluateConfig(metrics="choice", choices="yes"))
    with pytest.raises(ConfigError, match="exact-match, choice, rouge-l"):
        score_task(model, tok, examples, EvaluateConfig(metrics="bleu"))
