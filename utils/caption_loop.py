"""The captioning loop every model script shares: `run(TheCaptioner)` is a model script's entry point.

    settings (utils/settings.py) -> checks before anything loads -> resume planning (utils/resume.py)
    -> image workers (utils/image_workers.py) -> batcher thread (utils/batcher.py)
    -> batch runner (utils/batch_runner.py) -> writer (utils/writer.py)

Up to the run records nothing imports torch or transformers (the model scripts import them where they are used), so
that --help, --check-input and mistakes answer at once. A mistake is one line and exit status 2 (UserError).
"""
import os
import queue
import signal
import sys
import time
from types import MappingProxyType

from tqdm import tqdm

from utils.batch_runner import BatchRunner
from utils.batcher import Batcher, OnSecondThread
from utils.caches import share_compiled_kernels
from utils.captioner import ModelSettings
from utils.checkpoints import identify_checkpoint
from utils.command_line import build_parser
from utils.errors import UserError
from utils.image_workers import prepared_windows
from utils.input_reader import check_input, read_part
from utils.resume import output_files, plan_work, settle_outputs
from utils.run_record import check_records, is_used, output_folders, run_settings
from utils.settings import own_options, process_place, resolve_settings, resolved_dtype
from utils.writer import ShardWriter, check_output_folders

# Batches differ in shape (and each generate() allocates its KV cache for the batch): let the CUDA allocator grow
# segments instead of fragmenting into blocks that no later batch fits. Read when CUDA is first used.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
MARKS_FOLDER = ".input-marks"  # in --output-dir: where a JSON array input's marks are kept (utils/input_reader.py)


def pick_device(local_rank):
    import torch
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def model_settings(captioner_cls, settings, dtype):
    import torch
    return ModelSettings(settings.model, getattr(torch, dtype), settings.attn_implementation, settings.decoding,
                         settings.decode_rows, MappingProxyType(dict(settings.options)))


def compiles_prefill(settings, device):
    """Whether the prefill runs compiled: on a GPU, unless --no-compile."""
    return device.type == "cuda" and settings.compile


def load_captioner(captioner_cls, settings, device, dtype):
    """The model on this process's device; where there is a GPU, its prefill compiled and its decode steps as CUDA
    graphs (their DecodeStepGraphs are returned with it)."""
    import torch

    from utils.generation.compiled_prefill import compile_prefill
    from utils.generation.cuda_graphs import decode_with_cuda_graphs
    share_compiled_kernels()
    torch.manual_seed(settings.seed + settings.place.rank)
    captioner = captioner_cls(model_settings(captioner_cls, settings, dtype), device)
    on_gpu = device.type == "cuda"
    if compiles_prefill(settings, device):
        modules = compile_prefill(captioner.model)
        print(f"{settings.tag} {modules} RMSNorms, MLPs and vision attentions compiled for the prefill "
              f"(torch.compile, before the first batch, while the image workers start)", file=sys.stderr, flush=True)
    graphs = decode_with_cuda_graphs(captioner.model, captioner.unread_in_decode) if on_gpu and settings.cuda_graphs else []
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


def caption_part(captioner_cls, settings):
    """Check, plan, settle the run records, load the model and caption this process's pending images."""
    tag = settings.tag
    stop = StopRequest(tag)  # from here on a signal ends the run quietly: at the latest after the next batch
    identify_checkpoint(settings.model, captioner_cls.model_on_hub)
    captioner_cls.check_options(settings.model, settings.options)
    place = settings.place
    part = read_part(settings.input, place.rank, place.world, settings.limit, settings.image_root,
                     settings.output_dir / MARKS_FOLDER)
    check_output_folders(settings)
    files = output_files(settings)
    writer = ShardWriter(files.captions, files.errors, settings.model, truncate=settings.overwrite)
    try:
        work = plan_work(settings, part)
        device = pick_device(settings.place.local_rank)
        dtype = resolved_dtype(captioner_cls, settings.dtype, device.type)
        settle_outputs(captioner_cls, settings, dtype)
        print(f"{tag} {len(work.pending) + work.skipped} images in this shard (input: {work.input_summary}); "
              f"{work.skipped} already done or recorded as failed; {len(work.pending)} to caption into "
              f"{settings.model_dir}", file=sys.stderr, flush=True)
        if not work.pending:
            print(f"{tag} captioned 0, failed 0, skipped {work.skipped}, 0.0 s, 0.00 images/s", file=sys.stderr)
            return 0
        captioner, graphs = load_captioner(captioner_cls, settings, device, dtype)
        return caption_work(captioner, graphs, work, writer, settings, stop, compiles_prefill(settings, device))
    finally:
        writer.close()


