"""Sampler on synthetic logits whose probabilities are known."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.core.sampler import Argmax, Sampler
from services.engine.core.sequence import Sequence
from services.engine.model.native import PATHS, load_native_kernels
from shared.messages import SamplingParams

PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = torch.tensor([math.log(p) for p in PROBS])
N = 4000
# Chi-square critical value for 3 degrees of freedom at p = 0.0001 is 21.1; generous.
CHI2_BOUND = 25.0


def seqs(
    count: int, output: list[int] | None = None, prompt: list[int] | None = None, **params: object
) -> list[Sequence]:
    result = []
    for i in range(count):
        s = Sequence(f"s{i}", prompt or [0], SamplingParams(**params), arrival=i)
        for token in output or []:
            s.append_token(token)
        result.append(s)
    return result


def frequencies(sampler: Sampler, logits: torch.Tensor, batch: list[Sequence]) -> list[float]:
    tokens = sampler(logits.expand(len(batch), -1).clone(), batch).token_ids
    counts = [0] * logits.shape[-1]
    for t in tokens:
        counts[t] += 1
    return [c / len(tokens) for c in counts]


def chi_square(observed: list[float], expected: list[float], n: int) -> float:
    total = 0.0
    for o, e in zip(observed, expected):
        if e == 0:
            assert o == 0, "a token with probability 0 was sampled"
            continue
        total += n * (o - e) ** 2 / e
    return total


def renormalized(probs: list[float]) -> list[float]:
    total = sum(probs)
    return [p / total for p in probs]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, PROBS),
        ({"temperature": 0.5}, renormalized([p**2 for p in PROBS])),
        ({"temperature": 2.0}, renormalized([p**0.5 for p in PROBS])),
        ({"top_k": 2}, renormalized([0.5, 0.25, 0, 0])),
        ({"top_p": 0.7}, renormalized([0.5, 0.25, 0, 0])),
        ({"top_p": 0.8}, renormalized([0.5, 0.25, 0.15, 0])),
        ({"min_p": 0.25}, renormalized([0.5, 0.25, 0.15, 0])),
        ({"top_k": 3, "top_p": 0.8, "temperature": 0.5}, renormalized([0.25, 0.0625, 0, 0])),
    ],
)
def test_sampled_frequencies_match_the_distribution(params: dict[str, object], expected: list[float]) -> None:
    sampler = Sampler(vocab_size=4, seed=1234)
    observed = frequencies(sampler, LOGITS, seqs(N, **params))
    assert chi_square(observed, expected, N) < CHI2_BOUND, (observed, expected)


def test_unlimited_rows_are_untouched_by_other_rows_top_k() -> None:
    sampler = Sampler(vocab_size=4, seed=5)
    batch = seqs(N // 2, top_k=1) + seqs(N // 2)
    tokens = sampler(LOGITS.expand(N, -1).clone(), batch).token_ids
    assert set(tokens[: N // 2]) == {0}
    counts = [tokens[N // 2 :].count(t) / (N // 2) for t in range(4)]
    assert chi_square(counts, PROBS, N // 2) < CHI2_BOUND


@pytest.mark.parametrize(
    "params", [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 3.0}]
)
def test_greedy_equivalents_pick_the_argmax(params: dict[str, object]) -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    out = Sampler(vocab_size=1000, seed=0)(logits, seqs(64, **params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.fixture(params=["torch", *PATHS])
def pick(request: pytest.FixtureRequest) -> Argmax | None:
    """The greedy pick a Sampler is given: None (torch's) or the native argmax of each path this
    CPU runs; a path it cannot run, or no compiler, is skipped."""
    if request.param == "torch":
        return None
    native = load_native_kernels("auto")
    if native is None or request.param not in native.runnable_paths():
        pytest.skip(f"no native {request.param} kernels on this machine")
    return native.with_path(request.param).argmax


def test_greedy_takes_the_first_of_equal_highest_logits(pick: Argmax | None) -> None:
    logits = torch.zeros(3, 70_000)
    logits[0, [9, 4, 60_000]] = 2.0  # ties: the lowest index wins, as argmax picks it
    logits[1, [69_999, 12]] = 1.0
    sampler = Sampler(vocab_size=70_000, seed=0, argmax=pick)
    assert sampler(logits.clone(), seqs(3, temperature=0.0)).token_ids == [4, 12, 0]
    # The same in a batch that also draws (the greedy rows' path when not every row is greedy).
    mixed = seqs(3, temperature=0.0)
    mixed[2] = seqs(1, temperature=1.0, top_k=1)[0]
    assert sampler(logits, mixed).token_ids[:2] == [4, 12]


# The engine's vocabulary (49152), one not a multiple of any vector width, and rows shorter than one vector.
@pytest.mark.parametrize("vocab", [49_152, 49_157, 37, 5])
@pytest.mark.parametrize("rows", [1, 64])
def test_greedy_matches_torch_argmax_on_random_rows(pick: Argmax | None, rows: int, vocab: int) -> None:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows * vocab))
    want = logits.argmax(dim=-1).tolist()
    assert Sampler(vocab_size=vocab, seed=0, argmax=pick)(logits, seqs(rows, temperature=0.0)).token_ids == want


def test_greedy_with_infinities_and_nan_picks_as_torch(pick: Argmax | None) -> None:
    """-inf is a value like any other (a row of only -inf picks 0); +inf beats every finite value;
    a NaN beats everything, the first one winning, as torch's max and argmax have it."""
    vocab = 1000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    logits[0] = float("-inf")
    logits[1, 500:] = float("-inf")
    logits[2, [700, 300]] = float("inf")
    logits[3, [999, 650]] = float("nan")
    logits[4, [0, 3]] = float("nan")
    logits[5, 40] = float("inf")
    logits[5, 960] = float("nan")
    want = [0, int(logits[1, :500].argmax()), 300, 650, 0, 960]
    assert logits.argmax(dim=-1).tolist() == want
    assert Sampler(vocab_size=vocab, seed=0, argmax=pick)(logits, seqs(6, temperature=0.0)).token_ids == want


def test_seeded_request_draws_the_same_tokens_alone_and_in_a_full_batch() -> None:
    vocab = 50
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(vocab, generator=gen) for _ in range(20)]
    params = {"temperature": 1.0, "seed": 42}

    alone = seqs(1, **params)[0]
    sampler = Sampler(vocab_size=vocab, seed=1)
    alone_tokens = [sampler(logits[None], [alone]).token_ids[0] for logits in steps]

    crowd = seqs(63, temperature=1.5) + seqs(1, **params)
    other_seeded = Sequence("other", [0], SamplingParams(temperature=1.0, seed=7), arrival=99)
    crowd[10] = other_seeded
    sampler = Sampler(vocab_size=vocab, seed=2)
    crowd_tokens = []
    for logits in steps:
        batch_logits = torch.randn(64, vocab, generator=gen)
        batch_logits[-1] = logits
        crowd_tokens.append(sampler(batch_logits, crowd).token_ids[-1])
    assert crowd_tokens == alone_tokens
    assert len(set(alone_tokens)) > 3  # it really sampled


