"""Train the speech default's bridge (issue 18): the projector from Whisper tiny.en's frames
into SmolLM2's input space, for content, so the language model can repeat what it heard.

    python -m casa_cli.speech_bridge --out build/speech-bridge [--minutes 25]

Speech: every text is spoken by espeak-ng in several voices, accents, speeds and pitches
(`TRAIN_VOICES`); some voices and whole text sources are kept out for testing
(`TEST_VOICES`: held-out voices speaking prompts of the held-out sources). The encoder is
frozen, so each clip's frames (what the assembled model's audio tower gives, exactly as at
inference) are computed once and cached. Only the projector (a linear map, 384 -> 576) learns,
in two stages. First CTC (`ctc_pretrain`): the projected frames are scored against the
language model's own input embeddings of the training transcripts' tokens, so each frame
moves towards the embedding of the token being spoken; cheap, as the language model does not
run. Then the frozen language model runs with the projected frames in place of the audio
placeholder: cross-entropy on the transcript after "Repeat exactly what you heard." Reported: word error rate on held-out speech, and the model's answer to a spoken
"What is the capital of France?" in a held-out voice.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from casa_cli.speech_model import AUDIO_MARKERS

TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029"]
TRAIN_VARIANTS = ["", "+m3", "+f2", "+f4", "+m7"]
TEST_VOICES = ["en-us-nyc", "en-gb-x-gbcwmd"]
TEST_VARIANTS = ["+f1", "+m2"]
REPEAT = "Repeat exactly what you heard."
CTC_BLANK = "<empty_output>"  # a SmolLM2 special token no transcript contains
SAMPLE_RATE = 16000


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of `text`, read as casa reads any audio file (`load_audio`:
    16 kHz mono float32), so training sees what inference will."""
    from casa_cli.inputs import load_audio
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                        f.name, "--", text], check=True, capture_output=True)
        return load_audio(Path(f.name), SAMPLE_RATE, max_seconds=None)


def tower_frames(model, processor, audio: np.ndarray) -> torch.Tensor:
    """(frames, d_audio): the audio tower's output for one clip, as the model's own forward
    computes it (mask from the clip's length, frames past it dropped)."""
    from transformers.masking_utils import create_bidirectional_mask
    features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE,
                                           return_attention_mask=True, padding="max_length",
                                           return_tensors="pt")
    tower = model.model.audio_tower
    feat_len, out_len = tower._get_feat_extract_output_lengths(
        features["attention_mask"].sum(-1))
    frames = (features["input_features"].shape[-1] - 2) // 2 + 1
    keep = (torch.arange(frames)[None] < feat_len[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config,
                                     inputs_embeds=torch.zeros(1, frames, 1),
                                     attention_mask=keep)
    with torch.no_grad():
        out = tower(features["input_features"], attention_mask=mask).last_hidden_state
    return out[0, :int(out_len[0])].contiguous()


def clips(texts: list[str], voices: list[str], variants: list[str], seed: int) -> list[dict]:
    """One clip per text, voice/variant/speed/pitch drawn per clip."""
    rng = random.Random(seed)
    return [{"text": t, "voice": rng.choice(voices) + rng.choice(variants),
             "speed": rng.randint(130, 190), "pitch": rng.randint(30, 70)} for t in texts]


def cached_frames(model, processor, clip: dict, cache: Path) -> torch.Tensor:
    from safetensors.torch import load_file, save_file
    key = hashlib.sha256(json.dumps(clip, sort_keys=True).encode()).hexdigest()[:20]
    path = cache / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["frames"]
    frames = tower_frames(model, processor, speak(clip["text"], clip["voice"], clip["speed"],
                                                  clip["pitch"]))
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"frames": frames}, str(path))
    return frames


