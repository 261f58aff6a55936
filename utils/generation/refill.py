"""Decoding in a fixed number of rows ("slots") that each take the next (image, prompt) row as soon as its caption
ends: continuous batching within one caption() call (--decode-rows).

In one generate() call every row runs until the batch's longest caption ends. With the paper's five prompts the
captions differ a lot in length (a noun list ends after ~15 tokens, a detailed description runs into the 77-token
limit), so many decode row-steps go to captions that have ended; compacting the batch saved less than it cost, as a
decode step of an 8B model mostly reads the weights (see bench/RESULTS.md). Here the steps stay full: a call's rows
(image-major) decode in `decode_rows` slots; a slot whose caption ended takes the next waiting row.

- Rows join image by image, all the prompts of an image at once, once enough slots are free (`admit_threshold`):
  the images' shared prefixes are prefilled once and each row's own tokens on top (utils/generation/prefill.py),
  which gives every row its first new token. Each image's prefix then goes once into a PrefixPool entry and each
  row's own keys and values into columns 0..width-1 of its slot; decode steps attend to both (cascade attention,
  utils/generation/attention.py), so an image's ~1,900 prefix tokens are stored and read once, not once per prompt.
  Without the sdpa_grouped attention (another --attn-implementation) each slot holds its row's prefix too. One
  prefill takes at most a quarter of the slots' rows (`admit_limit`).
- Every slot writes at its own column (SlotLayer), so a row that joins late starts at column 0 of its slot. The
  mask (slots x columns) holds each row's own columns, and its position ids count its own tokens as generate()
  does: every row sees exactly what it sees alone. The cache has `width + max_new_tokens` columns.
- The loop never waits for the GPU before launching the next step (the GPU would idle while the CPU appends
  tokens): a step's tokens come to the CPU while the next one runs, so a slot whose row ended runs one step more
  before it takes a new row (its token is dropped).
- On the GPU a decode step replays the model's CUDA graph (its DecodeStepGraph, utils/generation/cuda_graphs.py):
  all slot state lives in tensors updated in place, so one recording serves the whole call.
- Tokens are chosen with transformers' own logits processors and warpers (greedy or sampling); min_new_tokens is
  applied per row, as rows start at different steps. Processors that read the generated text (repetition penalty,
  n-gram blocking...) are not supported: shared_prefix.generate() then decodes without refilling.
"""
import contextlib
from itertools import accumulate

import torch
from transformers import (MinPLogitsWarper, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)
from transformers.cache_utils import Cache, StaticLayer

from utils.generation.attention import additive
from utils.generation.cuda_graphs import decode_step_graph
from utils.generation.prefill import prefill_rows, shared_prefix_length
from utils.generation.tensors import HostCopy, to_device_async

# processors that read only the scores, never the tokens so far: the same for a row whatever its slot's history
ROW_INDEPENDENT = (SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                   MinPLogitsWarper)


def logits_processors(model, generate_kwargs):
    """(do_sample, transformers' processors for generate_kwargs as generate() builds them, min_new_tokens left out),
    or None when one of them reads the tokens so far. Uses generate()'s own (private) builders, as pinned in
    requirements.txt, so that defaults such as sampling's top_k=50 come out as in generate()."""
    kwargs = {key: value for key, value in generate_kwargs.items() if key not in ("min_new_tokens", "eos_token_id")}
    config, _ = model._prepare_generation_config(None, **kwargs)
    processors = model._get_logits_processor(config, device=model.device)
    if not all(isinstance(processor, ROW_INDEPENDENT) for processor in processors):
        return None
    return bool(config.do_sample), processors


class MinNewTokens:
    """A row processor: the end tokens are kept out of a row's first `count` new tokens."""

    def __init__(self, count, end_ids, device):
        self.count, self.end_ids = count, torch.tensor(end_ids, device=device)

    def __call__(self, rows, generated, scores):
        too_early = (generated < self.count)[:, None]
        scores[:, self.end_ids] = torch.where(too_early, float("-inf"), scores[:, self.end_ids])
        return scores


class SlotLayer(StaticLayer):
    """One layer of the decode cache: slot s writes its next key and value at column columns[s]."""

    def __init__(self, max_cache_len, columns):
        super().__init__(max_cache_len)
        self.columns = columns
        self.slots = torch.arange(len(columns), device=columns.device)

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys[self.slots, :, self.columns] = key_states[:, :, 0]
        self.values[self.slots, :, self.columns] = value_states[:, :, 0]
        return self.keys, self.values


