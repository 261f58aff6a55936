"""The captioning loop that every model script shares.

A model script (qwen.py, internvl.py, llava.py, minigpt4.py) defines one class and ends with
``run(TheCaptioner)``. The class holds everything specific to that model; this module holds the
rest: command line, rank/world size from the environment, reading and sharding the input (JSON, tar
shards or Parquet: utils/inputs.py), skipping what is already done, loading images in worker processes
(utils/loader.py), batching, writing (utils/writer.py), progress, signals. The data flows one way:
input reader (read_shard, plan_work) -> image workers (prepared_windows) -> batcher (utils/batcher.py, on a
second thread) -> model (BatchCaptioner) -> writer (ShardWriter).

The contract a captioner class fulfils:

    name: str              output folder name and generate.sh model name, e.g. "qwen"
    default_model: str     hub id or folder used when --model is not given
    prompts: dict          preset key -> prompt text
    default_prompt: str    key of the preset used when --prompt/--prompts are not given
    defaults: dict         parser defaults that differ per model, e.g. {"batch_size": 3,
                           "temperature": 0.2}; keys are argparse dests
    default_dtype: str     dtype on CUDA when --dtype is auto ("bfloat16", "float16"); CPU uses float32

    @staticmethod
    add_arguments(parser)  model-specific flags (optional)

    __init__(self, args, device)
                           load model and processor onto `device`
    prepare                a picklable callable PIL.Image -> prepared image; runs in the
                           DataLoader worker processes. The image it gets is fully decoded but in
                           its original mode (convert it as the model's reference code does).
    caption(self, images, prompts) -> list[list[Caption]]
                           images: list of `prepare` results; prompts: list of prompt texts.
                           Returns result[i][j] for image i and prompt j, a Caption(text,
                           truncated) where truncated means generation stopped at
                           --max-new-tokens without reaching the end token. A batch that
                           runs out of CUDA memory is split in halves and retried by the loop.
    inputs(self, images, prompts) -> anything
                           optional: the batch's CPU work (token ids, masks, positions as CPU
                           tensors; no GPU), which the loop then makes on its second thread while
                           the GPU runs the batch before, and passes on as caption(images, prompts,
                           inputs)
    checkpoint_name(args) -> str
                           optional static method: the output folder name of the checkpoint
                           (default: the last part of --model)
    unread_in_decode: tuple
                           optional: generate() kwargs that grow at every decode step but that the
                           model's decode step does not read; left out so that decode steps can be
                           CUDA graphs (utils/cuda_graphs.py)
    cost(self, prepared) -> number
                           optional: the prompt length an image gives, roughly; the loop sorts
                           --sort-window batches by it so that batches pad less.
    caption_flags: tuple   optional: argparse dests of the class's own flags that change captions
                           (e.g. ("max_pixels",)); they go into the run record (utils/run_record.py)
    refills_rows: bool     optional: the class passes --decode-rows (args.decode_rows) to utils/shared_prefix.py's
                           generate(), which then refills rows as captions end (utils/refill.py)
    model_on_hub: bool     optional, default True: --model may be a Hugging Face hub id, checked before
                           the model loads; False where --model is a local file the class checks itself

Parsing, --help, --check-input and the checks of the checkpoint, the input and the output folders import
neither torch nor transformers (model scripts import them inside the functions that need them), so that
mistakes are reported at once.
"""
import argparse
import functools
import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from utils.batcher import Batch, Batcher, OnSecondThread
from utils.checkpoints import checkpoint_identity
from utils.errors import UserError
from utils.inputs import check_inputs, expand_inputs, iter_samples
from utils.loader import prepared_windows
from utils.records import RecordError, iter_records
from utils.run_record import check_records, is_used, output_folders, run_settings, settle_records
from utils.writer import OUT_OF_MEMORY, ShardWriter, recorded_images

# Batches differ in shape (and each generate() allocates its KV cache for the batch): let the CUDA allocator grow
# segments instead of fragmenting into blocks that no later batch fits. Read when CUDA is first used.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


class Caption(NamedTuple):
    text: str
    truncated: bool


