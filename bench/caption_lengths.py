"""Realistic caption lengths for bench/throughput.py (--lengths realistic).

By default every benchmark caption is exactly --new-tokens long (min = max), so every variant does the same
work. Real captions end at the end token, and how soon depends on the prompt: a list of nouns after about 15
tokens, a detailed description usually runs into the 77-token limit. In a static batch, rows that have ended
still go through every decode step until the longest row of the batch ends; this mode measures how much of the
decoding that is.

Each (image, prompt) gets a caption length drawn from its prompt's distribution below. `EndAtLength`, a
transformers LogitsProcessor passed to generate(), keeps the end token out before that length and forces it
there, so generate()'s own loop, its stopping and the CUDA graphs of the decode steps run as in production.
The draw is seeded by a fingerprint of the image's prepared pixels and by the prompt key: the seed's loop and
ours caption every (image, prompt) with the same length, whatever the batch or the order.

Distributions, in caption tokens before the end token: a normal distribution, rounded, at least `shortest`;
a draw at or past --new-tokens makes a truncated caption (no end token). There are no real weights here, so
these are assumptions from what the models write for these prompts (about 1.3 tokens per English word); replace
them with a histogram of a real run's captions when one exists:
  noun       "few noun words separated by ','": 8-12 words and commas, ~15 tokens      N(15, 5), >= 3
  short      "just a few words": 3-10 words                                             N(10, 4), >= 2
  sentence   one sentence of 12-25 words                                                N(22, 6), >= 6
  main, background
             a few sentences about one part of the image                                N(50, 18), >= 10
  style      a few sentences about style and feeling                                    N(45, 15), >= 10
  detail, default (Qwen2-VL, LLaVA-1.5, MiniGPT-4: "describe ... in detail")
             detailed descriptions run 100-250 tokens: ~80% reach the 77 limit         N(110, 40), >= 20
"""
import hashlib
from collections import Counter, defaultdict

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

COUNTS = ("generate_calls", "decode_steps", "row_steps", "finished_row_steps", "off_length")
DETAIL = (110, 40, 20)
DISTRIBUTIONS = {  # prompt key -> (mean, standard deviation, shortest) in tokens
    "noun": (15, 5, 3),
    "short": (10, 4, 2),
    "sentence": (22, 6, 6),
    "main": (50, 18, 10),
    "background": (50, 18, 10),
    "style": (45, 15, 10),
    "detail": DETAIL,
    "default": DETAIL,
}