def prompt_pieces(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat up to the audio placeholder and after it (through the
    assistant's turn), so n frames can be spliced in as n placeholder positions."""
    parts = [{"type": "audio", "audio": "clip"}, {"type": "text", "text": instruction}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(AUDIO_MARKERS[1])
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after)


def spliced_embeddings(model, pieces, frames: torch.Tensor, answer_ids: list[int]):
    """(embeddings, labels) of one example: text embeddings around the projected frames, the
    answer's ids as labels (-100 elsewhere)."""
    embed = model.model.language_model.embed_tokens
    before, after = pieces
    audio = model.model.multi_modal_projector(frames)
    ids = torch.tensor(before), torch.tensor(after + answer_ids)
    x = torch.cat([embed(ids[0]), audio.to(embed.weight.dtype), embed(ids[1])])
    labels = torch.full((x.shape[0],), -100)
    if answer_ids:
        labels[-len(answer_ids):] = torch.tensor(answer_ids)
    return x, labels


def batch_loss(model, examples) -> torch.Tensor:
    """Mean next-token cross-entropy on the answers of a right-padded batch."""
    xs, ys = zip(*examples)
    n = max(x.shape[0] for x in xs)
    x = torch.stack([F.pad(e, (0, 0, 0, n - e.shape[0])) for e in xs])
    y = torch.stack([F.pad(t, (0, n - t.shape[0]), value=-100) for t in ys])
    mask = torch.stack([torch.arange(n) < e.shape[0] for e in xs]).long()
    hidden = model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                           ignore_index=-100)


def greedy(model, pieces, frames, max_new_tokens: int, eos: int) -> list[int]:
    """Greedy answer to the spliced prompt, one new token a step on the KV cache."""
    x, _ = spliced_embeddings(model, pieces, frames, [])
    out: list[int] = []
    embed, lm = model.model.language_model.embed_tokens, model.model.language_model
    with torch.no_grad():
        step = lm(inputs_embeds=x[None], use_cache=True)
        for _ in range(max_new_tokens):
            token = int(model.lm_head(step.last_hidden_state[0, -1]).argmax())
            if token == eos:
                break
            out.append(token)
            step = lm(inputs_embeds=embed(torch.tensor([[token]])),
                      past_key_values=step.past_key_values, use_cache=True)
    return out


def ctc_pretrain(projector, embeddings: torch.Tensor, frames: list[torch.Tensor],
                 targets: list[list[int]], blank: int, minutes: float, batch_size: int = 16,
                 lr: float = 2e-3, seed: int = 0) -> tuple[list[int], int]:
    """CTC of projected frames against `embeddings` rows of the targets' own tokens (and the
    blank): a few thousand classes, not the whole vocabulary, which is what makes it cheap.
    Returns (the vocabulary, as token ids; the steps run)."""
    vocab = sorted({t for ids in targets for t in ids} | {blank})
    index = {t: i for i, t in enumerate(vocab)}
    rows = embeddings[vocab].detach()
    scale = 10 / rows.shape[1] ** 0.5  # logits of a useful spread from the first step
    labels = [torch.tensor([index[t] for t in ids]) for ids in targets]
    optimiser = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    rng, order, steps, start = random.Random(seed), list(range(len(frames))), 0, time.time()
    while time.time() - start < minutes * 60:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            logp = [F.log_softmax(projector(frames[j]) @ rows.T * scale, -1) for j in chunk]
            n = max(x.shape[0] for x in logp)
            stacked = torch.stack([F.pad(x, (0, 0, 0, n - x.shape[0])) for x in logp])
            loss = F.ctc_loss(stacked.transpose(0, 1), torch.cat([labels[j] for j in chunk]),
                              torch.tensor([frames[j].shape[0] for j in chunk]),
                              torch.tensor([len(labels[j]) for j in chunk]),
                              blank=index[blank], zero_infinity=True)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            if steps % 200 == 0:
                print(f"ctc step {steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            if time.time() - start >= minutes * 60:
                break
    return vocab, steps


def ctc_greedy(projector, embeddings: torch.Tensor, vocab: list[int], blank: int,
               frames: torch.Tensor) -> list[int]:
    """Best class per frame, repeats merged, blanks dropped: token ids."""
    with torch.no_grad():
        best = (projector(frames) @ embeddings[vocab].T).argmax(-1).tolist()
    return collapse([vocab[i] for i in best], blank)


def collapse(ids: list[int], blank: int) -> list[int]:
    """CTC's reading of a frame sequence: runs merged into one, then blanks removed."""
    return [t for k, t in enumerate(ids) if t != blank and (k == 0 or ids[k - 1] != t)]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance / reference words (lowercase, punctuation dropped)."""
    ref, hyp = (re.findall(r"[a-z0-9']+", s.lower()) for s in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def texts_by_split(max_words: int = 16) -> tuple[list[str], list[str]]:
    """Training texts (the built-in train split's prompts) and held-out texts (the held-out
    sources' prompts), short enough to speak in a few seconds."""
    from casa_cli.data.assemble import builtin_splits, read_jsonl
    splits = builtin_splits()
    short = lambda rs: sorted({r["text"] for r in rs  # noqa: E731
                               if len(r["text"].split()) <= max_words and r["text"].isascii()})
    return short(read_jsonl(splits["train"])), short(read_jsonl(splits["test_ordinary"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ctc-minutes", type=float, default=8.0,
                        help="stage 1 (CTC) time budget")
    parser.add_argument("--minutes", type=float, default=25.0,
                        help="stage 2 (transcript through the language model) time budget")
    parser.add_argument("--train-clips", type=int, default=1500)
    parser.add_argument("--test-clips", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    from casa_cli.cache import cache_dir
    from casa_cli.speech_model import assemble_speech_model
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    torch.manual_seed(0)
    t0 = time.time()
    assembled = cache_dir() / "speech-bridge" / "untrained"
    if not (assembled / "config.json").is_file():
        assemble_speech_model(assembled)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(assembled).eval()
    processor = AutoProcessor.from_pretrained(assembled)
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector.linear
    projector.weight.requires_grad_(True)
    projector.bias.requires_grad_(True)
    with torch.no_grad():  # a small random start: zeros give every frame the same embedding
        projector.weight.normal_(0, 0.02)
    tok = processor.tokenizer
    train_texts, test_texts = texts_by_split()
    rng = random.Random(0)
    rng.shuffle(train_texts)
    rng.shuffle(test_texts)
    cache = cache_dir() / "speech-bridge" / "frames"
    train = clips(train_texts[:args.train_clips], TRAIN_VOICES, TRAIN_VARIANTS, seed=1)
    test = clips(test_texts[:args.test_clips], TEST_VOICES, TEST_VARIANTS, seed=2)
    frames = [cached_frames(model, processor, c, cache) for c in train + test]
    print(f"{len(train)} training and {len(test)} test clips ({time.time() - t0:.0f} s)",
          file=sys.stderr)
    pieces = prompt_pieces(tok, REPEAT)
    answers = [tok(c["text"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
               for c in train]
    embeddings = model.model.language_model.embed_tokens.weight
    blank = tok.convert_tokens_to_ids(CTC_BLANK)
    spoken = [tok(" " + c["text"], add_special_tokens=False)["input_ids"] for c in train]
    vocab, ctc_steps = ctc_pretrain(projector, embeddings, frames[:len(train)], spoken, blank,
                                    args.ctc_minutes)
    ctc_wer = float(np.mean([word_error_rate(c["text"], tok.decode(ctc_greedy(
        projector, embeddings, vocab, blank, f))) for c, f in zip(test, frames[len(train):])]))
    print(f"ctc: {ctc_steps} steps, held-out WER {ctc_wer:.3f} ({time.time() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    optimiser = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    order, step, history, start = list(range(len(train))), 0, [], time.time()
    while time.time() - start < args.minutes * 60:
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            batch = [spliced_embeddings(model, pieces, frames[j], answers[j])
                     for j in order[i:i + args.batch_size]]
            loss = batch_loss(model, batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            history.append(loss.item())
            if step % 20 == 0:
                print(f"step {step}: loss {np.mean(history[-20:]):.3f} "
                      f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
            if time.time() - start >= args.minutes * 60:
                break
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for c, f in zip(test, frames[len(train):]):
        heard = tok.decode(greedy(model, pieces, f, 40, eos))
        rows.append({**c, "heard": heard, "wer": word_error_rate(c["text"], heard)})
    question = {"text": "What is the capital of France?", "voice": TEST_VOICES[0] + "+f1",
                "speed": 160, "pitch": 50}
    answer = tok.decode(greedy(model, prompt_pieces(tok, "Answer the question."),
                               cached_frames(model, processor, question, cache), 40, eos))
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()},
              str(args.out / "projector.safetensors"))
    summary = {"ctc_steps": ctc_steps, "ctc_vocabulary": len(vocab), "ctc_wer": ctc_wer,
               "steps": step, "final_loss": float(np.mean(history[-20:])) if history else None,
               "wer": float(np.mean([r["wer"] for r in rows])) if rows else None,
               "capital_answer": answer,
               "train_clips": len(train), "test_clips": len(test),
               "seconds": round(time.time() - t0)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(args.out / "heldout.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