def inference_mode(method):
    """torch.inference_mode() for a method, importing torch when the method first runs, not when its module
    is imported."""
    @functools.wraps(method)
    def without_autograd(*args, **kwargs):
        import torch
        with torch.inference_mode():
            return method(*args, **kwargs)
    return without_autograd


# Output line fields written by the loop; input keys of the same name are kept as "input_<key>".
OUTPUT_FIELDS = ("image", "caption", "model", "prompt", "truncated")


def build_parser(captioner):
    parser = argparse.ArgumentParser(
        prog=f"{captioner.name}.py",
        description=f"Caption the images of an input file with {captioner.name} "
        f"(one shard per process when launched by generate.sh or SLURM; see README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--input-json", required=True, metavar="INPUT", help='images to caption: a JSON array [{"image": path}, '
        '...] or JSONL with one such object per line (other keys are copied to the output); webdataset tar shards '
        "(a .tar file, a folder of them, or a pattern such as data/{00000..01242}.tar); or Parquet (a .parquet "
        "file or a folder of them)")
    add("--image-root", help="folder that relative image paths and image ids are resolved against (default: the "
        "input file's folder, or the folder holding the shards or Parquet files)")
    add("--output-dir", default="outputs", help="where <model>/<checkpoint>/<prompt>/captions-*.jsonl go")
    add("--model", default=captioner.default_model, help="checkpoint: hub id or local folder")
    add("--prompt", action="append", metavar="KEY_OR_TEXT",
        help=f"prompt preset key ({', '.join(captioner.prompts)}) or free text; repeat for several prompts "
        f"(default: {captioner.default_prompt})")
    add("--prompts", metavar="KEY,KEY", help="several preset keys, comma-separated: every image is read once and "
        "captioned with each; one output per prompt")
    add("--batch-size", type=int, default=8, help="images per generate() call")
    add("--max-new-tokens", type=int, default=77, help="longest caption in tokens (the seed's 77)")
    add("--min-new-tokens", type=int, default=None, help="shortest caption in tokens (benchmarks set it equal to "
        "--max-new-tokens so that every run does the same work)")
    add("--temperature", type=float, default=None, help="0 for greedy decoding; >0 samples "
        "(default: the model's own default, see README)")
    add("--top-p", type=float, default=None, help="nucleus sampling threshold (default: the model's own)")
    add("--num-beams", type=int, default=1, help="beam search width")
    add("--seed", type=int, default=0, help="random seed for sampling (each process adds its rank)")
    add("--num-workers", type=int, default=4, help="image loading and preprocessing processes per GPU process")
    add("--sort-window", type=int, default=4, metavar="N", help="read N batches ahead and sort them by prompt "
        "length, so that each batch pads less (1: input order)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help=f"weights and activations; auto: {captioner.default_dtype} on GPU, float32 on CPU")
    add("--attn-implementation", default="sdpa_grouped", choices=["sdpa_grouped", "sdpa", "eager", "flash_attention_2"],
        help="attention kernel: sdpa_grouped is PyTorch SDPA that decodes grouped-query heads without copying the "
        "KV cache (utils/attention.py); flash_attention_2 needs the flash-attn package")
    add("--no-cuda-graphs", action="store_true", help="decode eagerly; by default, on a GPU, decode steps replay a "
        "CUDA graph (utils/cuda_graphs.py), recorded once per batch shape, which gives the same tokens faster")
    add("--no-compile", action="store_true", help="run the prefill eagerly; by default, on a GPU, the RMSNorms and "
        "MLPs run compiled with torch.compile in the prefill (utils/compiled_prefill.py): fused elementwise kernels, "
        "5-11%% more images/s, seconds of compiling in the first batches (tens of seconds while inductor's on-disk "
        "cache is empty)")
    add("--limit", type=int, default=None, metavar="N", help="caption only the first N entries of the input")
    add("--numgpus", type=int, default=None, help="the seed's flag, kept for compatibility: must equal the "
        "number of processes (WORLD_SIZE or SLURM_NTASKS)")
    add("--overwrite", action="store_true", help="delete this model/prompt's earlier outputs and their run records "
        "and start afresh (default: resume, skipping what is done, when the run record matches)")
    add("--check-input", action="store_true", help="only check the flags, the input file, the checkpoint, the "
        "output folders and their run records, then exit (generate.sh does this once before it starts several "
        "processes)")
    add("--retry-errors", action="store_true", help="try again images that an earlier run recorded as unreadable")
    if getattr(captioner, "refills_rows", False):
        add("--decode-rows", type=int, default=None, metavar="N", help="decode each batch's (image, prompt) rows in "
            "N rows that each take the next waiting row as soon as its caption ends (utils/refill.py); pays when "
            "captions differ in length, as with several prompts: then give --batch-size several times N / prompts. "
            "The same greedy captions. Needs --attn-implementation sdpa_grouped or sdpa (default: all rows of a "
            "batch decode together until the longest caption ends)")
    if hasattr(captioner, "add_arguments"):
        captioner.add_arguments(parser)
    parser.set_defaults(**captioner.defaults)
    return parser


def distributed_env():
    """(rank, world size, local rank) from generate.sh's launcher (utils/launch.py, torchrun's variable names) or
    SLURM's; (0, 1, 0) when neither."""
    for rank_var, world_var, local_var in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var]), int(os.environ.get(local_var, 0))
    return 0, 1, 0


