"""Issue 13's demonstration: start a multimodal model from a pretrained LLM that mmgen itself pretrained.

    python benchmarks/pretrained_start.py                       # every stage, into runs/pretrained-demo
    python benchmarks/pretrained_start.py --pretrain-steps 400 --digits-steps 3000 --out runs/pd
    python benchmarks/pretrained_start.py --runs frozen --set model.diffusion.loss_weight=3 --stop-after digits
                                                                # one digits run, a recipe override

Stages (each skipped when its output exists; an interrupted training run resumes from its checkpoint):
  1 corpus      pydoc_data.topics (CPython's language-reference topics) as paragraphs, plus (default) the text
                of 4,000 of the bundled dialogues, one conversation per paragraph; 5% held out by hash
  2 tokenizer   byte-level BPE (`tokenizers`) on the train split, saved as an HF tokenizer directory
  3 llama       a random small LlamaForCausalLM (transformers) saved next to the tokenizer
  4 pretrain    `mmgen train` on the text with --model.init_from, then `mmgen export-hf` -> the "pretrained LLM"
  5 digits      `mmgen train digits-tiny --model.init_from=LLM`: --model.freeze=text and full fine-tuning,
                side by side, one thread each; peak memory = the child's ru_maxrss (os.wait4)
  6 measure     held-out text perplexity (transformers on the HF directory, mmgen's text logits on every run)
                and the digits evaluation (mmgen.evaluation.evaluate_digits); prints the markdown table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmgen.evaluation import evaluate_digits
from mmgen.generation import GenerationOptions
from mmgen.model import MMGenModel
from mmgen.tokenizers.text_contract import load_text_tokenizer
from mmgen.train.tracking import read_log

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
RUNS = ["frozen", "full"]  # stage 5: --model.freeze=text, full fine-tuning (+ "frozen-lora" with --lora-rank)
LABELS = {"frozen": "--model.freeze=text", "full": "full fine-tuning", "frozen-lora": "freeze=text + LoRA"}
HELD_OUT_PERCENT = 5


def say(message: str) -> None:
    print(f"[pretrained-demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- stages 1-3: corpus, tokenizer, random Llama ---------------------------------------------------------


def held_out(paragraph: str) -> bool:
    """The fixed split: 5% of paragraphs by the SHA-256 of their text (duplicates land on the same side)."""
    return int(hashlib.sha256(paragraph.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def dialogue_paragraphs(n: int) -> list[str]:
    """The text of `n` bundled dialogues (`mmgen.data.dialogues`), one conversation per paragraph, images
    left out: the words the digits and shapes are named with, as an LLM would have seen them."""
    from mmgen.data.dialogues import DialogueSource

    source, rng = DialogueSource(n, seed=0, channels=1, resolution=8), random.Random(0)
    return [" ".join(p for m in source.sample(i, rng) for p in m.parts if isinstance(p, str)) for i in range(n)]


def make_corpus(out: Path, dialogues: int) -> None:
    """corpus/train.txt and corpus/heldout.txt: blank-line separated paragraphs of pydoc_data.topics and of
    `dialogues` bundled conversations."""
    if (out / "corpus" / "heldout.txt").is_file():
        return say("corpus: exists, skipped")
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]) if p.strip()]
    paragraphs += dialogue_paragraphs(dialogues)
    split = {"train": [p for p in paragraphs if not held_out(p)], "heldout": [p for p in paragraphs if held_out(p)]}
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for name, parts in split.items():
        (out / "corpus" / f"{name}.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        say(f"corpus: {name}: {len(parts)} paragraphs, {sum(map(len, parts)) / 1e3:.0f} K characters")


def make_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE trained on the train split, saved by PreTrainedTokenizerFast.save_pretrained."""
    d = out / "llama-random"
    if (d / "tokenizer.json").is_file():
        return say("tokenizer: exists, skipped")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS.values()), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    paragraphs = (out / "corpus" / "train.txt").read_text(encoding="utf-8").split("\n\n")
    tok.train_from_iterator(paragraphs, trainer)
    bos = tok.token_to_id(SPECIALS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS).save_pretrained(d)
    say(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} pieces -> {d}")


