"""Best-of-N self-verification: the score is the teacher-forced log-likelihood of the caption (every
interface), best-of keeps the argmax and equals drawing that seed alone, N = 1 is plain drawing, bad
values are errors, `mmgen score` ranks files, and a trained model's score tells digits apart."""

import pytest
import torch
from test_interfaces import builder_for, make

from mmgen.assets import DEFAULT_MODEL
from mmgen.chat import Chat
from mmgen.cli import main
from mmgen.data.digits import DigitsDataset
from mmgen.errors import OptionError
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline, to_pil
from mmgen.scoring import score_images

FAST = dict(image_steps=2, guidance=1.0)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained(DEFAULT_MODEL)


@torch.no_grad()
def teacher_forced(model, tok, image, text) -> float:
    """log p(text <eos> | image) summed by hand over `<bos> <boi> image <eoi> text <eos>` through model.logits."""
    n = model.config.image.tokens_per_image
    seq = [tok.bos_id, tok.boi_id] + [tok.pad_id] * n + [tok.eoi_id] + tok.encode(text) + [tok.eos_id]
    t = len(seq)
    image_id = torch.tensor([[-1, -1] + [0] * n + [-1] * (t - 2 - n)])
    x = model.embed(torch.tensor([seq]), image_id, model.read_images(image[None]))
    hidden, _ = model(x, torch.arange(t)[None], torch.zeros(1, t, dtype=torch.long), image_id)
    logp = model.logits(hidden[0]).float().log_softmax(-1)  # (T, V)
    return sum(logp[i, seq[i + 1]].item() for i in range(2 + n, t - 1))  # from <eoi> on: text, then <eos>


@pytest.mark.parametrize("case", ["diffusion", "discrete", "mar"])
def test_score_is_the_teacher_forced_log_likelihood(case, model, builder, tokenizer):
    if case != "diffusion":
        model = make(case, len(tokenizer))
        builder = builder_for(model, tokenizer)
    data = DigitsDataset("test")
    images, texts = data.images[:2], ["a handwritten digit 7", "a digit 0 drawn by hand, slanted"]  # two lengths
    s = score_images(model, builder, images, texts)
    expected = torch.tensor([teacher_forced(model, tokenizer, im, tx) for im, tx in zip(images, texts)])
    torch.testing.assert_close(s.total, expected, atol=1e-4, rtol=1e-5)
    assert s.tokens.tolist() == [len(tokenizer.encode(tx)) + 1 for tx in texts]
    torch.testing.assert_close(s.per_token, expected / s.tokens)
    assert s.total[0] != score_images(model, builder, images[1:], texts[:1]).total[0]  # the image matters


def test_best_of_keeps_the_argmax_and_equals_its_seed_drawn_alone(pipe):
    prompts = ["a handwritten digit 3", "a red circle in the center"]
    opts = GenerationOptions(**FAST, best_of=3)
    best = pipe.draw_best(prompts, opts, seed=4, rows_per_call=4)  # 6 rows in two engine calls
    assert [b.seeds for b in best] == [[4, 5, 6], [7, 8, 9]]
    for b, prompt in zip(best, prompts):
        assert len(set(b.scores.tolist())) == 3 and b.index == int(b.scores.argmax())
        assert torch.equal(b.image, b.candidates[b.index])
        torch.testing.assert_close(b.scores, pipe.score(b.candidates, prompt).total)
        alone = pipe.draw([prompt], GenerationOptions(**FAST), seed=b.seeds[b.index])[0]
        torch.testing.assert_close(alone, b.image, atol=1e-5, rtol=0)
    drawn = pipe.draw(prompts, opts, seed=4)  # draw honours best_of
    for x, b in zip(drawn, best):  # one engine call of 6 rows here, two above: equal up to rounding
        torch.testing.assert_close(x, b.image, atol=1e-5, rtol=0)