def test_repetition_penalty_changes_only_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 3.0]])
    s = seqs(1, prompt=[0], output=[1], repetition_penalty=2.0)
    penalized = Sampler(vocab_size=5)._apply_penalties(logits, s)
    # Token 0 (prompt, positive) is divided, token 1 (output, negative) multiplied.
    assert penalized.tolist() == [[1.0, -2.0, 1.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 1.0, 0.5, 3.0]]  # the input is not modified


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 5)
    s = seqs(1, prompt=[4, 4], output=[1, 2, 2, 2], presence_penalty=0.5, frequency_penalty=0.25)
    penalized = Sampler(vocab_size=5)._apply_penalties(logits, s)
    assert penalized.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0]]


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    sampler = Sampler(vocab_size=3)
    assert sampler(logits, seqs(1, output=[0], temperature=0.0)).token_ids == [0]
    assert sampler(logits, seqs(1, output=[0], temperature=0.0, repetition_penalty=2.0)).token_ids == [1]
    assert sampler(logits, seqs(1, output=[0], temperature=0.0, frequency_penalty=0.2)).token_ids == [0]
    assert sampler(logits, seqs(1, output=[0, 0, 0], temperature=0.0, frequency_penalty=0.2)).token_ids == [1]
    # Only rows with penalties are touched.
    both = seqs(1, output=[0], temperature=0.0) + seqs(1, output=[0], temperature=0.0, presence_penalty=1.0)
    assert sampler(logits.expand(2, -1).clone(), both).token_ids == [0, 1]


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])  # 0 is EOS, 1 a stop token
    sampler = Sampler(vocab_size=4)
    early = seqs(1, output=[2], temperature=0.0, eos_token_ids=[0], stop_token_ids=[1], min_tokens=2)
    assert sampler(logits, early).token_ids == [2]
    later = seqs(1, output=[2, 3], temperature=0.0, eos_token_ids=[0], stop_token_ids=[1], min_tokens=2)
    assert sampler(logits, later).token_ids == [0]
    # ignore_eos: EOS is an ordinary token, so min_tokens does not mask it.
    ignoring = seqs(1, output=[2], temperature=0.0, eos_token_ids=[0], ignore_eos=True, min_tokens=2)
    assert sampler(logits, ignoring).token_ids == [0]
    # Sampling never draws a masked token either.
    sampled = seqs(500, output=[], eos_token_ids=[0], stop_token_ids=[1], min_tokens=1)
    assert not {0, 1} & set(sampler(logits.expand(500, -1).clone(), sampled).token_ids)