def resolve_prompts(args, captioner):
    """Ordered {key: text}. Free-text prompts get a key derived from their text, so reruns resume."""
    requested = list(args.prompt or [])
    if args.prompts:
        keys = [key.strip() for key in args.prompts.split(",") if key.strip()]
        for key in keys:
            if key not in captioner.prompts:
                raise UserError(f"--prompts: unknown preset {key!r} (presets: {', '.join(captioner.prompts)})")
        requested += keys
    if not requested:
        requested = [captioner.default_prompt]
    prompts = {}
    for item in requested:
        if item in captioner.prompts:
            prompts[item] = captioner.prompts[item]
        else:
            prompts["custom-" + hashlib.sha1(item.encode()).hexdigest()[:8]] = item
    return prompts


def shard_bounds(total, rank, world):
    """The seed's split: rank r takes the r-th contiguous slice, the last rank also the remainder."""
    size = total // world
    return rank * size, total if rank == world - 1 else (rank + 1) * size


def read_shard(path, rank, world, limit, image_root=None):
    """This rank's slice of the input as [(image id, extra keys or None)], a one-line summary of the input, and
    the image root (image_root, else the folder the input's ids are relative to).

    JSON is validated whole and split as the seed split it (shard_bounds); tar shards and Parquet files are
    checked file by file and split as utils/inputs.py describes, each sample's extra keys being {"key"}.
    """
    inputs = expand_inputs(path)
    image_root = image_root or inputs.root
    if inputs.kind == "json":
        return (*read_json_shard(path, rank, world, limit), image_root)
    summary = check_inputs(inputs)
    samples = iter_samples(inputs, image_root, rank, world, limit)
    return [(sample.image, {"key": sample.key}) for sample in samples], summary, image_root


def check_input(path, limit):
    """--check-input: the input's one-line summary, after validating a JSON input whole or opening each shard
    or Parquet file (reading no shard through: that is each rank's work)."""
    inputs = expand_inputs(path)
    return read_json_shard(path, 0, 1, limit)[1] if inputs.kind == "json" else check_inputs(inputs)


def read_json_shard(path, rank, world, limit):
    """Validate the whole JSON input, then keep only this rank's slice."""
    total = 0
    try:
        for index, record in enumerate(iter_records(path)):
            if limit is not None and index >= limit:
                break
            if not isinstance(record, dict):
                raise UserError(f"{path}: entry {index} is not an object like {{\"image\": path}}")
            if not isinstance(record.get("image"), str) or not record["image"]:
                raise UserError(f"{path}: entry {index} has no \"image\" path")
            total += 1
        start, stop = shard_bounds(total, rank, world)
        shard = []
        for index, record in enumerate(iter_records(path)):
            if index >= stop:
                break
            if index >= start:
                extra = {(f"input_{k}" if k in OUTPUT_FIELDS else k): v for k, v in record.items() if k != "image"}
                shard.append((record["image"], extra or None))
    except RecordError as e:
        raise UserError(str(e)) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    return shard, f"{total} images"


