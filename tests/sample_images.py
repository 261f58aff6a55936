"""Image files as a crawled dataset has them: odd modes and names, and broken entries."""
import io
import json
import os

import numpy as np
from PIL import Image


def _pattern(width, height, seed):
    """A smooth random picture: different per seed, so captions differ between images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(x / rng.uniform(3, 30) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(3, 30)) for _ in range(3)]
    return ((np.stack(channels, -1) + 2) * 63).astype(np.uint8)


def write_pattern_images(folder, count, seed):
    """`count` small patterned PNGs of a few sizes, photo-00.png ..., and an input file listing them."""
    names = []
    for i in range(count):
        names.append(f"photo-{i:02d}.png")
        Image.fromarray(_pattern(40 + 7 * (i % 5), 40 + 5 * (i % 3), seed + i)).save(folder / names[-1])
    return write_input(folder / "input.json", names), names


def make_good_images(folder):
    """Readable images of many kinds; returns their paths relative to `folder`."""
    os.makedirs(folder, exist_ok=True)
    files = {}

    def save(name, image, **kwargs):
        image.save(os.path.join(folder, name), **kwargs)
        files[name] = True

    save("square.jpg", Image.fromarray(_pattern(64, 64, 1)))
    save("wide.png", Image.fromarray(_pattern(160, 48, 2)))
    save("tall.png", Image.fromarray(_pattern(40, 120, 3)))
    save("rgba.png", Image.fromarray(np.dstack([_pattern(80, 60, 4), _pattern(80, 60, 5)[..., 0]]), "RGBA"))
    save("palette.png", Image.fromarray(_pattern(70, 50, 6)).convert("P", palette=Image.Palette.ADAPTIVE))
    save("cmyk.jpg", Image.fromarray(_pattern(60, 60, 7)).convert("CMYK"))
    save("gray16.png", Image.fromarray((_pattern(50, 70, 8)[..., 0].astype(np.uint16) * 257)))
    frames = [Image.fromarray(_pattern(48, 48, 9 + i)).convert("P") for i in range(3)]
    frames[0].save(os.path.join(folder, "animated.gif"), save_all=True, append_images=frames[1:], duration=100)
    files["animated.gif"] = True
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    save("exif-rotated.jpg", Image.fromarray(_pattern(90, 40, 12)), exif=exif)
    save("odd name #1 (copy) é.png", Image.fromarray(_pattern(56, 56, 13)))
    save("strip.png", Image.fromarray(_pattern(420, 14, 14)))  # 30:1
    save("tiny.png", Image.fromarray(_pattern(3, 5, 15)))
    return list(files)


def make_broken_entries(folder):
    """Entries that cannot be captioned, each a different failure; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "empty.jpg"), "wb").close()
    buffer = io.BytesIO()
    Image.fromarray(_pattern(64, 64, 20)).save(buffer, "JPEG")
    with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with open(os.path.join(folder, "not-an-image.jpg"), "w") as f:
        f.write("<html>404 Not Found</html>")
    # 10000 x 10000 one-bit pixels: a small file that would decode to 100 megapixels.
    Image.new("1", (10000, 10000)).save(os.path.join(folder, "bomb.png"))
    os.makedirs(os.path.join(folder, "a-directory.jpg"), exist_ok=True)
    return ["missing.jpg", "empty.jpg", "truncated.jpg", "not-an-image.jpg", "bomb.png", "a-directory.jpg"]


def write_input(path, images, jsonl=False, extra=None):
    rows = [{"image": image, **(extra(i) if extra else {})} for i, image in enumerate(images)]
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f)
    return path


def write_tar_shard(path, samples):
    """A webdataset shard as img2dataset writes it: samples [(key, {extension: bytes or str})] in order."""
    import tarfile
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def image_bytes(seed, size=(48, 40), fmt="JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(_pattern(*size, seed)).save(buffer, fmt)
    return buffer.getvalue()
