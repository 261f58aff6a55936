"""Where the CPU waits for the GPU between decode steps: every script on tiny checkpoints, on a GPU.

    python bench/decode_waits.py --json bench/out/decode_waits.json

A decode step replayed from a CUDA graph takes a few ms of GPU time; if the CPU waits for it to end before it
launches the next one (a GPU value read on the CPU, a copy from pageable memory), the GPU idles while the CPU runs
the generate loop between two steps. torch.cuda.set_sync_debug_mode("warn") reports each such wait; this counts
them, with the lines that caused them, from the third decode step of each recording (utils/cuda_graphs.py's
DecodeStepGraph: its first steps warm up and record, which waits on purpose) to the end of its generate() call or
refill loop. Prints, per script, the decode steps counted and the waits by line, and writes them as JSON.
"""
import argparse
import collections
import contextlib
import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from utils import cuda_graphs  # noqa: E402

from internvl_checkpoint import build_checkpoint  # noqa: E402
from llava_checkpoint import build_checkpoints  # noqa: E402
from minigpt4_checkpoint import build  # noqa: E402
from qwen_checkpoint import make_checkpoint  # noqa: E402
from sample_images import make_good_images, write_input  # noqa: E402


class WaitCounter:
    """Counts the waits the sync debug mode reports while a DecodeStepGraph is past its second step, until its
    generate() call (or refill loop) ends."""

    def __init__(self):
        self.decoding, self.steps, self.sites = False, 0, collections.Counter()
        call, reset = cuda_graphs.DecodeStepGraph.__call__, cuda_graphs.DecodeStepGraph.reset
        one_call = cuda_graphs.stop_check_one_step_late  # around every generate() call of a graph's model

        def counted_call(graph, **kwargs):
            output = call(graph, **kwargs)
            self.decoding = graph.steps >= 3  # a graph kept from an earlier call of this shape: from its first step
            self.steps += self.decoding
            return output

        def counted_reset(graph):  # the end of a refill loop, or a new cache
            self.decoding = False
            reset(graph)

        @contextlib.contextmanager
        def counted_call_of_generate():
            with one_call():
                yield
            self.decoding = False

        cuda_graphs.DecodeStepGraph.__call__, cuda_graphs.DecodeStepGraph.reset = counted_call, counted_reset
        cuda_graphs.stop_check_one_step_late = counted_call_of_generate
        warnings.showwarning = self.warning
        warnings.simplefilter("always")

    def warning(self, message, category, filename, lineno, file=None, line=None):
        if self.decoding and "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "warnings" not in f.filename]
            self.sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-1:-5:-1])] += 1

    def run(self, script, argv):
        """Run a script as `python script.py argv...` in this process; returns (decode steps, waits by line)."""
        self.steps, self.sites = 0, collections.Counter()
        sys.argv = [f"{script}.py", *argv]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runpy.run_path(str(REPO / f"{script}.py"), run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return self.steps, dict(self.sites.most_common())


def scripts(root):
    """{name: (script, model flags, environment)} on tiny checkpoints under root."""
    llava = build_checkpoints(root / "llava")
    minigpt4 = build(str(root / "minigpt4"))
    internvl = build_checkpoint(str(root / "internvl"), "qwen2")
    return {
        "qwen": ("qwen", ["--model", str(make_checkpoint(root / "qwen"))], {}),
        "internvl": ("internvl", ["--model", internvl, "--max-tiles", "2"], {}),
        "internvl x3, --decode-rows": ("internvl", ["--model", internvl, "--max-tiles", "2", "--prompts",
                                                    "detail,noun,style", "--decode-rows", "4"], {}),
        "llava": ("llava", ["--model", str(llava.hf), "--prompt", "Describe the image."], {}),
        "minigpt4": ("minigpt4", ["--cfg-path", f"{minigpt4}/repo/eval_configs/minigpt4_eval.yaml"],
                     {"TORCH_HOME": f"{minigpt4}/torch_home"}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="bench/out/decode_waits.json")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="every caption this long")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_waits.py: needs a GPU (CUDA graphs and the sync debug mode)")
    counter, results = WaitCounter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        input_file = write_input(root / "input.json", make_good_images(root / "images"))
        for name, (script, flags, env) in scripts(root).items():
            os.environ.update(env)
            steps, sites = counter.run(script, [
                "--input-json", str(input_file), "--image-root", str(root / "images"), "--output-dir",
                str(root / name), "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens),
                "--min-new-tokens", str(args.max_new_tokens), "--dtype", "float32", "--batch-size", "3",
                "--num-workers", "0", *flags])
            results[name] = dict(decode_steps=steps, waits=sum(sites.values()), by_line=sites)
    print(f"\n{'script':28} {'decode steps':>12} {'waits':>6}")
    for name, row in results.items():
        print(f"{name:28} {row['decode_steps']:12d} {row['waits']:6d}")
        for site, count in row["by_line"].items():
            print(f"  {count:5d}  {site}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