def model_tag(model):
    """Output folder name of a checkpoint: the last part of its hub id or path."""
    return Path(model.rstrip("/")).name or "model"


def generation_kwargs(args, **model_defaults):
    """generate() kwargs from the common decoding flags; a flag left unset keeps the model's default.

    --temperature 0 means greedy; model_defaults may hold temperature/top_p (the seed's values for
    that model) and any fixed kwargs the model's reference passes.
    """
    kwargs = dict(model_defaults)
    kwargs["max_new_tokens"] = args.max_new_tokens
    kwargs["num_beams"] = args.num_beams
    if args.min_new_tokens is not None:
        kwargs["min_new_tokens"] = args.min_new_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if "temperature" in kwargs:
        if kwargs["temperature"] > 0:
            kwargs["do_sample"] = True
        else:
            kwargs.pop("temperature")
            kwargs.pop("top_p", None)
            kwargs["do_sample"] = False
    return kwargs


def to_device(tensors, device):
    """The tensors concatenated on `device`, each copied straight into its place: no concatenated copy on the
    CPU first, and from the loader's pinned memory the copies run while the CPU goes on."""
    import torch
    rows = sum(len(tensor) for tensor in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=device)
    start = 0
    for tensor in tensors:
        out[start:start + len(tensor)].copy_(tensor, non_blocking=True)
        start += len(tensor)
    return out


def stack_to_device(tensors, device):
    """torch.stack(tensors) on `device`, with no stacked copy on the CPU: each tensor copied into its place
    (to_device)."""
    return to_device([tensor[None] for tensor in tensors], device)


def to_device_async(tensor, device):
    """A CPU tensor on `device`, copied through pinned memory so that the CPU does not wait for the GPU's queued work
    (a copy from pageable memory, as torch.tensor(..., device=...) makes, waits for it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A tensor's copy to the CPU that does not wait for the GPU's queued work; result() waits for this copy alone,
    so a loop can launch its next GPU step first and read the copy while that step runs."""

    def __init__(self, tensor):
        import torch
        self.copied = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def result(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.host


def left_padded(id_lists, pad_token_id):
    """(input ids, attention mask) of token id lists, left-padded to the longest, as CPU tensors."""
    import torch
    length = max(map(len, id_lists))
    ids = torch.tensor([[pad_token_id] * (length - len(x)) + x for x in id_lists])
    mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in id_lists])
    return ids, mask


def mask_positions(mask):
    """Position ids of left-padded rows as generate() makes them from the attention mask: each real token counts
    the real tokens before it; padding gets 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def by_image(captions, prompts):
    """Captions of image-major (image, prompt) rows as caption() returns them: result[i][j], image i, prompt j."""
    return [captions[i:i + len(prompts)] for i in range(0, len(captions), len(prompts))]


def stopped_at_limit(new_token_ids, end_token_ids):
    """True when a generated row (a list: a GPU tensor would cost a wait on the GPU per token) holds no end
    token: generation ran into --max-new-tokens."""
    return not any(token in end_token_ids for token in new_token_ids)


def pick_device(local_rank):
    import torch
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class Work(NamedTuple):
    """What one process has to do: its images not yet done, and where their lines go."""
    pending: list  # [(image, extra keys or None, [prompt keys still missing])], in input order
    skipped: int  # shard images already done or recorded as failed
    input_summary: str  # what the whole input holds, e.g. "30 images" or "12 tar shards, 3.1 GB"
    image_root: str  # the folder that the pending image ids are relative to
    caption_files: dict  # prompt key -> this rank's captions file
    error_file: Path


def resolved_dtype(captioner_cls, dtype, device_type):
    """--dtype auto: the model's GPU dtype on CUDA, float32 on a CPU."""
    if dtype != "auto":
        return dtype
    return captioner_cls.default_dtype if device_type == "cuda" else "float32"