def test_logprobs_are_raw_model_logprobs_with_top_alternatives() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, 0.0]])
    batch = seqs(1, temperature=0.0, logprobs=2, repetition_penalty=5.0, output=[0]) + seqs(1, temperature=0.0)
    out = Sampler(vocab_size=4)(logits, batch)
    raw = torch.log_softmax(logits[0], dim=-1)
    entry = out.logprobs[0]
    assert entry is not None
    chosen, top = entry
    # The penalty moved the choice away from token 0; logprobs still describe the model.
    assert out.token_ids[0] == 1
    assert chosen == pytest.approx(raw[1].item())
    assert [t for t, _ in top] == [0, 1] and top[0][1] == pytest.approx(raw[0].item())
    assert out.logprobs[1] is None


def test_padded_vocabulary_columns_are_never_chosen(pick: Argmax | None) -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0], [5.0, 1.0, 9.0]])  # the model pads its vocabulary to 3
    assert Sampler(vocab_size=2, argmax=pick)(logits, seqs(2, temperature=0.0)).token_ids == [1, 0]


def test_mismatched_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="for 2 sequences"):
        Sampler(vocab_size=4)(torch.zeros(3, 4), seqs(2))


def test_top_p_on_a_large_vocabulary_uses_the_whole_distribution() -> None:
    # 1000 tokens: four likely ones (98% of the mass) and a long tail sharing 2%.
    vocab = 1000
    probs = torch.full((vocab,), 0.02 / (vocab - 4))
    probs[:4] = torch.tensor(PROBS) * 0.98
    sampler = Sampler(vocab_size=vocab, seed=9)
    # top_p = 0.7 of the whole distribution: 0.49 + 0.245 reaches it, so tokens 0 and 1.
    observed = frequencies(sampler, probs.log(), seqs(N, top_p=0.7))
    assert chi_square(observed[:4], [2 / 3, 1 / 3, 0, 0], N) < CHI2_BOUND
    assert sum(observed[4:]) == 0


def test_top_p_on_a_flat_distribution_reaches_beyond_the_candidates() -> None:
    # Nearly flat over 2000 tokens, decreasing with the id: top_p = 0.5 needs some
    # 760 tokens, far more than the sampler's first candidates.
    vocab = 2000
    logits = torch.linspace(0.0, -1.0, vocab)
    probs = torch.softmax(logits, dim=0)
    keep = int((probs.cumsum(0) - probs < 0.5).sum())
    assert keep > 700
    tokens = Sampler(vocab_size=vocab, seed=4)(logits.expand(N, -1).clone(), seqs(N, top_p=0.5)).token_ids
    assert max(tokens) < keep
    assert len(set(tokens)) > 500  # drawn from the whole kept set, not a few hundred candidates


def test_logprobs_rows_keep_their_place_in_a_mixed_batch() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(8))
    batch = seqs(5, temperature=0.0)
    for i, n in ((1, 0), (3, 4)):
        batch[i].sampling = SamplingParams(temperature=0.0, logprobs=n)
    out = Sampler(vocab_size=30)(logits, batch)
    assert [entry is None for entry in out.logprobs] == [True, False, True, False, True]
    for i in (1, 3):
        raw = torch.log_softmax(logits[i], dim=-1)
        chosen, top = out.logprobs[i] or (0.0, [])
        assert chosen == pytest.approx(raw[out.token_ids[i]].item())
        assert [t for t, _ in top] == raw.topk(4).indices.tolist()[: len(top)]
    assert len((out.logprobs[1] or (0.0, [1]))[1]) == 0 and len((out.logprobs[3] or (0.0, []))[1]) == 4
