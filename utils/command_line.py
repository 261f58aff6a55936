"""The model scripts' command line: the flags every script takes, then each captioner's own (add_arguments).

Parsing imports neither torch nor transformers, so that --help and mistakes answer at once.
"""
import argparse
import os

from utils.arguments import ArgumentParser


def usable_cores():
    """The cores this process may run on (what torch's DataLoader checks its worker count against)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser(captioner_cls):
    """The parser of a model script, and the argparse dests of the captioner's own flags."""
    parser = ArgumentParser(
        prog=f"{captioner_cls.name}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Caption the images of an input with {captioner_cls.name}, one part of it per process "
        "(generate.sh starts one process per GPU; see README.md and docs/flags.md).")
    add_input_flags(parser, captioner_cls)
    add_decoding_flags(parser)
    add_speed_flags(parser, captioner_cls)
    add_run_flags(parser)
    shared = {action.dest for action in parser._actions}
    captioner_cls.add_arguments(parser)
    parser.set_defaults(**captioner_cls.defaults)
    return parser, tuple(action.dest for action in parser._actions if action.dest not in shared)


def add_input_flags(parser, captioner_cls):
    add = parser.add_argument
    add("--input-json", metavar="INPUT", help='images to caption: a JSON array [{"image": path}, ...] or JSONL with '
        "one such object per line (other keys are copied to the output); webdataset tar shards (a .tar file, a folder "
        "of them, or a pattern such as data/{00000..01242}.tar); or Parquet (a .parquet file or a folder of them). "
        "Required")
    add("--image-root", help="folder that relative image paths and image ids are resolved against (default: the "
        "input file's folder, or the folder holding the shards or Parquet files)")
    add("--output-dir", default="outputs", help="where <model>/<checkpoint>/<prompt>/captions-*.jsonl go")
    add("--model", default=captioner_cls.default_model, help="checkpoint: hub id or local folder")
    add("--prompt", action="append", metavar="KEY_OR_TEXT",
        help=f"prompt preset key ({', '.join(captioner_cls.prompts)}) or free text; repeat for several prompts "
        f"(default: {captioner_cls.default_prompt})")
    add("--prompts", metavar="KEY,KEY", help="several preset keys, comma-separated: every image is read once and "
        "captioned with each; one output per prompt")
    add("--limit", type=int, default=None, metavar="N", help="caption only the first N entries of the input")


def add_decoding_flags(parser):
    add = parser.add_argument
    add("--max-new-tokens", type=int, default=77, help="longest caption in tokens (the original scripts' 77)")
    add("--min-new-tokens", type=int, default=None, help="shortest caption in tokens (benchmarks set it equal to "
        "--max-new-tokens so that every run does the same work)")
    add("--temperature", type=float, default=None, help="0 for greedy decoding; >0 samples "
        "(default: the model's own, see docs/models/)")
    add("--top-p", type=float, default=None, help="nucleus sampling threshold (default: the model's own)")
    add("--num-beams", type=int, default=1, help="beam search width")
    add("--seed", type=int, default=0, help="random seed for sampling (each process adds its rank)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto: the model's GPU dtype on a GPU, float32 on a CPU")


def add_speed_flags(parser, captioner_cls):
    """Flags that change only the speed: not in the run record."""
    add = parser.add_argument
    add("--batch-size", type=int, default=8, help="images per generate() call")
    add("--num-workers", type=int, default=min(4, usable_cores()), help="image loading and preprocessing "
        "processes per GPU process (by default 4, or the usable cores where there are fewer)")
    add("--sort-window", type=int, default=4, metavar="N", help="read N batches ahead and sort them by prompt "
        "length, so that each batch pads less (1: input order)")
    add("--attn-implementation", default="sdpa_grouped", choices=["sdpa_grouped", "sdpa", "eager", "flash_attention_2"],
        help="attention kernel: sdpa_grouped is PyTorch SDPA that decodes grouped-query heads without copying the "
        "KV cache (utils/generation/attention.py); flash_attention_2 needs the flash-attn package")
    add("--no-cuda-graphs", action="store_true", help="decode eagerly; by default, on a GPU, decode steps replay a "
        "CUDA graph recorded once per batch shape (utils/generation/cuda_graphs.py): the same tokens, faster")
    add("--no-compile", action="store_true", help="run the prefill eagerly; by default, on a GPU, the RMSNorms and "
        "MLPs run compiled by torch.compile in the prefill (utils/generation/compiled_prefill.py), compiled before "
        "the first batch while the image workers start")
    if captioner_cls.refills_rows:
        add("--decode-rows", type=int, default=None, metavar="N", help="decode each batch's (image, prompt) rows in "
            "N rows that each take the next waiting row as soon as its caption ends (utils/generation/refill.py); "
            "pays when captions differ in length, as with several prompts: then give --batch-size several times "
            "N / prompts. The same greedy captions. Needs --attn-implementation sdpa_grouped or sdpa (default: all "
            "rows of a batch decode together until the longest caption ends)")


def add_run_flags(parser):
    add = parser.add_argument
    add("--part", metavar="I/K", help="caption part I of K (0 <= I < K) and write it to files of its own, for "
        "schedulers without array variables; by default the part comes from an array task (SLURM job arrays, AWS "
        "Batch array jobs, Kubernetes Indexed Jobs with --parts), else the whole input")
    add("--parts", type=int, metavar="K", help="the number of parts, the part being the array task's index as the "
        "scheduler gives it (Kubernetes' JOB_COMPLETION_INDEX; or a SLURM array task resubmitted alone); default: "
        "the array's task count, the part counted from its first index")
    add("--numgpus", type=int, default=None, help="the original scripts' flag, kept for compatibility: must equal "
        "the number of processes (WORLD_SIZE or SLURM_NTASKS)")
    add("--overwrite", action="store_true", help="delete this model/prompt's earlier outputs and their run records "
        "and start afresh (default: resume, skipping what is done, when the run record matches)")
    add("--check-input", action="store_true", help="only check the flags, the input file, the checkpoint, the "
        "output folders and their run records, then exit (generate.sh does this once before it starts several "
        "processes)")
    add("--retry-errors", action="store_true", help="try again images that an earlier run recorded as unreadable")