def output_dir(captioner_cls, args):
    """<output-dir>/<model>/<checkpoint>: the folder of one checkpoint's prompt folders and error files."""
    checkpoint = (captioner_cls.checkpoint_name(args) if hasattr(captioner_cls, "checkpoint_name")
                  else model_tag(args.model))
    return Path(args.output_dir) / captioner_cls.name / checkpoint


def remove_earlier_outputs(model_dir, prompts, rank, world):
    """--overwrite: each rank removes its own files; rank 0 also those of other world sizes. No rank reads them."""
    suffix = f"{rank:05d}-of-{world:05d}.jsonl"
    for old in [*model_dir.glob("errors-*.jsonl"), *(f for key in prompts for f in (model_dir / key).glob("captions-*.jsonl"))]:
        if old.name.endswith(suffix) or (rank == 0 and not old.name.endswith(f"-of-{world:05d}.jsonl")):
            old.unlink(missing_ok=True)


def check_checkpoint(captioner_cls, args):
    """Before anything loads: --model names a checkpoint that exists (a hub id: reachable, or cached)."""
    checkpoint_identity(args.model, getattr(captioner_cls, "model_on_hub", True))


def check_output_folders(captioner_cls, args, prompts):
    """Before anything loads (and once the input is known to be good): every output folder can be created and
    written."""
    model_dir = output_dir(captioner_cls, args)
    for folder in [model_dir, *(model_dir / key for key in prompts)]:
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"\n")
            probe.unlink()
        except OSError as error:
            raise UserError(f"--output-dir {args.output_dir}: cannot write in {folder}: "
                            f"{error.strerror or error}") from None


def settle_outputs(captioner_cls, args, prompts, rank, world):
    """The run records, before the model loads (args.dtype resolved): with --overwrite the earlier outputs go
    first, then the records are replaced; otherwise every folder's record must match this run's."""
    model_dir = output_dir(captioner_cls, args)
    if args.overwrite:
        remove_earlier_outputs(model_dir, prompts, rank, world)
    settle_records(output_folders(model_dir, prompts), run_settings(captioner_cls, args), args.overwrite)


def plan_work(captioner_cls, args, prompts, rank, world):
    """Read this rank's shard and leave out what earlier runs did (read and skip)."""
    shard, input_summary, image_root = read_shard(args.input_json, rank, world, args.limit, args.image_root)
    model_dir = output_dir(captioner_cls, args)
    suffix = f"{rank:05d}-of-{world:05d}.jsonl"
    caption_files = {key: model_dir / key / f"captions-{suffix}" for key in prompts}
    shard_images = {image for image, _ in shard}
    if args.overwrite:  # settle_outputs removes the earlier outputs: none is read
        done, failed = {key: set() for key in prompts}, set()
    else:
        done = {key: recorded_images(model_dir / key, "captions-*.jsonl", shard_images) for key in prompts}
        failed = set() if args.retry_errors else recorded_images(model_dir, "errors-*.jsonl", shard_images)
    pending, seen = [], set()
    for image, extra in shard:
        missing = [key for key in prompts if image not in done[key]]
        if missing and image not in failed and image not in seen:
            pending.append((image, extra, missing))
        seen.add(image)
    return Work(pending, len(shard) - len(pending), input_summary, image_root, caption_files,
                model_dir / f"errors-{suffix}")


def load_captioner(captioner_cls, args, rank, device, tag):
    """The model on this process's device; where there is a GPU, its prefill compiled and its decode steps as CUDA
    graphs."""
    import torch

    from utils.compiled_prefill import compile_prefill
    from utils.cuda_graphs import decode_with_cuda_graphs
    torch.manual_seed(args.seed + rank)
    args.dtype = getattr(torch, args.dtype)
    captioner = captioner_cls(args, device)
    if device.type == "cuda" and not args.no_compile:
        modules = compile_prefill(captioner.model)
        print(f"{tag} {modules} RMSNorms and MLPs compiled for the prefill (torch.compile: the first batches take "
              "longer)", file=sys.stderr, flush=True)
    graphs = (decode_with_cuda_graphs(captioner.model, getattr(captioner, "unread_in_decode", ()))
              if device.type == "cuda" and not args.no_cuda_graphs else [])
    return captioner, graphs