def caption_work(captioner, graphs, work, writer, settings, stop, compile_first):
    """The loop over the pending images: windows of prepared images, batches, lines; a signal stops it after
    the current batch. compile_first: compile the prefill (compile_before_first_batch) while the image workers
    prepare the first batch."""
    tag = settings.tag
    progress = tqdm(total=len(work.pending), unit="img", desc=tag, dynamic_ncols=True,
                    mininterval=1 if sys.stderr.isatty() else 30)
    smaller_sizes = queue.SimpleQueue()  # batch runner -> batcher: the size after an out-of-memory retry
    batcher = Batcher(captioner, settings.prompts, work.pending, settings.batch_size, smaller_sizes)
    runner = BatchRunner(captioner, settings.prompts, work.pending, writer, progress, tag, graphs, settings.batch_size,
                         smaller_sizes)
    started = time.time()
    windows = prepared_windows(work.pending, work.image_root, captioner.prepare, settings)  # the workers start
    if compile_first:  # before the batcher thread, which would run the tokenizer at the same time
        compile_before_first_batch(captioner, settings.prompts)
    batches = OnSecondThread(batcher.batches(windows))
    try:
        for batch in batches:
            if stop.signal is not None:  # came while the model loaded, or during the batch before
                break
            runner.run(batch)
    finally:
        batches.close()
        progress.close()
    report(runner, graphs, work, tag, time.time() - started)
    if stop.signal is not None:
        left = len(work.pending) - runner.captioned - runner.failed
        print(f"{tag} stopped by {signal.Signals(stop.signal).name} with {left} images left; run the same "
              f"command again to resume", file=sys.stderr, flush=True)
        return 128 + stop.signal
    return 0


def compile_before_first_batch(captioner, prompts):
    """Caption a blank image, which starts the compile of every module that runs compiled, and wait for the compile
    thread. With the compile under way, batches would run those modules eagerly and decode without CUDA graphs,
    and the compile thread's Python would slow their launches; this way it overlaps only the image workers' start,
    and every batch runs compiled. The blank image's calls are not counted in the end-of-run line, and its sampling
    does not move the random generator."""
    import torch
    from PIL import Image

    from utils.generation.compiled_prefill import PREFILL_CALLS, wait_for_compiles
    blank = captioner.prepare(Image.new("RGB", (448, 448)))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        captioner.caption([blank], list(prompts.values()))
    wait_for_compiles()
    PREFILL_CALLS.clear()


def report(runner, graphs, work, tag, seconds):
    from utils.generation.compiled_prefill import PREFILL_CALLS
    replayed = f", {sum(g.replays for g in graphs)} decode steps replayed from CUDA graphs" if graphs else ""
    if PREFILL_CALLS:
        replayed += (f", {PREFILL_CALLS['compiled']} of the prefill's module calls compiled "
                     f"({PREFILL_CALLS['eager']} eager while compiling)")
    print(f"{tag} captioned {runner.captioned}, failed {runner.failed}, skipped {work.skipped}, {seconds:.1f} s, "
          f"{runner.captioned / max(seconds, 1e-9):.2f} images/s{replayed}", file=sys.stderr, flush=True)


def check_only(captioner_cls, settings):
    """--check-input, which generate.sh runs once before it starts several processes: the input, the checkpoint,
    the output folders and their run records, loading nothing (torch is imported only to resolve --dtype for a
    comparison with earlier records)."""
    identify_checkpoint(settings.model, captioner_cls.model_on_hub)
    captioner_cls.check_options(settings.model, settings.options)
    summary = check_input(settings.input, settings.limit, settings.output_dir / MARKS_FOLDER)
    check_output_folders(settings)
    folders = output_folders(settings.model_dir, settings.prompts)
    if not settings.overwrite and any(map(is_used, folders)):
        import torch
        dtype = resolved_dtype(captioner_cls, settings.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        check_records(folders, run_settings(captioner_cls, settings, dtype))
    print(f"{settings.input}: {summary}, prompts: {', '.join(settings.prompts)}", file=sys.stderr)


def run(captioner_cls):
    """Command-line entry point of a model script."""
    parser, own_flags = build_parser(captioner_cls)
    args = parser.parse_args()
    try:
        if captioner_cls.run_instead(args.model, own_options(args, own_flags)):
            sys.exit(0)
        settings = resolve_settings(captioner_cls, args, own_flags, process_place(args.part, args.parts))
        if settings.check_input:
            check_only(captioner_cls, settings)
            sys.exit(0)
        status = caption_part(captioner_cls, settings)
    except UserError as e:
        print(f"{captioner_cls.name}.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler (the checks, generate.sh's --check-input)
        sys.exit(128 + signal.SIGINT)
    sys.exit(status)