class PrefixPool:
    """The shared prefixes of the images whose rows are in the slots, each kept once, for cascade attention
    (utils/generation/attention.py): per layer (entries, kv heads, width, head dim) keys and values, written in place
    like the slots. `entry_rows` holds each entry's slots (its image's rows, in order), `row_position` for each slot
    the place of its row among them (entry x rows_per_entry + rank), and `bias` each entry's mask as SDPA's additive
    bias. An entry is freed when its image's last row ends; its keys stay as they were (finite), to be overwritten."""

    def __init__(self, entries, rows_per_entry, width, slots, layers, dtype, device):
        self.width, self.rows_per_entry = width, rows_per_entry
        self.keys, self.values = [None] * layers, [None] * layers
        self.bias = torch.full((entries, 1, 1, width), float("-inf"), dtype=dtype, device=device)
        self.bias[:, :, :, 0] = 0  # an entry never written attends to one key of zeros: finite, and never read
        self.entry_rows = torch.zeros(entries, rows_per_entry, dtype=torch.long, device=device)
        self.row_position = torch.zeros(slots, dtype=torch.long, device=device)
        self.free = list(range(entries))
        self.live = [0] * entries  # rows of each entry's image still in the slots (on the CPU)

    def __repr__(self):  # what DecodeStepGraph's signature compares between steps
        return f"PrefixPool({len(self.live)} x {self.width})"

    def layer(self, index):
        return self.keys[index], self.values[index]

    def place(self, entries, prefilled, first_rows, slots_of_image):
        """Each admitted image's prefix (prefilled: utils/generation/prefill.py's PrefilledRows; first_rows: the
        image's first row among the prefilled ones) into its entry, and its slots into entry_rows."""
        index = to_device_async(torch.tensor(entries), self.bias.device)
        width = prefilled.prefix_width
        for layer, (keys, values) in enumerate(prefilled.prefixes):
            if self.keys[layer] is None:
                shape = (len(self.live), keys.shape[1], self.width, keys.shape[3])
                self.keys[layer], self.values[layer] = keys.new_zeros(shape), values.new_zeros(shape)
            self.keys[layer][index, :, :width] = keys
            self.values[layer][index, :, :width] = values
        mask = prefilled.mask[to_device_async(torch.tensor(first_rows), index.device), :width].bool()
        self.bias.index_fill_(0, index, float("-inf"))
        self.bias[index, 0, 0, :width] = additive(mask, self.bias.dtype)
        rows_of_entry = [slots + slots[:1] * (self.rows_per_entry - len(slots)) for slots in slots_of_image]
        self.entry_rows[index] = to_device_async(torch.tensor(rows_of_entry), index.device)
        slots = [slot for rows in slots_of_image for slot in rows]
        positions = [entry * self.rows_per_entry + rank for entry, rows in zip(entries, slots_of_image)
                     for rank in range(len(rows))]
        self.row_position[to_device_async(torch.tensor(slots), index.device)] = to_device_async(
            torch.tensor(positions), index.device)
        for entry, rows in zip(entries, slots_of_image):
            self.live[entry] = len(rows)

    def release(self, entry):
        """One row of the entry's image ended."""
        self.live[entry] -= 1
        if not self.live[entry]:
            self.free.append(entry)


class Slots:
    """The decode state of `size` slots: GPU tensors written in place (what a decode step's CUDA graph reads),
    and on the CPU the call's row that each slot holds (None: free). With a PrefixPool the slots hold each row's own
    columns and the pool its image's prefix; without, each slot holds its row's prefix too."""

    def __init__(self, model, size, columns, forward, prefixes=None):
        device = model.device
        self.size, self.forward, self.prefixes = size, forward, prefixes  # forward: the model, or its DecodeStepGraph
        self.columns = torch.zeros(size, dtype=torch.long, device=device)  # where each slot writes next
        self.positions = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(size, 1, dtype=torch.long, device=device)  # each slot's last token, fed next
        self.generated = torch.zeros(size, dtype=torch.long, device=device)  # new tokens of the row so far
        self.row_ids = torch.zeros(size, dtype=torch.long, device=device)  # rows held (for row processors)
        # bool: True where a slot's row may attend (a 4D mask goes to the attention as it is)
        self.mask = torch.zeros(size, 1, 1, columns, dtype=torch.bool, device=device)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[SlotLayer(columns, self.columns) for _ in range(layers)])
        self.rows = [None] * size  # the same on the CPU, None where a slot is free

    def free(self):
        return [slot for slot, row in enumerate(self.rows) if row is None]

    def live(self):
        return any(row is not None for row in self.rows)

    def place(self, slots, rows, prefilled, first_tokens):
        """The prefilled rows (utils/generation/prefill.py's PrefilledRows, left-padded to one width) into free slots:
        their own columns only where the prefixes go to a PrefixPool."""
        index = to_device_async(torch.tensor(slots), self.columns.device)
        start = prefilled.prefix_width if self.prefixes is not None else 0
        mask = prefilled.mask[:, start:]
        width = mask.shape[1]
        for layer, source in zip(self.cache.layers, prefilled.cache.layers):
            keys, values = source.keys[:, :, start:], source.values[:, :, start:]
            if not layer.is_initialized:
                layer.lazy_initialization(keys[:1].expand(self.size, -1, -1, -1), values[:1])
            layer.keys[index, :, :width] = keys
            layer.values[index, :, :width] = values
            source.keys = source.values = None  # freed as copied
        # (index_fill_, not `tensor[index] = number`: that copies the number to the GPU and waits for it)
        self.mask.index_fill_(0, index, False)
        self.mask[index, 0, 0, :width] = mask.bool()
        self.columns.index_fill_(0, index, width)
        self.positions[index, 0] = prefilled.mask.sum(-1)  # a row's next position: its real tokens so far
        self.tokens[index, 0] = first_tokens
        self.generated.index_fill_(0, index, 1)
        self.row_ids[index] = to_device_async(torch.tensor(rows), index.device)
        for slot, row in zip(slots, rows):
            self.rows[slot] = row

    def step(self):
        """One decode step of every slot: the logits of each slot's next token."""
        self.mask[:, 0, 0].scatter_(1, self.columns[:, None], True)  # the column this step writes
        prefixes = {} if self.prefixes is None else {"shared_prefixes": self.prefixes}
        output = self.forward(input_ids=self.tokens, attention_mask=self.mask, position_ids=self.positions,
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1, **prefixes)
        # a free slot keeps stepping (its output unread) and must not write past the cache; a row never gets there
        self.columns.add_(1).clamp_(max=self.mask.shape[-1] - 1)
        self.positions += 1
        return output.logits[:, -1]