class StopRequest:
    """SIGTERM/SIGINT: remember the signal and let the current batch finish; a second one ends at once."""

    def __init__(self, tag):
        self.tag, self.signal = tag, None
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)
        print(f"\n{self.tag} {signal.Signals(signum).name}: finishing the current batch, then stopping",
              file=sys.stderr, flush=True)


class BatchCaptioner:
    """Captions batches and hands them to the writer; on CUDA out-of-memory a batch is halved and retried, and
    the batcher forms later batches in the smaller size (caption)."""

    def __init__(self, batcher, writer, progress, tag, graphs):
        self.batcher, self.writer, self.progress, self.tag, self.graphs = batcher, writer, progress, tag, graphs
        self.captioned = self.failed = 0

    def record_errors(self, indexed_errors):
        if indexed_errors:
            self.writer.write_errors(indexed_errors)
            self.failed += len(indexed_errors)
            self.progress.update(len(indexed_errors))

    def caption(self, batch):
        """Caption a Batch (utils/batcher.py) and write its lines."""
        import torch
        if len(batch.items) > self.batcher.batch_size:  # formed ahead, before a retry lowered the size
            self.caption_in_parts(batch.items, self.batcher.batch_size)
            return
        images = [prepared for _, prepared in batch.items]
        prompts = [self.batcher.prompts[key] for key in batch.prompt_keys]
        try:
            results = self.batcher.captioner.caption(images, prompts, *([] if batch.inputs is None else [batch.inputs]))
        except torch.cuda.OutOfMemoryError:
            results = None  # retried below, outside the handler, whose traceback still holds the failed batch
        if results is None:
            self.retry_in_halves(batch.items)
            return
        self.writer.write_captions([index for index, _ in batch.items], batch.prompt_keys, results)
        self.captioned += len(batch.items)
        self.progress.update(len(batch.items))

    def retry_in_halves(self, items):
        import torch
        for graph in self.graphs:
            graph.reset()  # the static cache kept from the batch before, and its recording
        torch.cuda.empty_cache()
        if len(items) == 1:
            self.record_errors([(items[0][0], OUT_OF_MEMORY)])
            return
        half = (len(items) + 1) // 2
        if half < self.batcher.batch_size:
            self.batcher.batch_size = half
            print(f"\n{self.tag} CUDA out of memory with {len(items)} images: continuing with batches of {half}",
                  file=sys.stderr, flush=True)
        self.caption_in_parts(items, half)

    def caption_in_parts(self, items, size):
        for start in range(0, len(items), size):
            self.caption(self.batcher.batch(items[start:start + size]))


def caption_shard(captioner_cls, args, prompts, rank, world, local_rank):
    """Check, plan, settle the run records, load the model and caption this rank's pending images."""
    tag = f"[{captioner_cls.name} rank {rank}/{world}]"
    stop = StopRequest(tag)  # from here on a signal ends the run quietly: at the latest after the next batch
    check_checkpoint(captioner_cls, args)
    work = plan_work(captioner_cls, args, prompts, rank, world)
    check_output_folders(captioner_cls, args, prompts)
    device = pick_device(local_rank)
    args.dtype = resolved_dtype(captioner_cls, args.dtype, device.type)
    settle_outputs(captioner_cls, args, prompts, rank, world)
    print(f"{tag} {len(work.pending) + work.skipped} images in this shard (input: {work.input_summary}); "
          f"{work.skipped} already done or recorded as failed; {len(work.pending)} to caption into "
          f"{work.error_file.parent}",
          file=sys.stderr, flush=True)
    if not work.pending:
        print(f"{tag} captioned 0, failed 0, skipped {work.skipped}, 0.0 s, 0.00 images/s", file=sys.stderr)
        return 0
    captioner, graphs = load_captioner(captioner_cls, args, rank, device, tag)
    return caption_work(captioner, graphs, work, args, prompts, tag, stop)