def fingerprint(prepared):
    """A few bytes that identify a prepared image: a hash of up to 4,096 evenly spaced values of its first tensor
    (the loop's workers and the seed's loop prepare an image into the same values)."""
    tensor = prepared if isinstance(prepared, torch.Tensor) else next(
        value for value in prepared if isinstance(value, torch.Tensor))
    values = tensor.reshape(-1)
    sample = values[::max(1, values.numel() // 4096)][:4096]
    return hashlib.sha1(sample.float().numpy().tobytes()).digest()[:8]


class EndAtLength(LogitsProcessor):
    """Row r ends after lengths[r] new tokens: its end tokens are kept out before, then the first is forced.
    A length at or past max_new_tokens is never forced (a truncated caption). Runs on the GPU without reading
    anything back: the rows that end at each step are known in advance."""

    def __init__(self, lengths, end_ids, device):
        self.lengths = torch.tensor(lengths, device=device)
        self.end_ids = torch.tensor(end_ids, device=device)
        rows_by_length = defaultdict(list)
        for row, length in enumerate(lengths):
            rows_by_length[length].append(row)
        self.rows_ending = {length: torch.tensor(rows, device=device) for length, rows in rows_by_length.items()}
        self.start = None  # input_ids' length at the first call: the prompt (or 0 when generating from embeddings)

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start  # new tokens so far
        not_yet = (self.lengths > step)[:, None]
        scores[:, self.end_ids] = torch.where(not_yet, float("-inf"), scores[:, self.end_ids])
        ending = self.rows_ending.get(step)
        if ending is not None:
            scores.index_fill_(0, ending, float("-inf"))
            scores[ending, self.end_ids[0]] = 0.0
        return scores


class EndAtRowLength:
    """EndAtLength for utils/generation/refill.py, whose slots hold rows at different steps: a row processor (rows: the
    call's row each slot holds, generated: its new tokens so far) over the lengths of the call's rows. Like the
    refill loop, it never waits for the GPU (the forced end token's index is a number, not a GPU tensor)."""

    def __init__(self, lengths, end_ids, device):
        self.lengths = torch.tensor(lengths, device=device)
        self.end_ids = torch.tensor(end_ids, device=device)
        self.first_end_id = end_ids[0]

    def __call__(self, rows, generated, scores):
        lengths = self.lengths[rows]
        scores[:, self.end_ids] = torch.where((lengths > generated)[:, None], float("-inf"), scores[:, self.end_ids])
        ending = (lengths == generated)[:, None]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.first_end_id] = 0.0
        return torch.where(ending, forced, scores)


class CaptionLengths:
    """Draws the lengths of each caption() call's rows, hands them to its generate() calls, and counts, over a
    benchmark row, the decode steps spent on rows that had already ended."""

    def __init__(self, prompt_keys, max_new_tokens, seed):
        self.prompt_keys = prompt_keys  # prompt text -> preset key
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.planned = []  # row lengths of the generate() calls still to come in this caption() call
        self.reset()

    def reset(self):
        self.drawn = set()  # (fingerprint, prompt key, length): the same for the seed's loop and ours
        self.by_prompt = defaultdict(list)
        self.counts = Counter()

    def draw(self, image_print, key):
        mean, deviation, shortest = DISTRIBUTIONS[key]
        digest = hashlib.sha1(image_print + key.encode()).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])
        return max(shortest, int(round(rng.normal(mean, deviation))))

    def plan(self, images, prompts):
        """Lengths for the rows of one caption(images, prompts), in the order its generate() call takes them:
        image by image with all its prompts."""
        keys = [self.prompt_keys[prompt] for prompt in prompts]
        prints = [fingerprint(image) for image in images]
        lengths = [[self.draw(image_print, key) for key in keys] for image_print in prints]
        for image_print, row in zip(prints, lengths):
            for key, length in zip(keys, row):
                self.drawn.add((image_print, key, length))
                self.by_prompt[key].append(length)
        self.planned = [[length for row in lengths for length in row]]

    def generate(self, generate, module, *args, **kwargs):
        """module's generate(), the next planned lengths forced by an EndAtLength after any logits processors the
        caller passes; the new tokens are counted."""
        inputs = kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]
        end = kwargs.get("eos_token_id", module.generation_config.eos_token_id)
        end_ids = end if isinstance(end, list) else [end]
        lengths = self.planned.pop(0)
        assert len(lengths) == len(inputs), (len(lengths), len(inputs))
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                          EndAtLength(lengths, end_ids, inputs.device)])
        output = generate(module, *args, **kwargs)
        # generate() returns the prompt's ids before the new ones when it was given ids, only the new ones otherwise
        new_tokens = output[:, kwargs["input_ids"].shape[1]:] if "input_ids" in kwargs else output
        self.count(new_tokens.cpu(), end_ids, lengths)
        return output

    def refill(self, generate, steps, *args, **kwargs):
        """utils/generation/refill.py's generate(), the next planned lengths forced per row; steps: a Counter of its
        decode steps and slot-steps so far (bench/throughput.py counts them). A slot-step without a live row counts as
        finished."""
        end = kwargs["eos_token_id"]
        end_ids = end if isinstance(end, list) else [end]
        lengths = self.planned.pop(0)
        kwargs["row_processors"] = [*kwargs.get("row_processors", ()), EndAtRowLength(lengths, end_ids, args[0].device)]
        before = steps.copy()
        output = generate(*args, **kwargs)
        self.count(output, end_ids, lengths, steps["steps"] - before["steps"],
                   steps["slot_steps"] - before["slot_steps"])
        return output

    def count(self, new_tokens, end_ids, lengths, decode_steps=None, row_steps=None):
        """One generate() call's new tokens (rows x steps, on the CPU): where each row ended, and the decode
        forwards that ran for rows that had already ended. A refill call gives its decode steps and slots: each
        slot-step without a live row (the first token of a row comes from its prefill) counts as finished."""
        rows, steps = new_tokens.shape
        is_end = torch.isin(new_tokens, torch.tensor(end_ids))
        live = torch.where(is_end.any(1), is_end.int().argmax(1) + 1, steps)  # tokens up to its end token
        expected = torch.tensor(lengths).add(1).clamp(max=self.max_new_tokens)
        if decode_steps is None:
            decode_steps, row_steps = steps - 1, rows * (steps - 1)
        finished = row_steps - int((live - 1).sum())  # a row's first token comes from its prefill
        self.counts.update(generate_calls=1, decode_steps=decode_steps, row_steps=row_steps,
                           finished_row_steps=finished, off_length=int((live != expected).sum()))

    def summary(self):
        counts = self.counts
        per_prompt = {key: dict(captions=len(lengths),
                                mean_tokens=round(float(np.minimum(lengths, self.max_new_tokens).mean()), 1),
                                truncated=round(float(np.mean(np.array(lengths) >= self.max_new_tokens)), 3))
                      for key, lengths in self.by_prompt.items()}
        digest = hashlib.sha1(repr(sorted(self.drawn)).encode()).hexdigest()[:12]
        finished = counts["finished_row_steps"] / max(counts["row_steps"], 1)
        return dict({key: counts[key] for key in COUNTS}, finished_fraction=round(finished, 4), per_prompt=per_prompt,
                    lengths_digest=digest)
