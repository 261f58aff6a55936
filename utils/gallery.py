"""A static HTML page to spot-check captions before training on them.

    python utils/gallery.py multi.jsonl --output-dir gallery --names original,detail,noun
    python utils/gallery.py outputs/qwen/ckpt/default outputs/llava/ckpt/default --output-dir gallery \
        --input-json data/cc12m.jsonl

Shows a seeded random sample of images, each with all its captions side by side, flagged captions
highlighted (flags of utils/caption_qa.py), statistics per caption source and a histogram of
caption lengths. Writes OUTPUT_DIR/index.html, OUTPUT_DIR/thumbs/ and OUTPUT_DIR/lengths.png; open
index.html in a browser. Captions and paths are escaped, and the page allows no scripts at all.
Images are found as captioning found them: image ids (paths, tar members, Parquet rows) relative to the
image root of the run, --image-root or the root of the captioning input (--input-json).
"""
import html
import io
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont, ImageOps

if not __package__:  # python utils/gallery.py: makes utils importable (utils/as_package.py)
    import as_package  # noqa: F401
from utils.arguments import ArgumentParser
from utils.caption_qa import FLAGS, Checker, SourceStats, iter_file_captions, source_label, truncated_flags
from utils.errors import InputError
from utils.images import UnreadableImage
from utils.input_reader import expand_inputs, read_image_bytes
from utils.records import RecordError, composed_file
from utils.tar_shards import holds_shards

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def sample_rows(paths, names, size, seed, checker):
    """-> (source names, sampled rows [(image, {source: (caption, flags)})], SourceStats per source).

    A multi-caption JSONL gives one source per caption position; several single-caption files give
    one source each, joined by image. The sample (reservoir sampling, so memory stays at `size`
    rows) is drawn from the images of the first file; every file is read in full for the statistics.
    """
    rng = random.Random(seed)
    sources, stats, sample, seen = [], {}, [], 0
    for number, path in enumerate(paths):
        wanted = {image: row for image, row in sample} if number else None
        for image, captions, truncated_field, row_sources in iter_file_captions(path):
            if isinstance(captions, str):
                captions = [captions]
            truncated = truncated_flags(captions, truncated_field)
            for position, caption in enumerate(captions):
                if len(paths) > 1:
                    source = names[number] if number < len(names) else path
                else:
                    source = source_label(position, captions, names, row_sources) or path
                if source not in stats:
                    sources.append(source)
                    stats[source] = SourceStats(source, examples=0)
                flags = checker.flags(caption, truncated[position])
                stats[source].add(image, caption, flags)
                if number == 0:
                    captions[position] = (source, caption, flags)
                elif image in wanted:
                    wanted[image][source] = (caption, flags)
            if number == 0:
                seen += 1
                row = (image, {source: (caption, flags) for source, caption, flags in captions})
                if len(sample) < size:
                    sample.append(row)
                else:
                    slot = rng.randrange(seen)
                    if slot < size:
                        sample[slot] = row
    return sources, sample, stats


def thumbnail(image_id, image_root, target, size):
    """Write a JPEG thumbnail of an image file, tar member or Parquet row; -> None, or why it could not be shown."""
    try:
        with Image.open(io.BytesIO(read_image_bytes(image_id, image_root))) as image:
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            image.convert("RGB").save(target, "JPEG", quality=85)
        return None
    except UnreadableImage as e:
        return str(e)
    except Exception as e:  # any undecodable image: the page says so instead of failing
        return f"{type(e).__name__}: {e}"