def test_best_of_one_is_plain_drawing(pipe):
    prompts = ["a handwritten digit 5", "a blue square on the left"]
    plain = pipe.draw(prompts, GenerationOptions(**FAST), seed=9)
    best = pipe.draw_best(prompts, GenerationOptions(**FAST, best_of=1), seed=9)
    assert all(torch.equal(x, b.image) and b.index == 0 for x, b in zip(plain, best))


@pytest.mark.parametrize("value", [0, -1, 65, 2.0, True, "4"])
def test_bad_best_of_is_an_option_error(value):
    with pytest.raises(OptionError, match=r"best_of = .*must be an integer in \[1, 64\]"):
        GenerationOptions(best_of=value)


def test_out_of_memory_names_the_numbers_and_the_fix(pipe, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
        yield

    monkeypatch.setattr(pipe.engine, "stream", oom)
    with pytest.raises(OptionError, match=r"2 prompt\(s\) × best_of 4 = 8 candidates.*lower rows_per_call"):
        pipe.draw(["a 1", "a 2"], GenerationOptions(best_of=4))


def test_chat_keeps_the_best_reply_and_reports_the_scores(pipe):
    chat = Chat(pipe)
    ask = [{"role": "user", "content": "draw a handwritten digit 4"}]
    reply = chat(ask, seed=3, image="always", best_of=3, **FAST)
    image = next(p for p in reply if not isinstance(p, str))
    scores = image.info["mmgen_scores"]
    assert len(scores) == 3 and image.info["mmgen_score"] == max(scores)
    alone = chat(ask, seed=image.info["mmgen_seed"], image="always", **FAST)
    assert next(p for p in alone if not isinstance(p, str)).tobytes() == image.tobytes()
    with pytest.raises(OptionError, match="best_of = 2 applies to chat"):
        next(chat.stream(ask, best_of=2))


def test_score_and_generate_commands(pipe, tmp_path, capsys):
    data = DigitsDataset("test")
    three, eight = (int((data.labels == d).nonzero()[0][0]) for d in (3, 8))
    for name, i in (("three.png", three), ("eight.png", eight)):
        to_pil(data.images[i]).save(tmp_path / name)
    main(["score", str(tmp_path / "eight.png"), str(tmp_path / "three.png"), "--prompt", "a handwritten digit 3"])
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for p, *_ in lines] == [str(tmp_path / "three.png"), str(tmp_path / "eight.png")]  # best first
    assert float(lines[0][1]) > float(lines[1][1])
    with pytest.raises(SystemExit) as e:
        main(["score", str(tmp_path / "three.png"), str(tmp_path / "missing.png"), "--prompt", "a 3"])
    assert e.value.code == 2 and "missing.png" in capsys.readouterr().err
    main(["generate", "a handwritten digit 3", "--best-of", "2", "--steps", "2", "--guidance", "1",
          "-o", str(tmp_path / "g.png")])
    assert "image 0: best of 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["generate", "a 3", "--best-of", "0", "-o", str(tmp_path / "h.png")])
    assert e.value.code == 2 and "--best-of" in capsys.readouterr().err


def test_a_digit_scores_higher_with_its_own_caption(pipe):
    data = DigitsDataset("test")
    first = [int((data.labels == d).nonzero()[0][0]) for d in range(10)]
    images = torch.stack([pipe.image(data.images[i]) for i in first])  # (10, 3, 16, 16), one per digit
    own = score_images(pipe.model, pipe.builder, images, [f"a handwritten digit {d}" for d in range(10)]).total
    other = score_images(pipe.model, pipe.builder, images, [f"a handwritten digit {(d + 1) % 10}" for d in range(10)])
    assert (own > other.total).all(), (own, other.total)


def test_the_engine_refuses_best_of_instead_of_ignoring_it(pipe):
    with pytest.raises(OptionError, match="best_of = 4: the engine draws one answer per row"):
        pipe.engine.generate([[pipe.tokenizer.encode("a handwritten digit 3")]], GenerationOptions(best_of=4))
