"""What generation speed rests on, checked on CPU: one host read per decode step and none per denoising
step (each read is a device sync on a GPU), weights cast to bf16/fp16 that still generate and stay close to
fp32, and the options that choose them (dtype, device, capture mode) refusing unknown values."""

import contextlib

import pytest
import torch

from mmgen import capture, cli
from mmgen.chat import Chat
from mmgen.errors import OptionError
from mmgen.files import load_device, weight_dtype
from mmgen.generation import Engine, GenerationOptions

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")  # what turns a tensor into Python


@contextlib.contextmanager
def counting_reads(monkeypatch):
    """Count every tensor -> Python value conversion made inside the block."""
    count = [0]

    def counted(original):
        def read(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        yield count


def reads_of(monkeypatch, run) -> int:
    with counting_reads(monkeypatch) as count:
        run()
    return count[0]


def test_a_decode_step_reads_the_device_once(model, builder, tokenizer, monkeypatch):
    engine = Engine(model, builder)
    prompts = [[tokenizer.encode("a handwritten digit")], [tokenizer.encode("seven")]]

    def decode(steps: int):
        opts = GenerationOptions(max_new_tokens=steps, temperature=0, max_images=0)
        out = engine.generate(prompts, opts)
        assert all(sum(map(len, row)) == steps for row in out), "a row ended early: the count would be void"

    decode(2)  # warm: lazy set-up happens once
    per_step = (reads_of(monkeypatch, lambda: decode(12)) - reads_of(monkeypatch, lambda: decode(4))) / 8
    assert per_step == 1  # the tokens (with the positions), read together for the whole batch


def test_a_denoising_step_reads_nothing(model, builder, tokenizer, monkeypatch):
    engine = Engine(model, builder)

    def draw(steps: int):
        opts = GenerationOptions(max_new_tokens=1, image_steps=steps, guidance=3.0, sampler="dpmpp_2m_sde", eta=1.0)
        engine.generate([[tokenizer.encode("digit 4")]], opts, force_image=True)

    draw(2)
    assert reads_of(monkeypatch, lambda: draw(9)) == reads_of(monkeypatch, lambda: draw(3))


@pytest.fixture(scope="module")
def fp32_chat() -> Chat:
    return Chat.from_pretrained()


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_half_precision_weights_generate_and_stay_close_to_fp32(fp32_chat, dtype, tolerance):
    """The bundled (trained) model: prompt logits within `tolerance` × the fp32 logits' standard deviation
    (max abs difference), the same greedy reply; RoPE's inverse frequencies stay float32."""
    chat = Chat.from_pretrained(dtype=dtype)
    assert chat.model.dtype == weight_dtype(dtype) and chat.model.model.rotary.inv_freq.dtype == torch.float32
    messages = [{"role": "user", "content": "draw a handwritten digit 7"}]
    batch = chat.pipe.builder([chat.prompt(messages)], add_eos=False)
    logits = {}
    for name, c in (("fp32", fp32_chat), (dtype, chat)):
        _, last = c.model.prefill(batch)
        logits[name] = c.model.logits(last).float()
    error = (logits[dtype] - logits["fp32"]).abs().max() / logits["fp32"].std()
    assert error < tolerance  # measured: 0.018 (bf16), 0.0022 (fp16)
    question = [{"role": "user", "content": "hello! what can you do?"}]
    assert chat(question) == fp32_chat(question)


def test_unknown_dtype_device_and_capture_mode_are_named_errors(tmp_path):
    with pytest.raises(OptionError, match="bf16, fp16, fp32"):
        Chat.from_pretrained(dtype="bf32")
    with pytest.raises(OptionError, match="cuda:N"):
        load_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA"):
            load_device("cuda")
    assert load_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(OptionError, match="capture mode"):
        capture.set_mode("graphs")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["caption", "x.png", "--dtype", "float8"])
    args = cli.build_parser().parse_args(["chat", "--dtype", "bf16", "--device", "cpu"])
    assert (args.dtype, args.device) == ("bf16", "cpu")
