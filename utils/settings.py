"""The command line resolved once into frozen settings, and this process's place in the run.

Everything the loop and the captioner need is decided here, before the model loads; later stages receive the
Settings and never change them. Nothing here imports torch.
"""
import dataclasses
import hashlib
import os
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, Optional

from utils.captioner import Decoding
from utils.errors import UserError


class ProcessPlace(NamedTuple):
    rank: int  # this process's part of the input, 0 to world - 1: part * processes + process
    world: int  # parts x processes
    local_rank: int  # this process's GPU on its node
    part: int = 0  # the work unit (a scheduler's array task), 0 to parts - 1
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class Settings:
    input: str  # --input-json
    image_root: Optional[str]
    model: str
    output_dir: Path  # --output-dir
    model_dir: Path  # <output-dir>/<model>/<checkpoint>: the prompt folders and the error files
    prompts: MappingProxyType  # prompt key -> text, in order
    decoding: Decoding
    seed: int
    dtype: str  # as asked: "auto" is resolved for the device (resolved_dtype)
    batch_size: int
    num_workers: int
    sort_window: int
    attn_implementation: str
    cuda_graphs: bool
    compile: bool
    decode_rows: Optional[int]
    limit: Optional[int]
    overwrite: bool
    retry_errors: bool
    check_input: bool
    options: MappingProxyType  # the captioner's own flags, by argparse dest
    place: ProcessPlace

    @property
    def tag(self):
        """How this process names itself on stderr."""
        place = self.place
        part = f"part {place.part}/{place.parts} " if place.parts > 1 else ""
        return f"[{self.model_dir.parent.name} {part}rank {place.rank}/{place.world}]"


# The variables of the schedulers that start the tasks of an array: (index, count); None where a count is not set.
ARRAY_VARIABLES = (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("AWS_BATCH_JOB_ARRAY_INDEX",
                   "AWS_BATCH_JOB_ARRAY_SIZE"), ("JOB_COMPLETION_INDEX", None))


def processes_of_part(env):
    """(process, processes, local rank) within a work unit: from generate.sh's launcher (utils/launch.py, torchrun's
    variable names) or from srun's tasks; (0, 1, 0) when neither."""
    for rank_var, world_var, local_var in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_var in env and world_var in env:
            return int(env[rank_var]), int(env[world_var]), int(env.get(local_var, 0))
    return 0, 1, 0


def work_unit(part, parts, env):
    """(part, parts): --part I/K; else the array task's index, counted from the array's first index, of the array's
    task count (--parts K: the index as the scheduler gives it, of K parts); else (0, 1)."""
    if part is not None:
        index, _, count = part.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise UserError(f"--part {part}: give I/K with 0 <= I < K, e.g. --part 3/100")
        return int(index), int(count)
    for index_var, count_var in ARRAY_VARIABLES:
        if index_var not in env:
            continue
        if parts is not None:
            index, count = int(env[index_var]), parts
        elif count_var is None:
            raise UserError(f"{index_var} is set: give --parts K, the number of parts (the Job's completions)")
        else:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if index_var.startswith("SLURM") else 0
            index, count = int(env[index_var]) - first, int(env[count_var])
        if not 0 <= index < count:
            raise UserError(f"{index_var}={env[index_var]} is not a part of {count}: give the array indices 0 to "
                            f"{count - 1}, or --parts K")
        return index, count
    if parts is not None:
        raise UserError("--parts K takes the part's index from an array task (SLURM_ARRAY_TASK_ID, "
                        "AWS_BATCH_JOB_ARRAY_INDEX or JOB_COMPLETION_INDEX), and none is set: give --part I/K")
    return 0, 1


def process_place(part=None, parts=None, env=os.environ):
    """This process's place: its work unit, and its process within the unit."""
    part, parts = work_unit(part, parts, env)
    process, processes, local_rank = processes_of_part(env)
    return ProcessPlace(part * processes + process, parts * processes, local_rank, part, parts)


def resolve_prompts(args, captioner_cls):
    """Ordered {key: text}. Free-text prompts get a key derived from their text, so reruns resume."""
    requested = list(args.prompt or [])
    if args.prompts:
        keys = [key.strip() for key in args.prompts.split(",") if key.strip()]
        for key in keys:
            if key not in captioner_cls.prompts:
                raise UserError(f"--prompts: unknown preset {key!r} (presets: {', '.join(captioner_cls.prompts)})")
        requested += keys
    prompts = {}
    for item in requested or [captioner_cls.default_prompt]:
        if item in captioner_cls.prompts:
            prompts[item] = captioner_cls.prompts[item]
        else:
            prompts["custom-" + hashlib.sha1(item.encode()).hexdigest()[:8]] = item
    return prompts


def check_flags(args, world):
    if args.input_json is None:
        raise UserError("the following argument is required: --input-json")
    if args.parts is not None and args.parts < 1:
        raise UserError("--parts must be at least 1")
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


def own_options(args, own_flags):
    """The captioner's own flags of a parsed command line, by argparse dest."""
    return MappingProxyType({dest: getattr(args, dest) for dest in own_flags})


def resolve_settings(captioner_cls, args, own_flags, place):
    """The Settings of a parsed command line (checked first)."""
    check_flags(args, place.world)
    options = own_options(args, own_flags)
    checkpoint = captioner_cls.name_checkpoint(args.model, options)
    return Settings(
        input=args.input_json, image_root=args.image_root, model=args.model, output_dir=Path(args.output_dir),
        model_dir=Path(args.output_dir) / captioner_cls.name / checkpoint,
        prompts=MappingProxyType(resolve_prompts(args, captioner_cls)),
        decoding=Decoding(args.max_new_tokens, args.min_new_tokens, args.temperature, args.top_p, args.num_beams),
        seed=args.seed, dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers,
        sort_window=args.sort_window, attn_implementation=args.attn_implementation,
        cuda_graphs=not args.no_cuda_graphs, compile=not args.no_compile,
        decode_rows=getattr(args, "decode_rows", None),
        limit=args.limit, overwrite=args.overwrite, retry_errors=args.retry_errors, check_input=args.check_input,
        options=options, place=place)


def resolved_dtype(captioner_cls, dtype, device_type):
    """--dtype auto: the model's GPU dtype on CUDA, float32 on a CPU."""
    if dtype != "auto":
        return dtype
    return captioner_cls.default_dtype if device_type == "cuda" else "float32"