class RefillDecoder:
    """Decodes the (image, prompt) rows of one caption() call in slots; see the module docstring."""

    def __init__(self, model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows, sampling,
                 end_ids, max_new_tokens, row_processors, graph):
        self.model, self.prompt_ids, self.image_features = model, prompt_ids, image_features
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.do_sample, self.processors = sampling
        self.end_ids, self.max_new_tokens, self.row_processors = set(end_ids), max_new_tokens, row_processors
        self.first_row = list(accumulate(map(len, prompt_ids), initial=0))  # image i's rows: first_row[i:i + 2]
        self.new_tokens = [[] for _ in range(self.first_row[-1])]
        widest = max(map(len, prompt_ids))
        size = min(max(decode_rows, widest), len(self.new_tokens))  # at least one image's rows
        prefix_width, own_width = self.widest_row()
        self.prefixes = None
        if cascades(model) and widest > 1:
            # as many entries as the images of twice the slots' rows when every image keeps all its rows
            entries = min(len(prompt_ids), max(1, -(-2 * size // widest)))
            self.prefixes = PrefixPool(entries, widest, aligned(prefix_width), size,
                                       model.config.get_text_config(decoder=True).num_hidden_layers, model.dtype,
                                       model.device)
        self.entry_of_row = {}
        # a slot holds its row's own columns, and its prefix too without a pool; room for every new token but the
        # last (never fed back), and for the step a row may run after its end
        in_slot = own_width + (0 if self.prefixes else prefix_width)
        self.slots = Slots(model, size, aligned(in_slot + max_new_tokens), graph or model, self.prefixes)
        self.admit_threshold = max(widest, size // 8)  # rows join in groups: one prefill for several images
        # at most this many rows per prefill: when most slots free at once (captions of one length), the prefilled
        # rows' cache, held beside the slots' until copied, stays a quarter of theirs (one prefill for all the free
        # slots nearly filled the GPU's memory, see bench/RESULTS.md)
        self.admit_limit = max(widest, size // 4)
        self.waiting = list(range(len(prompt_ids)))  # images whose rows have not joined yet

    def widest_row(self):
        """(prefix columns, own columns) of the widest prefilled row any group of images can give: the longest shared
        prefix and the longest own part, as utils/generation/prefill.py left-pads them."""
        prefix_lengths = [shared_prefix_length(rows) for rows in self.prompt_ids]
        own = max(len(ids) - length for rows, length in zip(self.prompt_ids, prefix_lengths) for ids in rows)
        return max(prefix_lengths), own

    def run(self):
        """New tokens of every row, image-major, as a (rows, new tokens) tensor padded with pad_token_id."""
        in_flight = []  # tokens on their way to the CPU, oldest first
        while self.waiting or self.slots.live():
            free = self.slots.free()
            while self.waiting and (len(free) >= self.admit_threshold or len(free) == self.slots.size) and (
                    self.prefixes is None or self.prefixes.free):
                in_flight.append(self.admit(free[:self.admit_limit]))
                free = self.slots.free()
            if self.slots.live():
                in_flight.append(self.step())
            for tokens in in_flight[:-1]:  # all but the step just launched, which runs meanwhile
                self.record(tokens)
            in_flight = in_flight[-1:]
        width = max(map(len, self.new_tokens))
        return torch.tensor([tokens + [self.pad_token_id] * (width - len(tokens)) for tokens in self.new_tokens])

    def step(self):
        """Launch one decode step of every slot; returns its tokens in flight to the CPU. The loop reads them only
        after launching the next step, so that the GPU does not wait for the CPU between two steps: a row that
        ended is seen a step late, and its slot runs that step for nothing."""
        rows = list(self.slots.rows)
        tokens = self.choose(self.slots.step(), self.slots.row_ids, self.slots.generated)
        self.slots.tokens[:, 0] = tokens
        self.slots.generated += 1
        return TokensInFlight(range(self.slots.size), rows, tokens)

    def admit(self, free):
        """Prefill the next waiting images whose rows fit in the free slots (and in the PrefixPool's free entries)
        and place them there; returns their first tokens in flight to the CPU."""
        images = []
        room = len(self.prefixes.free) if self.prefixes is not None else len(self.waiting)
        while self.waiting and len(images) < room and \
                sum(len(self.prompt_ids[i]) for i in images + self.waiting[:1]) <= len(free):
            images.append(self.waiting.pop(0))
        rows = [row for i in images for row in range(self.first_row[i], self.first_row[i + 1])]
        prefilled = prefill_rows(self.model, [self.prompt_ids[i] for i in images],
                                 [self.image_features[i] for i in images], self.image_token_id, self.pad_token_id)
        row_index = to_device_async(torch.tensor(rows), prefilled.logits.device)
        first_tokens = self.choose(prefilled.logits, row_index, torch.zeros_like(row_index))
        slots = free[:len(rows)]
        if self.prefixes is not None:
            entries = self.prefixes.free[:len(images)]
            del self.prefixes.free[:len(images)]
            first_rows = list(accumulate((len(self.prompt_ids[i]) for i in images), initial=0))
            slots_of_image = [slots[start:end] for start, end in zip(first_rows, first_rows[1:])]
            self.prefixes.place(entries, prefilled, first_rows[:-1], slots_of_image)
            for entry, image in zip(entries, images):
                rows_of_image = range(self.first_row[image], self.first_row[image + 1])
                self.entry_of_row.update((row, entry) for row in rows_of_image)
        self.slots.place(slots, rows, prefilled, first_tokens)
        return TokensInFlight(slots, rows, first_tokens)

    def choose(self, logits, rows, generated):
        """The next token of each row, from its logits; rows: the call's row of each, generated: its new tokens so
        far."""
        scores = logits.float()  # as generate(): processors work in float32
        for processor in self.row_processors:
            scores = processor(rows, generated, scores)
        scores = self.processors(None, scores)  # the processors used read only the scores
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(-1)

    def record(self, in_flight):
        """Append each slot's new token to the row the slot held when the token was chosen, unless that row has
        ended since; a row that ends (end token, or max_new_tokens reached) frees its slot."""
        for slot, row, token in zip(in_flight.slots, in_flight.rows, in_flight.tokens()):
            if row is None or self.slots.rows[slot] != row:  # a free slot, or a row that ended a step earlier
                continue
            self.new_tokens[row].append(token)
            if token in self.end_ids or len(self.new_tokens[row]) == self.max_new_tokens:
                self.slots.rows[slot] = None
                if self.prefixes is not None:
                    self.prefixes.release(self.entry_of_row.pop(row))


def cascades(model):
    """Whether decode steps can read the prefixes from a PrefixPool: the sdpa_grouped attention has the cascade."""
    return model.config.get_text_config(decoder=True)._attn_implementation == "sdpa_grouped"


def aligned(columns):
    """Columns rounded up to a multiple of 16: the GPU attention kernel's alignment for its bias."""
    return -(-columns // 16) * 16


class TokensInFlight:
    """Tokens on their way to the CPU (a copy that does not wait for the GPU), and for each the slot and the row it
    held when the token was chosen."""

    def __init__(self, slots, rows, tokens):
        self.slots, self.rows, self.copy = slots, rows, HostCopy(tokens)

    def tokens(self):
        return self.copy.result().tolist()


def generate(model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows, sampling,
             eos_token_id, max_new_tokens, min_new_tokens=None, row_processors=()):
    """New tokens of every (image, prompt) row, image-major, as shared_prefix.generate() gives them, decoded in
    `decode_rows` slots that are refilled as captions end. sampling: logits_processors()'s answer."""
    end_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    row_processors = list(row_processors)
    if min_new_tokens:
        row_processors.insert(0, MinNewTokens(min_new_tokens, end_ids, model.device))
    graph = decode_step_graph(model)
    with graph.for_one_call() if graph else contextlib.nullcontext():  # one recording for this call's slots
        return RefillDecoder(model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows, sampling,
                             end_ids, max_new_tokens, row_processors, graph).run()