def length_histogram(stats, sources, path, width=720, panel_height=110):
    """One bar panel of caption lengths in words per source, drawn with PIL only."""
    font = ImageFont.load_default()
    longest = max((max(map(int, s.words), default=0) for s in stats.values()), default=0)
    bin_width = max(1, -(-(longest + 1) // 60))  # at most 60 bars
    bins = -(-(longest + 1) // bin_width)
    image = Image.new("RGB", (width, panel_height * len(sources) + 30), "white")
    draw = ImageDraw.Draw(image)
    left, plot_width = 50, width - 70
    for n, source in enumerate(sources):
        counts = [0] * bins
        for length, count in stats[source].words.items():
            counts[length // bin_width] += count
        top, bottom = n * panel_height + 22, (n + 1) * panel_height
        peak = max(counts) or 1
        draw.text((left, top - 18), f"{source}: {stats[source].count} captions, words per caption", fill="black",
                  font=font)
        draw.line([(left, bottom), (left + plot_width, bottom)], fill="black")
        draw.text((4, top), str(peak), fill="black", font=font)
        bar = plot_width / bins
        for i, count in enumerate(counts):
            if count:
                x = left + i * bar
                draw.rectangle([x, bottom - (bottom - top) * count / peak, x + max(bar - 1, 1), bottom],
                               fill=COLORS[n % len(COLORS)])
    for i in range(0, bins + 1, max(1, bins // 10)):
        draw.text((left + i * plot_width / bins - 4, panel_height * len(sources) + 8), str(i * bin_width),
                  fill="black", font=font)
    image.save(path)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }}
td.caption {{ max-width: 28em; white-space: pre-wrap; }}
td.flagged {{ background: #fff3cd; }}
span.flag {{ display: inline-block; margin: 2px 2px 4px 0; padding: 0 4px; border-radius: 3px; background: #d9534f;
  color: white; font-size: 80%; }}
.path {{ font-size: 80%; color: #555; word-break: break-all; max-width: 260px; }}
.missing {{ width: 200px; height: 60px; background: #eee; font-size: 80%; color: #a00; }}
</style></head><body>
<h1>{title}</h1>
<p>{description}</p>
<h2>Caption sources</h2>
<table id="stats"><tr><th>source</th><th>captions</th><th>words: mean / p50 / p90 / max</th>{flag_headers}</tr>
{stats_rows}</table>
<p><img id="histogram" src="lengths.png" alt="caption length histogram"></p>
<h2>Sample</h2>
<table id="sample"><tr><th>image</th>{source_headers}</tr>
{sample_rows}</table>
</body></html>
"""


def render_page(sources, sample, stats, thumbs, inputs, seed):
    e = html.escape
    stats_rows = []
    for source in sources:
        s = stats[source].summary()
        words = s["words"]
        stats_rows.append(
            f"<tr><td>{e(source)}</td><td>{s['count']}</td>"
            f"<td>{words.get('mean', '')} / {words.get('p50', '')} / {words.get('p90', '')} / {words.get('max', '')}</td>"
            + "".join(f"<td>{s['flags'][f]} ({100 * s['flag_rates'][f]:.1f}%)</td>" for f in FLAGS) + "</tr>")
    rows = []
    for number, ((image, captions), (thumb, problem)) in enumerate(zip(sample, thumbs)):
        picture = (f'<img class="thumb" src="{e(thumb)}" alt="{e(image)}">' if problem is None
                   else f'<div class="missing">image not shown: {e(problem)}</div>')
        cells = [f'<td id="image-{number}">{picture}<div class="path">{e(image)}</div></td>']
        for source in sources:
            if source not in captions:
                cells.append('<td class="caption absent"><i>(no caption)</i></td>')
                continue
            caption, flags = captions[source]
            badges = "".join(f'<span class="flag">{e(f)}</span>' for f in flags)
            cells.append(f'<td class="caption{" flagged" if flags else ""}" data-flags="{e(" ".join(flags))}">'
                         f'{badges}{"<br>" if badges else ""}{e(caption)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return PAGE.format(
        title="Caption gallery",
        description=e(f"{len(sample)} images sampled at random (seed {seed}) from {', '.join(inputs)}. "
                      "Highlighted captions carry quality flags (see utils/caption_qa.py); statistics and the "
                      "histogram cover every caption of the inputs."),
        flag_headers="".join(f"<th>{e(f)}</th>" for f in FLAGS),
        stats_rows="\n".join(stats_rows),
        source_headers="".join(f"<th>{e(s)}</th>" for s in sources),
        sample_rows="\n".join(rows))


def main(argv=None):
    parser = ArgumentParser(
        description="Write a static HTML gallery (index.html, thumbs/, lengths.png) of a random sample of "
                    "images with all their captions side by side, flagged captions highlighted.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="one multi-caption JSONL ({image, caption: [...]}) or its webdataset shards (a .tar "
                             "or a folder of them), or one or more composed.jsonl / composed_index.json files or "
                             "folders holding one (one caption source each, joined by image; the sample is drawn "
                             "from the first)")
    parser.add_argument("--output-dir", required=True, help="folder for index.html, thumbs/ and lengths.png")
    parser.add_argument("--sample", type=int, default=50, help="images to show (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    parser.add_argument("--input-json", metavar="INPUT",
                        help="the captioning input (generate.sh's INPUT: JSON/JSONL, tar shards or Parquet): image ids "
                             "are found from its image root, as captioning found them (its folder, or the folder "
                             "holding its shards or Parquet files)")
    parser.add_argument("--image-root", help="the captioning run's --image-root, if it had one: the folder image ids "
                                             "start from (default: that of --input-json, else the shards' folder "
                                             "for shards, else the current folder)")
    parser.add_argument("--names", help="comma-separated source names: the caption positions of a multi-caption "
                                        "JSONL (default: its rows' \"sources\"), or the inputs in order")
    parser.add_argument("--thumb-size", type=int, default=256, help="longest thumbnail side in pixels (default 256)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt text whose echo is flagged, besides the model scripts' preset prompts "
                             "(repeatable)")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error("--sample must be at least 1")
    names = args.names.split(",") if args.names else []
    try:
        paths = [p if holds_shards(p) else composed_file(p) for p in args.inputs]
        # the shards of a mirrored tar original hold each image under its id
        image_root = args.image_root or (expand_inputs(args.input_json).root if args.input_json else
                                         expand_inputs(paths[0]).root if holds_shards(paths[0]) else ".")
        sources, sample, stats = sample_rows(paths, names, args.sample, args.seed, Checker(args.prompt))
    except (RecordError, InputError) as e:
        sys.exit(f"gallery.py: error: {e}")
    except OSError as e:
        sys.exit(f"gallery.py: error: {e.filename or ''}: {e.strerror}")
    if not sample:
        sys.exit(f"gallery.py: error: no captions in {paths[0]}")
    os.makedirs(os.path.join(args.output_dir, "thumbs"), exist_ok=True)
    thumbs = []
    for number, (image, _) in enumerate(sample):
        name = f"thumbs/{number:05d}.jpg"
        problem = thumbnail(image, image_root, os.path.join(args.output_dir, name), args.thumb_size)
        thumbs.append((name, problem))
    length_histogram(stats, sources, os.path.join(args.output_dir, "lengths.png"))
    with open(os.path.join(args.output_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(render_page(sources, sample, stats, thumbs, args.inputs, args.seed))
    shown = sum(problem is None for _, problem in thumbs)
    print(f"gallery.py: {len(sample)} images ({shown} shown, {len(sample) - shown} unreadable), "
          f"{len(sources)} caption sources -> {os.path.join(args.output_dir, 'index.html')}")
    if not shown and not (args.image_root or args.input_json):
        print("gallery.py: image ids were looked up from the current folder; pass --input-json (the captioning "
              "input) or --image-root to find them as captioning did", file=sys.stderr)


if __name__ == "__main__":
    main()