def make_llama(out: Path, width: int, layers: int, seed: int) -> None:
    """A random LlamaForCausalLM (tied embeddings, 4 heads, MLP 3.5× width) saved next to the tokenizer."""
    d = out / "llama-random"
    if (d / "config.json").is_file():
        return say("random Llama: exists, skipped")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(d)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=int(3.5 * width),
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    say(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, width {width}, "
        f"{layers} layers -> {d}")


# -- stages 4-5: training runs (child processes) ----------------------------------------------------------


def finished(run: Path) -> bool:
    return (run / "model.safetensors").is_file() and (run / "config.json").is_file()


def start_train(args: list[str], run: Path) -> tuple[subprocess.Popen, list[str], float]:
    """`mmgen train ARGS --out RUN` in the background (stdout+stderr to RUN.log), resuming a checkpoint."""
    cmd = [sys.executable, "-m", "mmgen.train", *args, f"--out={run}"]
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd.append("--resume")
    say("running: " + " ".join(cmd[2:]))
    log = open(f"{run}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), cmd, time.perf_counter()


def wait_train(proc: subprocess.Popen, cmd: list[str], start: float, run: Path) -> dict:
    """Wait for the child; write RUN.json with wall time and peak resident memory (ru_maxrss of the child)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = Path(f"{run}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[2:])} exited with {proc.returncode}; end of {run}.log:\n{tail}")
    found = re.findall(r"([\d.]+)M trainable parameters", Path(f"{run}.log").read_text(encoding="utf-8"))
    record = {"command": "mmgen train " + " ".join(cmd[3:]), "wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "trainable_m": float(found[-1]) if found else None,
              "lora_rank": next((int(c.split("=")[1]) for c in cmd if c.startswith("--model.lora.rank=")), 0)}
    Path(f"{run}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    say(f"{run.name}: done in {record['wall_s'] / 60:.1f} min, peak RSS {record['peak_rss_mb']} MB")
    return record


def pretrain_config(out: Path, steps: int, batch: int, lr: float) -> Path:
    """The text pretraining job: the text source, packed rows of 256 tokens, no EMA, no image samples."""
    path = out / "pretrain.yaml"
    path.write_text(f"""# written by benchmarks/pretrained_start.py
seed: 0
model: {{preset: tiny, init_from: {out / 'llama-random'}}}
data:
  sources:
    - {{kind: text, path: {out / 'corpus' / 'train.txt'}, text_unit: paragraph}}
  packing: pack
optim: {{lr: {lr}, min_lr_ratio: 0.05, warmup_steps: {max(10, steps // 20)}, weight_decay: 0.05}}
train: {{steps: {steps}, batch_size: {batch}, ema_decay: 0, threads: 1}}
checkpoint: {{every: 100, keep: 1}}
log: {{every: 25, progress: false}}
samples: {{every: 0}}
eval: {{digits: 0}}
""", encoding="utf-8")
    return path


def pretrain(out: Path, steps: int, batch: int, lr: float) -> None:
    """Stage 4: text pretraining with `mmgen train`, then `mmgen export-hf` -> out/llm (the pretrained LLM)."""
    run, llm = out / "pretrain", out / "llm"
    if not finished(run):
        wait_train(*start_train([str(pretrain_config(out, steps, batch, lr))], run), run)
    else:
        say("pretrain: exists, skipped")
    if not (llm / "config.json").is_file():
        cmd = [sys.executable, "-m", "mmgen.cli", "export-hf", str(run), str(llm)]
        say("running: mmgen export-hf " + " ".join(cmd[4:]))
        subprocess.run(cmd, check=True)


def digits(out: Path, steps: int, lora_rank: int, overrides: list[str]) -> None:
    """Stage 5: the digits runs from the pretrained LLM, side by side, one thread each."""
    common = ["digits-tiny", f"--model.init_from={out / 'llm'}", f"--train.steps={steps}", "--threads=1",
              "--eval.digits=0", "--log.progress=false", *(f"--{kv}" for kv in overrides)]
    extra = {"frozen": ["--model.freeze=text"], "full": [],
             "frozen-lora": ["--model.freeze=text", f"--model.lora.rank={lora_rank}"]}
    todo = [name for name in RUNS if not finished(out / f"digits-{name}")]
    if not todo:
        return say("digits runs: exist, skipped")
    started = {name: start_train(common + extra[name], out / f"digits-{name}") for name in todo}
    for name, (proc, cmd, start) in started.items():
        wait_train(proc, cmd, start, out / f"digits-{name}")


# -- stage 6: measurements ----------------------------------------------------------------------------------


def held_out_windows(out: Path, window: int) -> list[list[int]]:
    """The held-out paragraphs as token ids: each paragraph + </s>, cut into windows of `window` predicted
    tokens, each window after <s> (the same ids go to transformers and to mmgen)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "llm" / "tokenizer.json"))
    bos, eos = tok.token_to_id(SPECIALS["bos_token"]), tok.token_to_id(SPECIALS["eos_token"])
    windows = []
    for p in (out / "corpus" / "heldout.txt").read_text(encoding="utf-8").split("\n\n"):
        if p.strip():
            ids = tok.encode(p.strip(), add_special_tokens=False).ids + [eos]
            windows += [[bos] + ids[k : k + window] for k in range(0, len(ids), window)]
    return windows


def perplexity(logits_of, windows: list[list[int]], vocab: int) -> dict:
    """exp(mean cross-entropy) of every next token; `vocab` limits the softmax to the checkpoint's ids (the
    mmgen model also has its appended control rows, which an HF model has not); full: over every row."""
    nll = {"text": 0.0, "full": 0.0}
    count = 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = logits_of(ids)[0, :-1].double()  # (T-1, V)
            target = ids[0, 1:]
            nll["text"] += torch.nn.functional.cross_entropy(logits[:, :vocab], target, reduction="sum").item()
            nll["full"] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += len(target)
    return {k: math.exp(v / count) for k, v in nll.items()} | {"tokens": count}


def mmgen_logits(run: Path):
    """Text-only logits of an mmgen model directory: ids (1, T) -> (1, T, V) through the text path."""
    model = MMGenModel.from_pretrained(run).eval()
    bos = load_text_tokenizer(run).bos_id

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        if ids[0, 0].item() != bos:
            raise ValueError(f"{run}: the held-out windows start with id {ids[0, 0].item()}, mmgen's <bos> is {bos}")
        t = ids.shape[1]
        positions, doc = torch.arange(t)[None], torch.zeros(1, t, dtype=torch.long)
        hidden, _ = model(model.embed(ids), positions, doc, torch.full((1, t), -1))
        return model.logits(hidden)

    return logits_of


def hf_logits(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return lambda ids: model(input_ids=ids).logits


def tokens_per_s(run: Path) -> float:
    """The median of the run's logged tokens/s (one figure per log row): robust to other jobs on the cores."""
    return statistics.median(float(r["tokens_per_s"]) for r in read_log(run))


def same_weights(a: Path, b: Path) -> bool:
    """Whether two HF directories hold bit-identical model.safetensors tensors."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def measure_text(out: Path, window: int) -> dict:
    """Held-out perplexities: transformers on the exported LLM, mmgen's text path of every run."""
    windows = held_out_windows(out, window)
    vocab = json.loads((out / "llm" / "config.json").read_text())["vocab_size"]
    say(f"perplexity: {len(windows)} held-out windows, softmax over the LLM's {vocab} ids")
    result = {"transformers (llm)": perplexity(hf_logits(out / "llm"), windows, vocab),
              "transformers (random)": perplexity(hf_logits(out / "llama-random"), windows, vocab)}
    for name in ("pretrain", *(f"digits-{r}" for r in RUNS)):
        result[name] = perplexity(mmgen_logits(out / name), windows, vocab)
        say(f"perplexity of {name}: {result[name]['text']:.6f} (all {result[name]['full']:.6f})")
    hf = out / "digits-frozen-hf"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mmgen.cli", "export-hf", str(out / "digits-frozen"), str(hf)],
                       check=True)
    result["frozen export == llm, bit for bit"] = same_weights(hf, out / "llm")
    return result


def measure_digits(out: Path, per_digit: int, guidance: list[float]) -> dict:
    """evaluate_digits of each digits run at each guidance; the grid of the last guidance as a PNG."""
    result = {}
    for name in RUNS:
        for g in guidance:
            grid = out / f"digits-{name}-grid-g{g:g}.png"
            r = evaluate_digits(out / f"digits-{name}", per_digit, GenerationOptions(guidance=g), grid=grid)
            result[f"{name} g{g:g}"] = {k: r[k] for k in ("prompted_class_accuracy", "caption_accuracy", "images",
                                                          "held_out_digits", "example_captions")}
            say(f"digits {name}, guidance {g:g}: prompted-class {r['prompted_class_accuracy']:.3f}, "
                f"captions {r['caption_accuracy']:.3f}; grid {grid}")
    return result


def cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return value


def table(out: Path, text: dict, dig: dict, guidance: list[float]) -> str:
    """The final markdown table."""
    base = text["pretrain"]["text"]
    g = " / ".join(f"g{x:g}" for x in guidance)
    head = (f"| run | text ppl (held-out) | Δ vs pretrained | prompted-class acc ({g}) | caption acc | "
            "train tokens/s | peak memory (RSS) | trainable params |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    hf = text["transformers (llm)"]["text"]
    lines.append(f"| random Llama (transformers) | {text['transformers (random)']['text']:.6f} | | | | | | |")
    rec = json.loads((out / "pretrain.json").read_text()) if (out / "pretrain.json").is_file() else {}
    lines.append(f"| pretrained LLM: transformers on llm/ | {hf:.6f} | {hf - base:+.6f} | | | | | |")
    lines.append(f"| pretrained LLM: mmgen run pretrain/ | {base:.6f} | 0 | | | {tokens_per_s(out / 'pretrain'):,.0f} | "
                 f"{rec.get('peak_rss_mb', '?')} MB | {rec.get('trainable_m', '?')}M |")
    for name in RUNS:
        ppl = text[f"digits-{name}"]["text"]
        rec = json.loads((out / f"digits-{name}.json").read_text()) if (out / f"digits-{name}.json").is_file() else {}
        accs = " / ".join(f"{dig[f'{name} g{x:g}']['prompted_class_accuracy']:.1%}" for x in guidance)
        cap = dig[f"{name} g{guidance[0]:g}"]["caption_accuracy"]
        label = LABELS[name] + (f" (rank {rec['lora_rank']})" if rec.get("lora_rank") else "")
        lines.append(f"| digits, {label} | {ppl:.6f} | {ppl - base:+.6f} | {accs} | {cap:.1%} | "
                     f"{tokens_per_s(out / f'digits-{name}'):,.0f} | {rec.get('peak_rss_mb', '?')} MB | "
                     f"{rec.get('trainable_m', '?')}M |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrained-demo")
    p.add_argument("--dialogues", type=int, default=4000,
                   help="bundled conversations added to the corpus (their text only; 0: pydoc alone)")
    p.add_argument("--vocab", type=int, default=3000, help="BPE vocabulary of the LLM")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-batch", type=int, default=16, help="rows of 256 packed tokens per step")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--digits-steps", type=int, default=3000, help="the README's default digits job: 3,000 × 64")
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--lora-rank", type=int, default=0, help="also a digits run with freeze=text + LoRA of this rank")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, help="which digits runs (default: both)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the digits runs, e.g. --set model.diffusion.loss_weight=0.5")
    p.add_argument("--stop-after", choices=["corpus", "tokenizer", "llama", "pretrain", "digits"])
    args = p.parse_args()
    torch.set_num_threads(1)
    RUNS[:] = args.runs
    if args.lora_rank:
        RUNS.append("frozen-lora")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [("corpus", lambda: make_corpus(out, args.dialogues)), ("tokenizer", lambda: make_tokenizer(out, args.vocab)),
              ("llama", lambda: make_llama(out, args.width, args.layers, seed=0)),
              ("pretrain", lambda: pretrain(out, args.pretrain_steps, args.pretrain_batch, args.pretrain_lr)),
              ("digits", lambda: digits(out, args.digits_steps, args.lora_rank, args.set))]
    for name, stage in stages:
        stage()
        if name == args.stop_after:
            return say(f"stopped after {name}")
    text = cached(out / "perplexity.json", lambda: measure_text(out, window=255))
    dig = cached(out / "digits_eval.json", lambda: measure_digits(out, args.per_digit, args.guidance))
    print(f"\nfrozen run exported with export-hf == the pretrained LLM, bit for bit: "
          f"{text['frozen export == llm, bit for bit']}\n")
    print(table(out, text, dig, args.guidance))
    print("\nsoftmax over every row of the mmgen model (the LLM's ids + mmgen's appended control rows): "
          + ", ".join(f"{k} {text[k]['full']:.6f}" for k in ("pretrain", *(f"digits-{r}" for r in RUNS))))


if __name__ == "__main__":
    main()
