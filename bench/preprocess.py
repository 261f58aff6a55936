"""CPU cost of image decoding + preprocessing per model, on one core: how many --num-workers a GPU needs.

    python -m bench.preprocess --images 64 --json bench/out/preprocess.json

Each model's `prepare` (what the loop's worker processes run: open, decode, convert, resize, and for
most models normalise) with its real settings, on the JPEG mix of bench/throughput.py, one process,
torch limited to one thread. A GPU that captions R images/s needs about R / (images/s per core)
workers.
"""
import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.throughput import make_images
from utils.images import open_image


def preparers():
    """name -> prepare callable with the real checkpoints' settings."""
    import internvl
    import llava
    import minigpt4
    import qwen
    from transformers import CLIPImageProcessorPil, Qwen2VLImageProcessor
    qwen_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    clip_336 = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                                     image_std=[0.26862954, 0.26130258, 0.27577711])
    return {
        "internvl (6 tiles)": functools.partial(internvl.prepare_image, max_tiles=6),
        "qwen (resize + image processor)": functools.partial(qwen.prepare_image, min_pixels=56 * 56,
                                                             max_pixels=28 * 28 * 16384, image_processor=qwen_processor,
                                                             dtype=torch.bfloat16),
        "llava (pad + CLIP 336)": functools.partial(llava.prepare_image, image_processor=clip_336, pad=True),
        "minigpt4 (224)": functools.partial(minigpt4.preprocess, size=224),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", default="bench/out/preprocess.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / name for name in make_images(Path(tmp), args.images)]
        for name, prepare in preparers().items():
            prepare(open_image(paths[0]))  # warm-up
            start = time.process_time()
            for path in paths:
                prepare(open_image(path))
            seconds = time.process_time() - start
            rows.append(dict(model=name, ms_per_image=round(1000 * seconds / len(paths), 1),
                             images_per_s_per_core=round(len(paths) / seconds, 1)))
    print(f"{'prepare':26} {'ms/image':>9} {'images/s/core':>14}")
    for row in rows:
        print(f"{row['model']:26} {row['ms_per_image']:9.1f} {row['images_per_s_per_core']:14.1f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(cpu=os.uname().machine, images=args.images, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
