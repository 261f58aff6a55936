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
    rank: int  # this process's part of the input, 0 to world - 1
    world: int  # the number of parts
    local_rank: int  # this process's GPU on its node


@dataclasses.dataclass(frozen=True)
class Settings:
    input: str  # --input-json
    image_root: Optional[str]
    model: str
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
        return f"[{self.model_dir.parent.name} rank {self.place.rank}/{self.place.world}]"


def process_place():
    """(rank, world size, local rank) from generate.sh's launcher (utils/launch.py, torchrun's variable names) or
    SLURM's; (0, 1, 0) when neither."""
    for rank_var, world_var, local_var in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_var in os.environ and world_var in os.environ:
            return ProcessPlace(int(os.environ[rank_var]), int(os.environ[world_var]),
                                int(os.environ.get(local_var, 0)))
    return ProcessPlace(0, 1, 0)


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
        input=args.input_json, image_root=args.image_root, model=args.model,
        model_dir=Path(args.output_dir) / captioner_cls.name / checkpoint,
        prompts=MappingProxyType(resolve_prompts(args, captioner_cls)),
        decoding=Decoding(args.max_new_tokens, args.min_new_tokens, args.temperature, args.top_p, args.num_beams),
        seed=args.seed, dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers,
        sort_window=args.sort_window, attn_implementation=args.attn_implementation,
        cuda_graphs=not args.no_cuda_graphs, compile=not args.no_compile, decode_rows=getattr(args, "decode_rows", None),
        limit=args.limit, overwrite=args.overwrite, retry_errors=args.retry_errors, check_input=args.check_input,
        options=options, place=place)


def resolved_dtype(captioner_cls, dtype, device_type):
    """--dtype auto: the model's GPU dtype on CUDA, float32 on a CPU."""
    if dtype != "auto":
        return dtype
    return captioner_cls.default_dtype if device_type == "cuda" else "float32"