def caption_work(captioner, graphs, work, args, prompts, tag, stop):
    """The loop over the pending images: windows of prepared images, batches, lines; a signal stops it after
    the current batch."""
    writer = ShardWriter(work, args.model)
    progress = tqdm(total=len(work.pending), unit="img", desc=tag, dynamic_ncols=True,
                    mininterval=1 if sys.stderr.isatty() else 30)
    batcher = Batcher(captioner, prompts, work.pending, args.batch_size)
    batches = BatchCaptioner(batcher, writer, progress, tag, graphs)
    started = time.time()
    # the batcher's thread reads, sorts and batches the windows and makes each batch's CPU inputs ahead
    pieces = OnSecondThread(batcher.pieces(prepared_windows(work.pending, work.image_root, captioner.prepare, args)))
    try:
        for piece in pieces:
            if stop.signal is not None:  # came while the model loaded, or during the batch before
                break
            if isinstance(piece, Batch):
                batches.caption(piece)
            else:
                batches.record_errors(piece)
    finally:
        pieces.close()
        progress.close()
        writer.close()
    seconds = time.time() - started
    replayed = f", {sum(g.replays for g in graphs)} decode steps replayed from CUDA graphs" if graphs else ""
    print(f"{tag} captioned {batches.captioned}, failed {batches.failed}, skipped {work.skipped}, {seconds:.1f} s, "
          f"{batches.captioned / max(seconds, 1e-9):.2f} images/s{replayed}", file=sys.stderr, flush=True)
    if stop.signal is not None:
        left = len(work.pending) - batches.captioned - batches.failed
        print(f"{tag} stopped by {signal.Signals(stop.signal).name} with {left} images left; run the same "
              f"command again to resume", file=sys.stderr, flush=True)
        return 128 + stop.signal
    return 0


def check_flags(args, world):
    if args.numgpus is not None and args.numgpus != world:
        raise UserError(f"--numgpus {args.numgpus} but {world} process(es) were launched "
                        f"(WORLD_SIZE or SLURM_NTASKS); drop --numgpus or launch {args.numgpus}")
    for flag in ("batch_size", "max_new_tokens", "num_beams", "sort_window", "decode_rows"):
        value = getattr(args, flag, None)  # --decode-rows: only where the model has it, and unset by default
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        raise UserError("--num-workers must be 0 or more")
    if getattr(args, "decode_rows", None) is not None and args.attn_implementation not in ("sdpa_grouped", "sdpa"):
        raise UserError(f"--decode-rows needs --attn-implementation sdpa_grouped or sdpa, not "
                        f"{args.attn_implementation}")


def check_only(captioner_cls, args, prompts):
    """--check-input, which generate.sh runs once before it starts several processes: the input, the checkpoint,
    the output folders and their run records, loading nothing (torch is imported only to resolve --dtype for a
    comparison with earlier records)."""
    check_checkpoint(captioner_cls, args)
    summary = check_input(args.input_json, args.limit)
    check_output_folders(captioner_cls, args, prompts)
    folders = output_folders(output_dir(captioner_cls, args), prompts)
    if not args.overwrite and any(map(is_used, folders)):
        import torch
        args.dtype = resolved_dtype(captioner_cls, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        check_records(folders, run_settings(captioner_cls, args))
    print(f"{args.input_json}: {summary}, prompts: {', '.join(prompts)}", file=sys.stderr)


def run(captioner_cls):
    """Command-line entry point of a model script."""
    args = build_parser(captioner_cls).parse_args()
    try:
        rank, world, local_rank = distributed_env()
        check_flags(args, world)
        prompts = resolve_prompts(args, captioner_cls)
        if args.check_input:
            check_only(captioner_cls, args, prompts)
            sys.exit(0)
        status = caption_shard(captioner_cls, args, prompts, rank, world, local_rank)
    except UserError as e:
        print(f"{captioner_cls.name}.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler (the checks, generate.sh's --check-input)
        sys.exit(128 + signal.SIGINT)
    sys.exit(status)
